"""Shared benchmark machinery: device choice, shapes, timing with synchronization, memory above inputs.

Options: --bench-device cpu|cuda (default: cuda when available), --quick (smallest shapes only).
Every case runs through ``run_case``: a warm-up call, one call under the memory meter (peak bytes above
what was allocated before; stored in extra_info), then pedantic rounds timed by pytest-benchmark with a
CUDA synchronize inside the timed function. Fresh inputs per round come from ``setup`` (untimed)."""
import gc
import os

import pytest
import torch

os.environ.setdefault("KINETO_LOG_LEVEL", "5")

from mmalign._measure import peak_memory_above  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.addoption("--quick", action="store_true", help="smallest shapes only")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


@pytest.fixture(scope="session")
def device(request):
    dev = request.config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return dev


@pytest.fixture(scope="session")
def quick(request):
    return request.config.getoption("--quick")


def decoder_dims(device, cpu_layers: int) -> dict:
    """The decoder of the training benchmarks (bench_train, bench_trainers): ~1B on a GPU (16 layers, 2048 wide,
    32k vocabulary), a small one on CPU. MMALIGN_BENCH_SHAPE=gpu takes the GPU's widths on any device and
    MMALIGN_BENCH_LAYERS=N sets the layer count: a CPU projection of the GPU case (memory and time are linear
    in the layer count: measure 1 and 2 layers, extrapolate to 16)."""
    gpu = device == "cuda" or os.environ.get("MMALIGN_BENCH_SHAPE") == "gpu"
    layers = int(os.environ.get("MMALIGN_BENCH_LAYERS") or (16 if gpu else cpu_layers))
    return dict(vocab_size=32000, hidden_size=2048 if gpu else 256, intermediate_size=5632 if gpu else 512,
                num_hidden_layers=layers, num_attention_heads=16 if gpu else 4, num_key_value_heads=8 if gpu else 2)


def decoder_label(dims: dict) -> str:
    return f"decoder {dims['num_hidden_layers']}x{dims['hidden_size']}"


def bench_dtype(device) -> torch.dtype:
    """bf16 on a GPU, fp32 on CPU (where bf16 matmuls are slow); MMALIGN_BENCH_PRECISION=fp32|bf16 overrides."""
    name = os.environ.get("MMALIGN_BENCH_PRECISION", "bf16" if device == "cuda" else "fp32")
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _versions() -> str:
    import mmalign

    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    return f"torch {torch.__version__} (cuda {torch.version.cuda}), triton {tv}, mmalign {mmalign.__version__}"


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_case(benchmark, device, fn, setup, *, bytes_moved: int = 0, rounds: int | None = None, held_bytes=None,
             collect: bool = False, **info):
    """Time ``fn(*setup())``; record peak memory above inputs and effective bandwidth in extra_info.
    ``held_bytes()``, when given, is what the inputs themselves hold (a trainer's models and optimizer state),
    added to the peak: the memory column then counts everything, not only what the call allocates.
    ``collect``: run Python's garbage collector before each round (untimed), so that large object graphs of
    earlier rounds (trainers) are not collected inside a timed one."""
    def timed(*args):
        out = fn(*args)
        sync(device)
        return out

    args = setup()
    timed(*args)  # warm-up (compilation, autotuning, allocator)
    del args
    args = setup()
    sync(device)
    _, peak = peak_memory_above(lambda: timed(*args), device)
    del args
    if held_bytes is not None:
        info.update(held_bytes=int(held_bytes()), peak_above_held_bytes=int(peak))
        peak += info["held_bytes"]
    benchmark.extra_info.update(info)
    benchmark.extra_info.update({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                 "versions": _versions(),
                                 "peak_mem_bytes": int(peak), "bytes_moved_min": int(bytes_moved)})
    rounds = rounds or (20 if device == "cuda" else 3)
    def fresh():  # untimed; synchronized so that e.g. a clone's kernel does not run into the timed region
        if collect:
            gc.collect()
        args = setup()
        sync(device)
        return args, {}

    # no warm-up round of its own: the warm-up call and the memory call above already ran fn twice
    benchmark.pedantic(timed, setup=fresh, rounds=rounds, iterations=1, warmup_rounds=0)
