"""Public functional API (torch.nn.functional style). Each function checks its arguments, picks a
backend through mmalign._dispatch, and calls the op's autograd Function or its eager reference."""
from __future__ import annotations

import torch

from . import _checks, _dispatch
from .ops.fused_linear_sequence_logps import (FusedLinearTokenLogpsFunction, chunk_rows,
                                              fused_linear_token_logps_reference)
from .ops.sequence_logps import SequenceLogps, TokenLogpsFunction, reduce_token_logps, token_logps_reference

__all__ = ["sequence_logps", "token_logps", "fused_linear_sequence_logps", "SequenceLogps"]


def _check_logps_inputs(logits_name, logits, labels, ignore_index, reduction, check_labels, vocab):
    _checks.tensor(logits_name, logits, dim=3, dtypes=_checks.FLOATS)
    _checks.tensor("labels", labels, shape=tuple(logits.shape[:2]), device=logits.device,
                   dtypes=(torch.int64, torch.int32))
    _checks.choice("reduction", reduction, ("sum", "mean"))
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if check_labels:
        _checks.labels("labels", labels, vocab, ignore_index)


def token_logps(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                inplace_backward: bool = False, check_labels: bool = True, backend: str | None = None) -> torch.Tensor:
    """Per-token label log-probabilities, SPEC.md section 1: ``z[b,t,y] - logsumexp_v z[b,t,v]``.

    Args:
        logits: (B, T, V) float32/float64/float16/bfloat16, already aligned with ``labels`` (z[b,t]
            predicts y[b,t]). Any strides; the vocabulary dimension is made contiguous if it is not.
        labels: (B, T) int64 (int32 accepted), values in [0, V) or ``ignore_index``.
        inplace_backward: write the gradient over ``logits`` (saves one logits-sized buffer). Only when
            nothing else reads these logits after this op's backward.
        check_labels: verify label range (one host synchronization); turn off inside CUDA graphs.
        backend: "triton" | "cuda" | "cpp" | "reference" | None (automatic, see mmalign._dispatch).

    Returns: (B, T) float32 (float64 for float64 logits), 0 at ignored positions. Differentiable w.r.t.
    ``logits``: d/dz = 1[v=y] - softmax(z), 0 at ignored positions."""
    _check_logps_inputs("logits", logits, labels, ignore_index, "sum", check_labels,
                        logits.shape[-1] if isinstance(logits, torch.Tensor) else 0)
    labels = labels.long().contiguous()
    name = _dispatch.select("sequence_logps", logits.device, logits.dtype, backend)
    if name == "reference":
        return token_logps_reference(logits, labels, ignore_index)
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    return TokenLogpsFunction.apply(logits, labels, ignore_index, name, inplace_backward)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                   reduction: str = "sum", return_token_logps: bool = False, inplace_backward: bool = False,
                   check_labels: bool = True, backend: str | None = None):
    """Sequence log-probabilities of the labels, SPEC.md section 1, fused (no log_softmax, no fp32 copy).

    ``logp[b] = sum_t tok[b,t]`` (reduction="sum") or ``/ n_b`` non-ignored tokens ("mean"; 0 tokens
    give 0). Shapes and options as in :func:`token_logps`. Returns (B,) float32 (float64 for float64
    logits), or ``SequenceLogps(logps, token_logps)`` with ``return_token_logps=True``.

    Backends: triton (CUDA), cuda (CUDA C++), cpp (CPU C++), reference (eager)."""
    _checks.choice("reduction", reduction, ("sum", "mean"))
    tok = token_logps(logits, labels, ignore_index=ignore_index, inplace_backward=inplace_backward,
                      check_labels=check_labels, backend=backend)
    logps = reduce_token_logps(tok, labels, ignore_index, reduction)
    return SequenceLogps(logps, tok) if return_token_logps else logps


def fused_linear_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                bias: torch.Tensor | None = None, ignore_index: int = -100,
                                reduction: str = "sum", return_token_logps: bool = False,
                                chunk_size: int | None = None, memory_budget_mb: float = 256.0,
                                accumulate_fp32: bool = True, check_labels: bool = True,
                                backend: str | None = None):
    """``sequence_logps(hidden @ weight.T + bias, labels)`` without the logits of all tokens, SPEC.md §1.

    Only positions whose label is not ``ignore_index`` are computed (gathered first: one host
    synchronization for their count), ``chunk_size`` rows at a time; ``chunk_size=None`` picks the
    largest chunk whose logits fit ``memory_budget_mb``. Gradients flow to hidden, weight and bias.

    Args:
        hidden: (B, T, H) final hidden states, aligned with ``labels`` (position t predicts labels[b,t]).
        weight: (V, H) LM head; bias: (V,) or None. Same dtype and device as ``hidden``.
        labels: (B, T) int64, values in [0, V) or ``ignore_index``.
        accumulate_fp32: accumulate grad_weight/grad_bias in fp32 across chunks for fp16/bf16.
    Returns: (B,) float32 (float64 for float64 inputs), or ``SequenceLogps`` with ``return_token_logps``."""
    _checks.tensor("hidden", hidden, dim=3, dtypes=_checks.FLOATS)
    B, T, H = hidden.shape
    _checks.tensor("weight", weight, dim=2, shape=(None, H), dtypes=(hidden.dtype,), device=hidden.device)
    V = weight.shape[0]
    if bias is not None:
        _checks.tensor("bias", bias, shape=(V,), dtypes=(hidden.dtype,), device=hidden.device)
    _checks.tensor("labels", labels, shape=(B, T), device=hidden.device, dtypes=(torch.int64, torch.int32))
    _checks.choice("reduction", reduction, ("sum", "mean"))
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    if check_labels:
        _checks.labels("labels", labels, V, ignore_index)
    labels = labels.long()
    name = _dispatch.select("fused_linear_sequence_logps", hidden.device, hidden.dtype, backend)
    if name == "reference":
        tok = fused_linear_token_logps_reference(hidden, weight, labels, bias, ignore_index)
    else:
        flat = labels.reshape(-1)
        rows = (flat != ignore_index).nonzero().squeeze(1)
        h_sel = hidden.reshape(B * T, H).index_select(0, rows)
        chunk = chunk_size or chunk_rows(V, hidden.dtype, memory_budget_mb)
        tok_sel = FusedLinearTokenLogpsFunction.apply(h_sel, weight, bias, flat.index_select(0, rows).contiguous(),
                                                      ignore_index, name, chunk, accumulate_fp32)
        tok = tok_sel.new_zeros(B * T).index_copy(0, rows, tok_sel).view(B, T)
    logps = reduce_token_logps(tok, labels, ignore_index, reduction)
    return SequenceLogps(logps, tok) if return_token_logps else logps
