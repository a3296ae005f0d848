"""Sequence log-probabilities of labels under logits (docs/math.md section 1).

    tok[b,t] = z[b,t,y[b,t]] - logsumexp_v z[b,t,v]        (0 where y == ignore_index)
    logp[b]  = sum_t tok[b,t]                              (reduction="sum")
             = sum_t tok[b,t] / n_b                        (reduction="mean"; 0 tokens -> 0)
    d logp[b] / d z[b,t,v] = 1[v = y] - softmax(z[b,t])_v  (non-ignored positions; 0 elsewhere)

Layers, top to bottom: the eager reference; the Triton kernels (one program per row, online logsumexp
over vocabulary blocks, fp32 accumulation, never a full-row buffer); their launchers and operators
(``mmalign::token_logps_fwd_triton``, ``token_logps_bwd_triton``, ``token_logps_bwd_triton_``: the schemas of
the C++ operators ``mmalign::token_logps_fwd``, ``token_logps_bwd``, ``token_logps_bwd_`` that back the cpp and
cuda backends); the autograd Function over per-token values, which calls the chosen backend's operators. The
reduction over T is plain PyTorch on a (B, T) tensor.
"""
from __future__ import annotations

import torch

from .._triton import interpreting, next_power_of_2, tl, triton
from ._library import bump_versions, operator

# ----------------------------------------------------------------------------------------------------
# Reference (docs/math.md section 1, literally)
# ----------------------------------------------------------------------------------------------------


def token_logps_reference(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """tok[b,t] = z[b,t,y] - logsumexp_v z[b,t,v], 0 where y == ignore_index.

    logits (B, T, V) any float dtype (fp16/bf16 computed in fp32); labels (B, T) int64.
    Returns (B, T) in fp32 (fp64 for fp64 logits). Differentiable through eager autograd."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    valid = labels != ignore_index
    safe = labels.masked_fill(~valid, 0)
    tok = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
    return torch.where(valid, tok, torch.zeros((), dtype=tok.dtype, device=tok.device))


def reduce_token_logps(tok: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """(B, T) per-token values -> (B,) per-sequence values, "sum" or "mean" over non-ignored tokens."""
    total = tok.sum(dim=-1)
    if reduction == "sum":
        return total
    count = (labels != ignore_index).sum(dim=-1).clamp(min=1)
    return total / count.to(total.dtype)


def sequence_logps_reference(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                             reduction: str = "sum") -> torch.Tensor:
    """logp[b] of docs/math.md section 1: (B, T, V), (B, T) -> (B,)."""
    return reduce_token_logps(token_logps_reference(logits, labels, ignore_index), labels, ignore_index, reduction)


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _token_logps_fwd_kernel(Z, Y, TOK, LSE, T, V, stride_z_b, stride_z_t, ignore_index,
                            BLOCK_V: tl.constexpr, ACC_FP64: tl.constexpr):
    """One program per row (b, t): online logsumexp over BLOCK_V-wide vocabulary blocks."""
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(Y + row)
    valid = y != ignore_index
    z_row = Z + (row // T) * stride_z_b + (row % T) * stride_z_t
    acc = tl.float64 if ACC_FP64 else tl.float32
    m = tl.full((), float("-inf"), acc)
    s = tl.zeros((), acc)
    n = tl.where(valid, V, 0)  # ignored rows run no iteration and read nothing
    for start in range(0, n, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(z_row + cols, mask=cols < V, other=float("-inf")).to(acc)
        m_new = tl.maximum(m, tl.max(x, 0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row of -inf logits stays finite-safe
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), 0)
        m = m_new
    lse = m + tl.log(tl.where(valid, s, 1.0))  # ignored rows: s = 0, keep log() finite
    z_y = tl.load(z_row + tl.where(valid, y, 0)).to(acc)
    tl.store(TOK + row, tl.where(valid, z_y - lse, 0.0))
    tl.store(LSE + row, tl.where(valid, lse, 0.0))


@triton.jit
def _token_logps_bwd_kernel(O, Z, Y, G, LSE, T, V, stride_z_b, stride_z_t, stride_o_b, stride_o_t, ignore_index,
                            BLOCK_V: tl.constexpr, ACC_FP64: tl.constexpr):
    """grad[b,t,v] = g[b,t] * (1[v == y] - exp(z - lse)); zeros for ignored rows (which read nothing).
    O may be Z itself (in-place backward): each element is read before it is written, by one program."""
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(Y + row)
    valid = y != ignore_index
    acc = tl.float64 if ACC_FP64 else tl.float32
    g = tl.where(valid, tl.load(G + row).to(acc), 0.0)
    lse = tl.where(valid, tl.load(LSE + row).to(acc), 0.0)
    z_row = Z + (row // T) * stride_z_b + (row % T) * stride_z_t
    o_row = O + (row // T) * stride_o_b + (row % T) * stride_o_t
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inside = cols < V
        x = tl.load(z_row + cols, mask=inside & valid, other=float("-inf")).to(acc)
        grad = g * (tl.where(cols == y, 1.0, 0.0) - tl.exp(x - lse))
        tl.store(o_row + cols, grad.to(O.dtype.element_ty), mask=inside)


# ----------------------------------------------------------------------------------------------------
# Launchers: fwd(logits, labels, ignore_index) -> (tok, lse); bwd_into(out, grad, logits, labels, lse, ii)
# logits (B, T, V) with stride(2) == 1; labels (B, T) contiguous int64; tok/lse/grad (B, T) acc dtype.
# ----------------------------------------------------------------------------------------------------


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / output dtype of the log-prob ops: fp64 for fp64 logits, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_v(V: int) -> int:
    # GPU: 4096-wide blocks, 8 warps (16 elements per thread per iteration: enough loads in flight at
    # V >= 32k, no spills). Interpreter: one numpy op per block, so wide blocks are what makes it fast.
    cap = 65536 if interpreting() else 4096
    return min(next_power_of_2(V), cap)


def _triton_fwd(logits, labels, ignore_index):
    B, T, V = logits.shape
    tok = torch.empty((B, T), dtype=acc_dtype(logits.dtype), device=logits.device)
    lse = torch.empty_like(tok)
    if tok.numel():
        _token_logps_fwd_kernel[(B * T,)](
            logits, labels, tok, lse, T, V, logits.stride(0), logits.stride(1), ignore_index,
            BLOCK_V=_block_v(V), ACC_FP64=logits.dtype == torch.float64, num_warps=8)
    return tok, lse


def _triton_bwd_into(out, grad, logits, labels, lse, ignore_index):
    B, T, V = logits.shape
    if labels.numel():
        _token_logps_bwd_kernel[(B * T,)](
            out, logits, labels, grad, lse, T, V, logits.stride(0), logits.stride(1), out.stride(0),
            out.stride(1), ignore_index, BLOCK_V=_block_v(V), ACC_FP64=logits.dtype == torch.float64,
            num_warps=8)


# ----------------------------------------------------------------------------------------------------
# Operators: the Triton ones (custom ops, opaque to torch.compile like the C++ ones; see damo_step_triton for why
# not triton_op), their fake kernels (also those of the C++ operators: mmalign/ops/_fake.py), and the table of
# each backend's operators
# ----------------------------------------------------------------------------------------------------


def token_logps_fwd_fake(logits, labels, ignore_index):
    return (labels.new_empty(labels.shape, dtype=acc_dtype(logits.dtype)),
            labels.new_empty(labels.shape, dtype=acc_dtype(logits.dtype)))


def token_logps_bwd_fake(grad, logits, labels, lse, ignore_index):
    return logits.new_empty(logits.shape)


def token_logps_bwd_inplace_fake(logits, grad, labels, lse, ignore_index):
    return None


@torch.library.custom_op("mmalign::token_logps_fwd_triton", mutates_args=(),
                         schema="(Tensor logits, Tensor labels, int ignore_index) -> (Tensor, Tensor)")
def token_logps_fwd_triton(logits, labels, ignore_index):
    """(token_logps, lse), both (B, T) in the accumulation dtype; logits with a contiguous vocabulary dimension."""
    return _triton_fwd(logits, labels, ignore_index)


@torch.library.custom_op("mmalign::token_logps_bwd_triton", mutates_args=(),
                         schema="(Tensor grad, Tensor logits, Tensor labels, Tensor lse, int ignore_index) -> Tensor")
def token_logps_bwd_triton(grad, logits, labels, lse, ignore_index):
    """The gradient w.r.t. logits, a new contiguous (B, T, V) tensor in the logits' dtype."""
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _triton_bwd_into(out, grad, logits, labels, lse, ignore_index)
    return out


@torch.library.custom_op("mmalign::token_logps_bwd_triton_", mutates_args=("logits",),
                         schema="(Tensor(a!) logits, Tensor grad, Tensor labels, Tensor lse, int ignore_index) -> ()")
def token_logps_bwd_triton_(logits, grad, labels, lse, ignore_index):
    """The same gradient written over ``logits`` itself (declared: autograd sees the version bump)."""
    _triton_bwd_into(logits, grad, logits, labels, lse, ignore_index)


token_logps_fwd_triton.register_fake(token_logps_fwd_fake)
token_logps_bwd_triton.register_fake(token_logps_bwd_fake)
token_logps_bwd_triton_.register_fake(token_logps_bwd_inplace_fake)

# backend -> (forward, backward, backward in place): the names of the operators in torch.ops.mmalign
OPERATORS = {"triton": ("token_logps_fwd_triton", "token_logps_bwd_triton", "token_logps_bwd_triton_"),
             "cuda": ("token_logps_fwd", "token_logps_bwd", "token_logps_bwd_"),
             "cpp": ("token_logps_fwd", "token_logps_bwd", "token_logps_bwd_")}


def forward(backend: str, logits, labels, ignore_index: int):
    """(token_logps, lse) by ``backend``'s operator."""
    return operator(OPERATORS[backend][0])(logits, labels, ignore_index)


def backward(backend: str, grad, logits, labels, lse, ignore_index: int, inplace: bool):
    """The gradient w.r.t. logits by ``backend``'s operator; with ``inplace`` written over ``logits`` (returned)."""
    fwd, bwd, bwd_ = OPERATORS[backend]
    if inplace:
        operator(bwd_)(logits, grad, labels, lse, ignore_index)
        if backend != "triton":  # the Triton operator (a custom op) bumps its own
            bump_versions(logits)
        return logits
    return operator(bwd)(grad, logits, labels, lse, ignore_index)


# ----------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------


class TokenLogpsFunction(torch.autograd.Function):
    """(B, T, V) logits, (B, T) labels -> (B, T) per-token log-probs with a fused backward.

    Saves the logits (no copy), labels and the (B, T) logsumexp. With ``inplace_backward`` the gradient
    is written over the logits buffer: only valid when nothing else reads those logits afterwards."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index: int, backend: str, inplace_backward: bool):
        tok, lse = forward(backend, logits, labels, ignore_index)
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index, ctx.backend, ctx.inplace = ignore_index, backend, inplace_backward
        return tok

    @staticmethod
    def backward(ctx, grad_tok):
        logits, labels, lse = ctx.saved_tensors
        grad = grad_tok.to(lse.dtype).contiguous()
        grad_logits = backward(ctx.backend, grad, logits, labels, lse, ctx.ignore_index, ctx.inplace)
        return grad_logits, None, None, None, None
