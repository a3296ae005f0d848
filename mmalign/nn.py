"""Thin modules: each stores its configuration and calls one function of mmalign.functional. The configuration and
output types are exported here too (``DAMOConfig``, ``DAMOStepOutput``, ``PreferenceLossOutput``)."""
from __future__ import annotations

import dataclasses

import torch

from . import functional as F
from .functional import DAMOConfig, DAMOStepOutput, PreferenceLossOutput

__all__ = ["SequenceLogps", "FusedLinearSequenceLogps", "PreferenceLoss", "DAMOLoss", "MaskedAttention", "DAMOConfig",
           "DAMOStepOutput", "PreferenceLossOutput"]


class SequenceLogps(torch.nn.Module):
    """Module form of :func:`mmalign.functional.sequence_logps` (docs/math.md section 1): (B, T, V) logits and (B, T)
    labels -> (B,) log-probabilities."""

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


class PreferenceLoss(torch.nn.Module):
    """Module form of :func:`mmalign.functional.preference_loss` (docs/math.md section 2): the four (N,) log-probs ->
    :class:`PreferenceLossOutput`."""

    def __init__(self, beta: float = 0.1, *, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 reduction: str = "mean", check_inputs: bool = True, backend: str | None = None):
        super().__init__()
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.reduction, self.check_inputs, self.backend = reduction, check_inputs, backend

    def forward(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                weights: torch.Tensor | None = None) -> PreferenceLossOutput:
        return F.preference_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                 self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                                 weights=weights, reduction=self.reduction, check_inputs=self.check_inputs,
                                 backend=self.backend)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}"


class DAMOLoss(torch.nn.Module):
    """The DAMO loss (docs/math.md section 3) as a module: holds the configuration (a :class:`DAMOConfig`; None is
    ``DAMOConfig()``, the damo preset; ``DAMOConfig.from_preset(...)`` for the others), the running mean g and the
    step counter as buffers (saved in ``state_dict``, restored on load), the seed of the sampled selection (saved
    as extra state), and the process group of data-parallel training, if any. Each training-mode call runs
    :func:`mmalign.functional.damo_step` in one launch, updates g in place and increments ``step`` on the device
    (no host synchronization with ``check_inputs=False``); eval-mode calls use g without updating it.

    ``group``: a torch.distributed process group whose ranks each hold a slice of the batch (their statistics are
    all-gathered on every call: every rank must call), or None (no communication). A forward call's ``group``
    argument overrides it for that call.

    Gradient accumulation: statistics (S, alpha_M, g) are taken per call, i.e. per micro-batch; a
    trainer that wants them over the whole accumulated batch gathers the micro-batches' log-probs and
    calls once."""

    def __init__(self, beta: float = 0.1, config: DAMOConfig | None = None, *, seed: int = 0, group=None,
                 check_inputs: bool = True, backend: str | None = None):
        super().__init__()
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not beta > 0:
            raise ValueError(f"beta: expected a float > 0, got {beta!r}")
        config = DAMOConfig() if config is None else config
        if not isinstance(config, DAMOConfig):
            raise TypeError(f"config: expected a DAMOConfig (DAMOConfig.from_preset(name, ...) for a preset), "
                            f"got {type(config).__name__}")
        config.validate()
        self.config, self.beta, self.seed, self.group = config, float(beta), int(seed), group
        self.check_inputs, self.backend = check_inputs, backend
        self.register_buffer("running_mean", torch.zeros((), dtype=torch.float32))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def forward(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                alpha_d: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                group=None) -> DAMOStepOutput:
        return F.damo_step(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                           self.beta, running_mean=self.running_mean, config=self.config, alpha_d=alpha_d,
                           weights=weights, seed=self.seed, step=self.step, increment_step=self.training,
                           inplace=self.training, group=self.group if group is None else group,
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
        self.seed, self.beta = int(state["seed"]), float(state["beta"])
        self.config = DAMOConfig(**state["config"])

    def extra_repr(self) -> str:
        return f"beta={self.beta}, seed={self.seed}, config={self.config}"


class MaskedAttention(torch.nn.Module):
    """Module form of :func:`mmalign.functional.masked_attention` (docs/math.md section 7): causal attention in which
    ``key_keep[b, j] = False`` hides key j of sample b (from the queries ``query_scope`` marks, when given)."""

    def __init__(self, causal: bool = True, scale: float | None = None, num_splits: int | None = None,
                 backend: str | None = None):
        super().__init__()
        self.causal, self.scale, self.num_splits, self.backend = causal, scale, num_splits, backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_keep: torch.Tensor | None = None,
                query_scope: torch.Tensor | None = None) -> torch.Tensor:
        return F.masked_attention(q, k, v, key_keep=key_keep, query_scope=query_scope, causal=self.causal,
                                  scale=self.scale, num_splits=self.num_splits, backend=self.backend)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, scale={self.scale}, backend={self.backend!r}"
