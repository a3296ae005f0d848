"""Test configuration. On a machine without a GPU, Triton kernels run on CPU tensors through the
interpreter: TRITON_INTERPRET must be set before any kernel is defined, so it is set here, before
mmalign is imported. With a GPU, Triton runs for real and the interpreter stays off."""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import pytest  # noqa: E402

import mmalign  # noqa: E402,F401


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name: fresh inputs in every test, reproducible across runs."""
    seed = zlib.crc32(request.node.nodeid.encode()) % 2**31
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def poison():
    """Every torch.empty (also inside C++ and Triton launchers) comes back filled with NaN, so an element
    a kernel forgets to write fails the comparison."""
    import torch.utils.deterministic as det

    old_det, old_warn, old_fill = (torch.are_deterministic_algorithms_enabled(),
                                   torch.is_deterministic_algorithms_warn_only_enabled(),
                                   det.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    yield
    det.fill_uninitialized_memory = old_fill
    torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
