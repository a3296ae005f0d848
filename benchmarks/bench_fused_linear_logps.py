"""fused_linear_sequence_logps vs eager (``hidden @ W.T`` -> fp32 log_softmax -> gather) vs torch.compile,
forward+backward, half of the positions ignored (prompt + image tokens, as in a VLM DPO batch).

CPU: B*T = 1024, H = 512, V = 32000, fp32. GPU: bf16, B*T = 16384, H = 4096, V in {32000, 152064}."""
import pytest
import torch

import mmalign.functional as F
from mmalign import _dispatch
from mmalign.ops_demo import eager_sequence_logps

from conftest import run_case

_compiled = {}


def _eager(h, w, y):
    return eager_sequence_logps(h @ w.T, y)


def _shapes(device, quick):
    if device == "cuda":
        return [(8, 2048, 4096, 32000, torch.bfloat16)] + ([] if quick else [(8, 2048, 4096, 152064, torch.bfloat16)])
    return [(1, 256, 256, 32000, torch.float32)] if quick else [(2, 512, 512, 32000, torch.float32)]


@pytest.mark.parametrize("provider", ["eager", "compile", "triton", "cuda", "cpp"])
@pytest.mark.parametrize("shape_idx", [0, 1])
def test_fused_linear_sequence_logps(benchmark, device, quick, provider, shape_idx):
    if quick and provider == "compile" and device == "cpu":
        pytest.skip("--quick: torch.compile's warm-up takes seconds on a CPU")
    shapes = _shapes(device, quick)
    if shape_idx >= len(shapes):
        pytest.skip("shape not in this run")
    B, T, H, V, dtype = shapes[shape_idx]
    if provider in _dispatch.BACKENDS and _dispatch.not_supported_reasons("fused_linear_sequence_logps", provider, device, dtype):
        pytest.skip(f"{provider} cannot run here")
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(B, T, H, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = (torch.randn(V, H, device=device, dtype=dtype, generator=g) * H**-0.5).requires_grad_()
    labels = torch.randint(0, V, (B, T), device=device, generator=g)
    labels[:, : T // 2] = -100
    if provider == "eager":
        fn = _eager
    elif provider == "compile":
        fn = _compiled.setdefault("fn", torch.compile(_eager, dynamic=False))
    else:
        def fn(h, w, y):
            return F.fused_linear_sequence_logps(h, w, y, backend=provider, check_labels=False)

    def step():
        out = fn(hidden, weight, labels)
        return torch.autograd.grad(out.sum(), (hidden, weight))

    benchmark.group = f"fused_linear_sequence_logps fwd+bwd B*T={B * T} H={H} V={V} {str(dtype).replace('torch.', '')}"
    run_case(benchmark, device, step, lambda: (), op="fused_linear_sequence_logps", mode="fwd+bwd",
             provider=provider, shape=f"{B}x{T}x{H}x{V}", dtype=str(dtype),
             rounds=10 if device == "cuda" else 3)
