"""Sequence log-probabilities straight from hidden states and the LM head (docs/math.md section 1).

Same result as ``sequence_logps(hidden @ weight.T + bias, labels)`` without ever holding the logits of
all tokens: only positions whose label is not ignored are gathered (prompt and image positions cost
nothing), and those are processed in chunks of ``chunk`` rows: logits of one chunk (matmul in the
hidden states' dtype; fp32 for fp16/bf16 on CPU), then the fused log-prob kernel of ``sequence_logps``.
Backward recomputes each chunk's logits, turns them into their gradient in place (kernel ``bwd`` in
place), and accumulates grad_hidden, grad_weight and grad_bias: 4 matmuls of (M x V x H) per step
instead of 3, memory O(chunk x V) instead of O(B x T x V).

Model families whose forward transforms the head's output (Gemma-2's final logit soft-capping, Cohere's
logit scale, Granite's logit divisor: mmalign/models/logits.py) pass ``scale`` and ``softcap``: the logits are
z = softcap * tanh(scale * (hidden @ weight.T + bias) / softcap), applied to each chunk in place, and the
backward multiplies the chunk's gradient by scale * (1 - tanh^2).
"""
from __future__ import annotations

import torch

from .sequence_logps import acc_dtype, backward, forward, token_logps_reference


def fused_linear_token_logps_reference(hidden, weight, labels, bias=None, ignore_index: int = -100,
                                       scale: float = 1.0, softcap: float | None = None):
    """tok[b,t] of docs/math.md section 1 with z = hidden @ weight.T + bias (times ``scale``, then soft-capped:
    softcap * tanh(z / softcap), when given); (B,T,H), (V,H), (B,T) -> (B,T)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return token_logps_reference(transform_logits(logits, scale, softcap), labels, ignore_index)


def transform_logits(z: torch.Tensor, scale: float = 1.0, softcap: float | None = None) -> torch.Tensor:
    """softcap * tanh(scale * z / softcap), out of place and differentiable (each step only when set)."""
    if scale != 1.0:
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _transform_(z: torch.Tensor, scale: float, softcap: float | None, slope: bool = False) -> torch.Tensor | None:
    """z <- softcap * tanh(scale * z / softcap) in place (each step only when set). With ``slope`` and a
    softcap, returns 1 - tanh^2, the derivative of the cap (a new chunk-sized buffer), for the backward."""
    if scale != 1.0:
        z.mul_(scale)
    if softcap is None:
        return None
    t = z.div_(softcap).tanh_()
    d = t.square().neg_().add_(1) if slope else None
    t.mul_(softcap)
    return d


def chunk_rows(vocab: int, dtype: torch.dtype, memory_budget_mb: float) -> int:
    """Rows per chunk so that one chunk of logits (rows x vocab in ``dtype``) fits the budget.
    At least 16 rows; a multiple of 64 from 64 rows up (matmul tiles)."""
    rows = int(memory_budget_mb * 2**20) // (vocab * torch.finfo(dtype).bits // 8)
    return max(16, rows // 64 * 64 if rows >= 64 else rows)


def _add_product_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b for fp16/bf16 a, b. On CUDA with torch >= 2.8 the product is accumulated in
    fp32 by cuBLAS (addmm with out_dtype); elsewhere it is rounded to a's dtype first, so the error of
    grad_weight grows like sqrt(number of chunks) times one rounding."""
    if acc.device.type == "cuda" and _MIXED_ADDMM.get("ok", True):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _MIXED_ADDMM["ok"] = True
            return
        except (TypeError, RuntimeError, NotImplementedError):  # torch < 2.8: no mixed-precision addmm
            _MIXED_ADDMM["ok"] = False
    acc += a @ b


_MIXED_ADDMM: dict[str, bool] = {}


def _linear(h, weight, bias):
    return torch.addmm(bias, h, weight.T) if bias is not None else h @ weight.T


def _in_work_dtype(weight: torch.Tensor, bias: torch.Tensor | None):
    """(dtype of the chunk matmuls, weight and bias in it): the weight's own, except fp16/bf16 on CPU, which
    run in fp32. CPU GEMMs in half precision are slow or pathological without native support (bf16
    (512 x 32000) @ (32000 x 256) took 12 s on an AVX2 EPYC against 0.16 s upcast to fp32, torch 2.14)."""
    half = weight.dtype in (torch.float16, torch.bfloat16)
    work = torch.float32 if half and weight.device.type == "cpu" else weight.dtype
    return work, weight.to(work), None if bias is None else bias.to(work)


class FusedLinearTokenLogpsFunction(torch.autograd.Function):
    """(M, H) selected hidden rows, (V, H) weight, (V,) bias or None, (M,) labels -> (M,) log-probs.

    Saves the selected hidden rows, weight, bias, labels and the (M,) logsumexp; nothing of size V
    per token. ``accumulate_fp32`` accumulates grad_weight/grad_bias across chunks in fp32 (for
    fp16/bf16 weights split into several chunks), then casts once."""

    @staticmethod
    def forward(ctx, h, weight, bias, labels, ignore_index: int, backend: str, chunk: int, accumulate_fp32: bool,
                scale: float = 1.0, softcap: float | None = None):
        M = h.shape[0]
        tok = h.new_empty(M, dtype=acc_dtype(h.dtype))
        lse = torch.empty_like(tok)
        work, w, b = _in_work_dtype(weight, bias)
        for s in range(0, M, chunk):
            e = min(M, s + chunk)
            z = _linear(h[s:e].to(work), w, b)
            _transform_(z, scale, softcap)  # in the matmul's dtype, as the model's own forward does it
            t, l = forward(backend, z.unsqueeze(0), labels[s:e].unsqueeze(0), ignore_index)
            tok[s:e], lse[s:e] = t[0], l[0]
        ctx.save_for_backward(h, weight, bias, labels, lse)
        ctx.cfg = (ignore_index, backend, chunk, accumulate_fp32, scale, softcap)
        return tok

    @staticmethod
    def backward(ctx, grad_tok):
        with torch.autocast(grad_tok.device.type, enabled=False):  # the forward's dtypes, whatever the caller's
            return FusedLinearTokenLogpsFunction._backward(ctx, grad_tok)

    @staticmethod
    def _backward(ctx, grad_tok):
        h, weight, bias, labels, lse = ctx.saved_tensors
        ignore_index, backend, chunk, accumulate_fp32, scale, softcap = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        M = h.shape[0]
        grad = grad_tok.to(lse.dtype).contiguous()
        work, w, b = _in_work_dtype(weight, bias)
        wide = accumulate_fp32 and M > chunk and work in (torch.float16, torch.bfloat16)
        acc = torch.float32 if wide else work
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for s in range(0, M, chunk):
            e = min(M, s + chunk)
            hc = h[s:e].to(work)
            z = _linear(hc, w, b)
            slope = _transform_(z, scale, softcap, slope=True)
            dz = backward(backend, grad[s:e].unsqueeze(0), z.unsqueeze(0), labels[s:e].unsqueeze(0),
                                   lse[s:e].unsqueeze(0), ignore_index, True)[0]
            if slope is not None:
                dz.mul_(slope)
            if scale != 1.0:
                dz.mul_(scale)
            if need_h:
                if work == h.dtype:
                    torch.mm(dz, w, out=grad_h[s:e])
                else:
                    grad_h[s:e] = dz @ w
            if need_w:
                if wide:
                    _add_product_fp32(grad_w, dz.T, hc)
                else:
                    grad_w.addmm_(dz.T, hc)
            if need_b:
                grad_b += dz.sum(0, dtype=acc)
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None
