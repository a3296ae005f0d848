"""preference_loss against the reference of docs/math.md section 2, every backend."""
import pytest
import torch
import torch.nn.functional as TF

import mmalign.functional as F
from mmalign.ops.preference_loss import preference_loss_reference

from .._numerics import cases

OP = "preference_loss"


def _logps(g, N, device, dtype=torch.float64):
    return [(-5 + 2 * torch.randn(N, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype) for _ in range(4)]


@pytest.mark.parametrize("device,backend,dtype", cases(OP))
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("beta_kind", ["float", "tensor0", "per_pair"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_reference(rng, poison, device, backend, dtype, loss_type, beta_kind, reduction):
    N = 17
    logps = [t.requires_grad_() for t in _logps(rng, N, device)]
    beta = {"float": 0.3, "tensor0": torch.tensor(0.3, dtype=dtype, device=device),
            "per_pair": (0.05 + torch.rand(N, generator=rng, dtype=dtype)).to(device)}[beta_kind]
    weights = torch.rand(N, generator=rng, dtype=dtype).to(device)
    kw = dict(loss_type=loss_type, label_smoothing=0.1 if loss_type == "sigmoid" else 0.0, weights=weights,
              reduction=reduction)
    out = F.preference_loss(*logps, beta, backend=backend, **kw)
    ref = preference_loss_reference(*logps, beta, **kw)
    for name in out._fields:
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), msg=name)
    gout = torch.autograd.grad(out.loss.sum(), logps)
    gref = torch.autograd.grad(ref.loss.sum(), logps)
    for a, b in zip(gout, gref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device,backend,dtype", cases(OP))
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_gradcheck(rng, device, backend, dtype, loss_type):
    logps = [t.requires_grad_() for t in _logps(rng, 5, device)]
    beta = (0.1 + torch.rand(5, generator=rng, dtype=dtype)).to(device)
    assert torch.autograd.gradcheck(
        lambda *x: F.preference_loss(*x, beta, loss_type=loss_type, label_smoothing=0.2 * (loss_type == "sigmoid"),
                                     backend=backend).loss, logps)


@pytest.mark.parametrize("device,backend,dtype", cases(OP, (torch.float32,)))
def test_mixed_input_dtypes_compute_in_the_promoted_dtype(rng, poison, device, backend, dtype):
    """A float64 policy with float32 reference log-probs: float64 results, as the reference gives."""
    logps = [t.to(dt).requires_grad_() for t, dt in
             zip(_logps(rng, 9, device), (torch.float64, torch.float64, torch.float32, torch.float32))]
    out, ref = F.preference_loss(*logps, 0.3, backend=backend), preference_loss_reference(*logps, 0.3)
    for name in out._fields:
        assert getattr(out, name).dtype == getattr(ref, name).dtype, name
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), msg=name)
    for a, b in zip(torch.autograd.grad(out.loss, logps), torch.autograd.grad(ref.loss, logps)):
        torch.testing.assert_close(a, b)


def test_dpo_is_the_textbook_formula(rng):
    pc, pr, rc, rr = _logps(rng, 8, "cpu")
    out = F.preference_loss(pc, pr, rc, rr, 0.1)
    u = (pc - rc) - (pr - rr)
    torch.testing.assert_close(out.loss, -TF.logsigmoid(0.1 * u).mean())
    torch.testing.assert_close(out.margins, 0.1 * u)
    assert torch.equal(out.accuracies, u > 0)


def test_beta_is_a_constant(rng):
    """A beta that depends on the inputs contributes no gradient (docs/math.md section 2)."""
    pc, pr, rc, rr = [t.requires_grad_() for t in _logps(rng, 6, "cpu")]
    beta = torch.sigmoid(pc)  # depends on pc
    (g,) = torch.autograd.grad(F.preference_loss(pc, pr, rc, rr, beta).loss, pc)
    u = ((pc - rc) - (pr - rr)).detach()
    torch.testing.assert_close(g, -beta.detach() * torch.sigmoid(-beta.detach() * u) / 6)


@pytest.mark.parametrize("args,match", [
    (dict(beta=0.0), "beta: expected beta > 0"),
    (dict(beta=-1.0), "beta: expected beta > 0"),
    (dict(beta=torch.tensor([0.1, -0.1, 0.1, 0.1])), "beta: expected every beta > 0"),
    (dict(beta=torch.ones(3)), r"beta: expected a float, a 0-dim tensor or shape \(4,\)"),
    (dict(loss_type="kto"), "loss_type: expected one of"),
    (dict(reduction="sum"), "reduction: expected one of"),
    (dict(weights=torch.ones(5)), r"weights: expected shape \(4,\)"),
    (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing: only loss_type='sigmoid' smooths labels"),
])
def test_bad_arguments(args, match):
    logps = [torch.zeros(4) - 1 for _ in range(4)]
    with pytest.raises((ValueError, TypeError), match=match):
        F.preference_loss(*logps, **args)


def test_mismatched_inputs_name_the_argument():
    a = torch.zeros(4)
    with pytest.raises(ValueError, match=r"ref_rejected_logps: expected shape \(4,\)"):
        F.preference_loss(a, a, a, torch.zeros(5))
    with pytest.raises(ValueError, match="ref_chosen_logps: expected device cpu"):
        F.preference_loss(a, a, a.to("meta"), a)
    with pytest.raises(ValueError, match="policy_rejected_logps: expected finite values"):
        F.preference_loss(a, a + float("nan"), a, a)
