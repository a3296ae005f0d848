"""Preference losses with a per-pair beta (docs/math.md section 2): the eager reference.

    logr_w = logp_pi(y_w) - logp_ref(y_w),  logr_l likewise,  u = logr_w - logr_l,  m = beta * u
    sigmoid (DPO, Eq. 3): -(1 - eps) logsig(m) - eps logsig(-m)
    ipo:                  (u - 1 / (2 beta))^2
    hinge (SLiC):         max(0, 1 - m)
    rewards r_w = beta * logr_w, r_l = beta * logr_l (detached); margin r_w - r_l; accuracy r_w > r_l.
    beta is a constant for gradients, whatever computed it.

The fused path is the DAMO step kernel with no filter and alpha = 1 (mmalign/ops/damo_step.py); this
file holds the formulas both use."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .limits import LOSS_TYPES


class PreferenceLossOutput(NamedTuple):
    """Result of :func:`mmalign.functional.preference_loss`; all but ``loss``/``losses`` are detached. The fields
    are the first six of :class:`mmalign.ops.damo_step.DAMOStepOutput`, in the same order."""

    loss: torch.Tensor  # 0-dim (reduction="mean") or (N,) weighted per-pair losses ("none")
    losses: torch.Tensor  # (N,) per-pair losses, unweighted
    chosen_rewards: torch.Tensor  # (N,) beta * logr_w
    rejected_rewards: torch.Tensor  # (N,) beta * logr_l
    margins: torch.Tensor  # (N,) chosen_rewards - rejected_rewards
    accuracies: torch.Tensor  # (N,) bool, chosen_rewards > rejected_rewards


def check_loss(loss_type: str, label_smoothing: float) -> None:
    """label_smoothing in [0, 0.5), and only with the sigmoid loss (``loss_type`` itself is checked by the caller)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: expected a value in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing: only loss_type='sigmoid' smooths labels (docs/math.md section 2), got "
                         f"label_smoothing={label_smoothing} with loss_type={loss_type!r}")


def pair_loss_reference(u: torch.Tensor, beta: torch.Tensor, loss_type: str = "sigmoid",
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair loss l(beta, u) of docs/math.md section 2 (beta detached by the caller)."""
    m = beta * u
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(m) - label_smoothing * F.logsigmoid(-m)
    if loss_type == "ipo":
        return (u - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - m)
    raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")


def preference_loss_reference(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                              beta, *, loss_type: str = "sigmoid", label_smoothing: float = 0.0, weights=None,
                              reduction: str = "mean") -> PreferenceLossOutput:
    """docs/math.md section 2, literally. Inputs (N,); beta a float or (N,); weights (N,) or None.
    reduction="mean": sum(w * l) / sum(w) (plain mean without weights); "none": w * l per pair."""
    logr_w = policy_chosen_logps - ref_chosen_logps
    logr_l = policy_rejected_logps - ref_rejected_logps
    u = logr_w - logr_l
    beta = torch.as_tensor(beta, dtype=u.dtype, device=u.device).detach()
    losses = pair_loss_reference(u, beta, loss_type, label_smoothing)
    w = torch.ones_like(losses) if weights is None else weights.to(losses.dtype)
    loss = (w * losses).sum() / w.sum() if reduction == "mean" else w * losses
    r_w, r_l = (beta * logr_w).detach(), (beta * logr_l).detach()
    return PreferenceLossOutput(loss, losses, r_w, r_l, r_w - r_l, r_w > r_l)
