"""The DAMO step, forward + backward: mmalign's fused kernel vs the eager reference (docs/math.md §3, literal)
vs an eager transcription of the released code's style (docs/math.md §3 "official": torch.multinomial,
.item() and Python indexing every step), at N = 16, 256, 4096 pairs, and 16384 (on CUDA past one Triton
program: the multi-program path).

fwd+bwd also times "autograd-floor", the backward of a two-op graph ((x * y).sum()) on the same N: the
fixed cost of one autograd.grad call, which every loss pays in this microbenchmark and which a training
step pays once for the whole model, not per loss.

extra_info records, for each provider, the CUDA kernel launches of one step (profiler) and the host
synchronizations (torch.cuda.set_sync_debug_mode counts them) on GPU."""
import warnings

import pytest
import torch
import torch.nn.functional as TF

import mmalign.functional as F
from mmalign import _dispatch
from mmalign.ops.damo_step import DAMOConfig, damo_step_reference
from mmalign.ops.limits import DAMO_ONE_PROGRAM_MAX_N as CUDA_MAX_N

from conftest import run_case


def released_style_step(pc, pr, rc, rr, state, alpha_d, beta=0.1, keep_ratio=0.8, gamma=0.9):
    """docs/math.md §3 "official" written the way the released trainer computes it (host-side running mean)."""
    logits = (pc - pr) - (rc - rr)
    A = logits.detach()
    g = state["g"]
    w = torch.exp(-((A - g) ** 2) / 2)
    K = int(keep_ratio * A.shape[0])
    if w.sum().item() == 0:
        idx = torch.argsort((A - g).abs())[:K]
    else:
        idx = torch.multinomial(w, K, replacement=False)
    alpha_m = torch.sigmoid(A[idx]).mean() / torch.sigmoid(torch.tensor(g, device=A.device))
    beta_used = torch.clamp(beta * alpha_d * alpha_m, min=1e-3)
    losses = -TF.logsigmoid(beta_used[idx] * logits[idx])
    chosen_rewards = (beta_used * (pc - rc)).detach()
    rejected_rewards = (beta_used * (pr - rr)).detach()
    state["g"] = gamma * g + (1 - gamma) * A.mean().item()
    return losses.mean(), chosen_rewards, rejected_rewards


def _providers(device):
    fused = ["triton", "cuda"] if device == "cuda" else ["cpp"]  # cuda: the C++ kernel with C++ autograd
    return ["released-style", "reference", "autograd-floor"] + fused


def _step_fn(provider, alpha_d, device):
    if provider == "released-style":
        state = {"g": 0.0}
        return lambda *lp: released_style_step(*lp, state, alpha_d)[0]
    if provider == "autograd-floor":
        return lambda *lp: (lp[0] * lp[1]).sum()
    if provider == "reference":
        g = torch.zeros((), device=device)
        cfg = DAMOConfig()
        return lambda *lp: damo_step_reference(*lp, 0.1, g, cfg, alpha_d=alpha_d).loss
    g = torch.zeros((), device=device)
    step = torch.zeros((), dtype=torch.int64, device=device)
    return lambda *lp: F.damo_step(*lp, running_mean=g, alpha_d=alpha_d, step=step, increment_step=True,
                                   inplace=True, check_inputs=False, backend=provider).loss


def _launches_and_syncs(fn, leaves, device):
    if device != "cuda":
        return None, None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*leaves)
        torch.cuda.synchronize()
    launches = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn(*leaves)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    return launches, syncs


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["released-style", "reference", "autograd-floor", "triton", "cuda", "cpp"])
@pytest.mark.parametrize("N", [16, 256, 4096, 16384])  # 16384: past one Triton program (multi-program path)
def test_damo_step(benchmark, device, quick, mode, provider, N):
    if quick and N != 16:
        pytest.skip("--quick")
    if provider not in _providers(device):
        pytest.skip(f"{provider} is not benchmarked on {device}")
    if provider == "autograd-floor" and mode == "fwd":
        pytest.skip("the autograd floor is a backward cost")
    if provider in _dispatch.BACKENDS and _dispatch.not_supported_reasons("damo_step", provider, device, torch.float32):
        pytest.skip(f"{provider} cannot run here")
    if provider == "cuda" and N > CUDA_MAX_N:
        pytest.skip("past one thread block the cuda backend runs the Triton multi-program path (measured as triton)")
    g = torch.Generator(device=device).manual_seed(0)
    logps = [-20 + 3 * torch.randn(N, device=device, generator=g) for _ in range(4)]
    alpha_d = 0.5 + torch.rand(N, device=device, generator=g)
    fn = _step_fn(provider, alpha_d, device)
    if mode == "fwd":
        step = fn
        setup = lambda: tuple(logps)  # noqa: E731
    else:
        def step(*lp):
            loss = fn(*lp)
            return torch.autograd.grad(loss, lp[:2])
        setup = lambda: tuple(t.detach().requires_grad_(i < 2) for i, t in enumerate(logps))  # noqa: E731
    launches, syncs = _launches_and_syncs(step, setup(), device)
    benchmark.group = f"damo_step {mode} N={N}"
    run_case(benchmark, device, step, setup, op="damo_step", mode=mode, provider=provider, shape=f"N={N}",
             dtype="torch.float32", rounds=50 if device == "cuda" else 20, cuda_launches=launches, host_syncs=syncs)
