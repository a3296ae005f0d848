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


def _interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run our kernels here, or None. Triton 3.6's interpreter turns a
    loaded loop bound into a Python int with int() of a 1-element array, which numpy >= 2.4 refuses:
    every kernel with a data-dependent loop would fail with a TypeError deep inside Triton."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    import triton
    import triton.language as tl

    @triton.jit
    def probe(X, N):
        for i in range(0, tl.load(N), 1):
            tl.store(X + i, 1.0)

    try:
        probe[(1,)](torch.zeros(2), torch.full((1,), 2, dtype=torch.int32))
    except Exception as e:  # noqa: BLE001 (any failure means the interpreter is unusable)
        import numpy

        return (f"the Triton interpreter (triton {triton.__version__}, numpy {numpy.__version__}) cannot run a "
                f"kernel with a loaded loop bound: {e!r}. With triton < 3.8 use numpy < 2.4, or install "
                "the torch/triton of requirements.txt")
    return None


_PROBLEM = _interpreter_problem()
if _PROBLEM:
    pytest.exit(_PROBLEM, returncode=4)


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
