"""Thin modules: each stores its configuration and calls one function of mmalign.functional."""
from __future__ import annotations

import dataclasses

import torch

from . import functional as F


class SequenceLogps(torch.nn.Module):
    """Module form of :func:`mmalign.functional.sequence_logps` (SPEC.md section 1)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "sum", inplace_backward: bool = False,
                 backend: str | None = None):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction
        self.inplace_backward, self.backend = inplace_backward, backend

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.sequence_logps(logits, labels, ignore_index=self.ignore_index, reduction=self.reduction,
                                inplace_backward=self.inplace_backward, backend=self.backend)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, backend={self.backend!r}"


class FusedLinearSequenceLogps(torch.nn.Module):
    """Module form of :func:`mmalign.functional.fused_linear_sequence_logps`; takes the LM head's
    weight/bias at call time (the module owns no parameters)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "sum", chunk_size: int | None = None,
                 memory_budget_mb: float = 256.0, logit_scale: float = 1.0, logit_softcap: float | None = None,
                 backend: str | None = None):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction
        self.chunk_size, self.memory_budget_mb, self.backend = chunk_size, memory_budget_mb, backend
        self.logit_scale, self.logit_softcap = logit_scale, logit_softcap

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.fused_linear_sequence_logps(hidden, weight, labels, bias=bias, ignore_index=self.ignore_index,
                                             reduction=self.reduction, chunk_size=self.chunk_size,
                                             memory_budget_mb=self.memory_budget_mb, logit_scale=self.logit_scale,
                                             logit_softcap=self.logit_softcap, backend=self.backend)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, chunk_size={self.chunk_size}"


class DAMOLoss(torch.nn.Module):
    """The DAMO loss (SPEC.md section 3) as a module: holds the configuration, the running mean g and the
    step counter as buffers (saved in ``state_dict``, restored on load), and the seed of the sampled
    selection (saved as extra state). Each training-mode call runs :func:`mmalign.functional.damo_step`
    in one launch, updates g in place and increments ``step`` on the device (no host synchronization
    with ``check_inputs=False``); eval-mode calls use g without updating it.

    Gradient accumulation: statistics (S, alpha_M, g) are taken per call, i.e. per micro-batch; a
    trainer that wants them over the whole accumulated batch gathers the micro-batches' log-probs and
    calls once."""

    def __init__(self, beta: float = 0.1, preset: str | None = "damo", seed: int = 0, check_inputs: bool = True,
                 backend: str | None = None, **config):
        super().__init__()
        from .ops.damo_step import DAMOConfig

        self.config = DAMOConfig.from_preset(preset, **config)
        if not isinstance(beta, (int, float)) or not beta > 0:
            raise ValueError(f"beta: expected a float > 0, got {beta!r}")
        self.beta, self.seed, self.check_inputs, self.backend = float(beta), int(seed), check_inputs, backend
        self.register_buffer("running_mean", torch.zeros((), dtype=torch.float32))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def forward(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                alpha_d: torch.Tensor | None = None, weights: torch.Tensor | None = None, group=None):
        return F.damo_step(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                           self.running_mean, beta=self.beta, alpha_d=alpha_d, config=self.config,
                           weights=weights, seed=self.seed, step=self.step,
                           increment_step=self.training, inplace=self.training, group=group,
                           check_inputs=self.check_inputs, backend=self.backend)

    def _apply(self, fn, recurse=True):
        """Device moves follow the module; dtype casts (``model.bfloat16()``, ``.half()``, ``.double()``,
        ``.to(dtype)`` of a model holding this loss) leave the running mean float32, the dtype of the
        kernels' state, and its value exact (a bf16 round trip would change it)."""
        g = self.running_mean
        super()._apply(fn, recurse)
        if self.running_mean.dtype != torch.float32:
            self.running_mean = g.to(self.running_mean.device)
        return self

    def get_extra_state(self):
        return {"seed": self.seed, "config": dataclasses.asdict(self.config), "beta": self.beta}

    def set_extra_state(self, state):
        from .ops.damo_step import DAMOConfig

        self.seed, self.beta = int(state["seed"]), float(state["beta"])
        self.config = DAMOConfig(**state["config"])

    def extra_repr(self) -> str:
        return f"beta={self.beta}, seed={self.seed}, config={self.config}"
