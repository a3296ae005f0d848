"""preference_loss (DPO sigmoid, per-pair β) forward+backward: eager PyTorch (what TRL's DPO loss runs:
log-ratios, logsigmoid, rewards, margins, accuracy as separate ops) vs mmalign's one fused launch, at
N = 16 (one DAMO global batch), 256 and 4096 pairs; fp32 on CPU and GPU."""
import pytest
import torch

import mmalign.functional as F
from mmalign import _dispatch

from conftest import run_case


def eager_dpo(pc, pr, rc, rr, beta):
    logr_w, logr_l = pc - rc, pr - rr
    losses = -torch.nn.functional.logsigmoid(beta * (logr_w - logr_l))
    chosen, rejected = (beta * logr_w).detach(), (beta * logr_l).detach()
    return losses.mean(), chosen, rejected, chosen - rejected, (chosen > rejected).float().mean()


@pytest.mark.parametrize("N", [16, 256, 4096])
@pytest.mark.parametrize("provider", ["eager", "triton", "cpp", "reference"])
def test_preference_loss(benchmark, device, quick, provider, N):
    if quick and N != 16:
        pytest.skip("--quick")
    if provider != "eager" and _dispatch.not_supported_reasons("preference_loss", provider, device, torch.float32):
        pytest.skip(f"{provider} cannot run here")
    g = torch.Generator(device=device).manual_seed(0)
    logps = [torch.randn(N, device=device, generator=g) * 5 - 50 for _ in range(4)]
    beta = torch.full((N,), 0.1, device=device)

    def setup():
        return tuple(t.detach().clone().requires_grad_(i < 2) for i, t in enumerate(logps))

    def step(pc, pr, rc, rr):
        if provider == "eager":
            loss = eager_dpo(pc, pr, rc, rr, beta)[0]
        else:
            loss = F.preference_loss(pc, pr, rc, rr, beta, backend=provider).loss
        loss.backward()
        return loss

    benchmark.group = f"preference_loss fwd+bwd N={N}"
    run_case(benchmark, device, step, setup, op="preference_loss", mode="fwd+bwd", provider=provider,
             shape=f"N={N}", dtype="float32")
