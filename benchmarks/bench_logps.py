"""sequence_logps: eager (fp32 log_softmax + gather, what DPO trainers run) vs torch.compile of it vs
mmalign's kernels, forward and forward+backward. Time (pytest-benchmark) and peak memory above the
inputs (extra_info). bytes_moved_min is the floor: read the logits once (fwd), plus read + write once
(bwd). The `copy` case times a device copy of the same logits: the bandwidth ceiling of this run.

CPU: B*T = 2048, V in {32000, 128256}, fp32. GPU: bf16, B*T = 16384, V in {32000, 152064}."""
import pytest
import torch

import mmalign.functional as F
from mmalign import _dispatch
from mmalign.ops_demo import eager_sequence_logps

from conftest import run_case

_compiled = {}


def _compile_eager():
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(eager_sequence_logps, dynamic=False)
    return _compiled["fn"]


def _provider_fn(provider):
    if provider == "eager":
        return eager_sequence_logps, False
    if provider == "compile":
        return _compile_eager(), False
    name, _, inplace = provider.partition("-")
    return (lambda z, y: F.sequence_logps(z, y, backend=name, inplace_backward=bool(inplace), check_labels=False),
            bool(inplace))


def _shapes(device, quick):
    if device == "cuda":
        return [(8, 2048, 32000, torch.bfloat16)] + ([] if quick else [(8, 2048, 152064, torch.bfloat16)])
    return [(1, 512, 32000, torch.float32)] if quick else [(2, 1024, 32000, torch.float32), (2, 1024, 128256, torch.float32)]


PROVIDERS = ["eager", "compile", "triton", "cuda", "cpp", "triton-inplace", "cuda-inplace", "cpp-inplace", "copy"]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape_idx", [0, 1])
def test_sequence_logps(benchmark, device, quick, mode, provider, shape_idx):
    if quick and provider == "compile" and device == "cpu":
        pytest.skip("--quick: torch.compile's warm-up takes seconds on a CPU")
    shapes = _shapes(device, quick)
    if shape_idx >= len(shapes):
        pytest.skip("shape not in this run")
    B, T, V, dtype = shapes[shape_idx]
    base = provider.split("-")[0]
    if base in _dispatch.BACKENDS and _dispatch.not_supported_reasons("sequence_logps", base, device, dtype):
        pytest.skip(f"{base} cannot run here")
    if provider == "copy" and mode != "fwd":
        pytest.skip("copy is one case")
    g = torch.Generator(device=device).manual_seed(0)
    source = torch.randn(B, T, V, device=device, dtype=dtype, generator=g)
    labels = torch.randint(0, V, (B, T), device=device, generator=g)
    labels[:, : T // 8] = -100
    elem = source.element_size()
    benchmark.group = f"sequence_logps {mode} B*T={B * T} V={V} {str(dtype).replace('torch.', '')}"
    info = dict(op="sequence_logps", mode=mode, provider=provider, shape=f"{B}x{T}x{V}", dtype=str(dtype))

    if provider == "copy":
        dst = torch.empty_like(source)
        run_case(benchmark, device, lambda: dst.copy_(source), lambda: (), bytes_moved=2 * source.numel() * elem, **info)
        return
    fn, inplace = _provider_fn(provider)
    if mode == "fwd":
        run_case(benchmark, device, lambda z: fn(z, labels), lambda: (source,),
                 bytes_moved=source.numel() * elem, **info)
        return

    def step(z):
        out = fn(z, labels)
        return torch.autograd.grad(out.sum(), z)[0]

    # in-place backward overwrites its input: each round gets a fresh copy (untimed setup)
    setup = (lambda: (source.clone().requires_grad_(),)) if inplace else (lambda: (source.detach().requires_grad_(),))
    run_case(benchmark, device, step, setup, bytes_moved=3 * source.numel() * elem, **info)
