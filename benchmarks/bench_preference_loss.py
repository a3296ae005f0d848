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
@pytest.mark.parametrize("provider", ["eager", "triton", "cuda", "cpp", "reference"])
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
    # microsecond-scale calls: many rounds, or the first-call noise of a few rounds decides the median
    run_case(benchmark, device, step, setup, op="preference_loss", mode="fwd+bwd", provider=provider,
             shape=f"N={N}", dtype="float32", rounds=50 if quick else 300)


def _hidden_case(device, quick):
    if device == "cuda":
        return 8, 1024, 4096, 32000, torch.bfloat16
    return (2, 128, 256, 32000, torch.float32) if quick else (4, 256, 256, 32000, torch.float32)


@pytest.mark.parametrize("provider", ["eager", "mmalign", "liger"])
def test_dpo_loss_from_hidden_states(benchmark, device, quick, provider):
    """The DPO loss straight from the final hidden states and the LM head, forward + backward: eager
    (full logits, fp32 log_softmax, gather), mmalign (fused_linear_sequence_logps + preference_loss) and
    Liger-Kernel's chunked LigerFusedLinearDPOLoss (when installed). Reference log-probs are 0 for all
    three (Liger's module computes them itself otherwise), so the work compared is the policy's."""
    pairs, T, H, V, dtype = _hidden_case(device, quick)
    if provider == "liger":
        liger = pytest.importorskip("liger_kernel.chunked_loss")
        loss_mod = liger.LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False, compiled=device == "cuda")
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(2 * pairs, T, H, device=device, dtype=dtype, generator=g)
    weight = (torch.randn(V, H, device=device, dtype=dtype, generator=g) / H ** 0.5)
    labels = torch.randint(0, V, (2 * pairs, T), device=device, generator=g)
    labels[:, : T // 4] = -100  # the prompt
    zeros = torch.zeros(pairs, device=device)

    def setup():
        return hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()

    def step(h, w):
        if provider == "liger":
            loss = loss_mod(w, h, labels)[0]
        else:
            if provider == "eager":
                lp = torch.log_softmax((h @ w.T).float(), -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
                logps = (lp * (labels != -100)).sum(1)
            else:
                logps = F.fused_linear_sequence_logps(h, w, labels)
            pc, pr = logps.float().chunk(2)
            loss = F.preference_loss(pc, pr, zeros, zeros, 0.1).loss
        loss.backward()
        return loss

    benchmark.group = f"dpo loss from hidden states fwd+bwd pairs={pairs} T={T} H={H} V={V}"
    run_case(benchmark, device, step, setup, op="dpo_from_hidden", mode="fwd+bwd", provider=provider,
             shape=f"pairs={pairs} T={T} H={H} V={V} {str(dtype).replace('torch.', '')}", rounds=None if not quick else 2)
