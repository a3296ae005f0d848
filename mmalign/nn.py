"""Thin modules: each stores its configuration and calls one function of mmalign.functional."""
from __future__ import annotations

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
                 memory_budget_mb: float = 256.0, backend: str | None = None):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction
        self.chunk_size, self.memory_budget_mb, self.backend = chunk_size, memory_budget_mb, backend

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.fused_linear_sequence_logps(hidden, weight, labels, bias=bias, ignore_index=self.ignore_index,
                                             reduction=self.reduction, chunk_size=self.chunk_size,
                                             memory_budget_mb=self.memory_budget_mb, backend=self.backend)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, chunk_size={self.chunk_size}"
