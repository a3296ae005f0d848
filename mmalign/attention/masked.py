"""Causal attention with a per-sample key mask (docs/math.md §7: BDHS hides image tokens from attention).

    out[b, h, i] = Σ_j softmax_j(q_i·k_j · scale  over visible j) · v_j

Query i (of Tq) sits at position ``i + Tk - Tq`` of the keys (bottom-right alignment: prefill has
Tq = Tk, decode has the last Tq positions). Key j is visible to query i iff
``j <= i + Tk - Tq`` (when causal) and ``key_keep[b, j]``, or, with ``query_scope``, iff
``key_keep[b, j] or not query_scope[b, i]``: only scoped queries (text tokens, in the "text-only"
variant) lose the hidden keys. Padding is expressed the same way (padded keys not kept). A query row
with no visible key gets 0 (it cannot happen in causal LM use: the first token always sees itself).

Shapes: q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D) with Hq a multiple of Hkv (GQA/MQA); key_keep
(B, Tk) bool, or packed (B, ceil(Tk/8)) uint8 (:func:`pack_keep`); query_scope (B, Tq) bool. D up to 256 (64, 80, 96, 128 are the LLM sizes).

The Triton kernel (FlashAttention-2 style, online softmax in fp32) visits only kept keys: for query
blocks whose queries are all scoped (always, without ``query_scope``) it walks a per-sample list of
kept key indices, so the cost falls with the share of hidden keys, down to the cost of attention
over the compacted sequence; other query blocks walk all keys with the mask. Decode (few query rows,
long caches) splits the keys over ``num_splits`` programs and merges their partial softmaxes.

Backward (FlashAttention-2 style, recomputing the probabilities from the forward's log-sum-exp): one kernel per
key block accumulates dK and dV over the query blocks that can see it, one per query block accumulates dQ; both
walk every key with the mask. The operator ``mmalign::masked_attention_triton`` (forward, with the backward
registered as its autograd formula through ``mmalign::masked_attention_bwd_triton``) runs them; the reference
backend is SDPA with the equivalent boolean mask and autograd.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _dispatch
from .._triton import cdiv, next_power_of_2, tl, triton
from ..ops._library import operator

LOG2E = 1.4426950408889634


# ------------------------------------------------------------------------------------------ reference
def visibility_mask(tq: int, tk: int, key_keep=None, query_scope=None, causal: bool = True, device=None):
    """The boolean (B or 1, 1, Tq, Tk) mask of the module docstring (True = visible)."""
    i = torch.arange(tq, device=device)[:, None] + (tk - tq)
    j = torch.arange(tk, device=device)[None, :]
    mask = (j <= i) if causal else torch.ones(tq, tk, dtype=torch.bool, device=device)
    mask = mask[None, None]
    if key_keep is not None:
        keep = key_keep[:, None, None, :]
        if query_scope is not None:
            keep = keep | ~query_scope[:, None, :, None]
        mask = mask & keep
    return mask


def masked_attention_reference(q, k, v, key_keep=None, *, query_scope=None, causal=True, scale=None):
    """SDPA with the equivalent boolean mask; rows with no visible key give 0. Differentiable."""
    B, Hq, Tq, D = q.shape
    Tk, group = k.shape[2], Hq // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    mask = visibility_mask(Tq, Tk, key_keep, query_scope, causal, q.device).expand(B, 1, Tq, Tk)
    any_visible = mask.any(-1, keepdim=True)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask | ~any_visible,
                                                           scale=scale)
    return out.masked_fill(~any_visible, 0.0)


# ------------------------------------------------------------------------------------------- triton
@triton.jit
def _attend(acc, m_i, l_i, q, K, V, cols, valid, offs_m, offs_d, diag, D, stride_kt, stride_vt,
            CAUSAL: tl.constexpr, EXTRA_MASK: tl.constexpr, extra, DOT_PRECISION: tl.constexpr):
    """One tile of keys ``cols`` (gathered or contiguous): the online-softmax update (log2 domain)."""
    kv_mask = valid[:, None] & (offs_d[None, :] < D)
    k = tl.load(K + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
    vis = valid[None, :]
    if CAUSAL:
        vis = vis & (cols[None, :] <= offs_m[:, None] + diag)
    if EXTRA_MASK:
        vis = vis & extra
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _masked_attn_fwd_kernel(
        Q, K, V, KEEP, SCOPE, IDX, COUNT, O, LSE,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
        stride_ob, stride_oh, stride_ot, stride_os,
        Hq, group, Tq, Tk, D, qk_scale, keys_per_split,
        CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_SCOPE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    b, h = bh // Hq, bh % Hq
    hk = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Tq
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    q = (q.to(tl.float32) * qk_scale).to(Q.dtype.element_ty)  # qk_scale = scale * log2(e)
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    diag = Tk - Tq
    lo = split * keys_per_split
    hi = tl.minimum(Tk, lo + keys_per_split)
    if CAUSAL:
        last_row = tl.minimum(Tq - 1, pid_m * BLOCK_M + BLOCK_M - 1)
        hi = tl.minimum(hi, last_row + diag + 1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    scoped = row_ok
    if HAS_KEEP:
        use_index = 1
        if HAS_SCOPE:
            scoped = tl.load(SCOPE + b * Tq + offs_m, mask=row_ok, other=1) != 0
            use_index = tl.min(scoped.to(tl.int32), 0)  # every query of the block is scoped
        if use_index == 1:
            # walk only the kept keys: IDX[b] lists them in order, COUNT[b, p] = how many lie before p
            c_lo = tl.load(COUNT + b * (Tk + 1) + lo)
            c_hi = tl.load(COUNT + b * (Tk + 1) + tl.maximum(hi, lo))
            for n0 in range(c_lo, c_hi, BLOCK_N):
                j = n0 + offs_n
                valid = j < c_hi
                cols = tl.load(IDX + b * Tk + j, mask=valid, other=0)
                acc, m_i, l_i = _attend(acc, m_i, l_i, q, K, V, cols, valid, offs_m, offs_d, diag, D,
                                        stride_kt, stride_vt, CAUSAL, False, valid[None, :], DOT_PRECISION)
        else:
            for n0 in range(lo, hi, BLOCK_N):
                cols = n0 + offs_n
                valid = cols < hi
                keep = tl.load(KEEP + b * Tk + cols, mask=valid, other=0) != 0
                extra = keep[None, :] | (scoped[:, None] == 0)
                acc, m_i, l_i = _attend(acc, m_i, l_i, q, K, V, cols, valid, offs_m, offs_d, diag, D,
                                        stride_kt, stride_vt, CAUSAL, True, extra, DOT_PRECISION)
    else:
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + offs_n
            valid = cols < hi
            acc, m_i, l_i = _attend(acc, m_i, l_i, q, K, V, cols, valid, offs_m, offs_d, diag, D,
                                    stride_kt, stride_vt, CAUSAL, False, valid[None, :], DOT_PRECISION)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptr = O + split * stride_os + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
    # log2-domain log-sum-exp of the split (-inf where it saw no key): merges the splits
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    tl.store(LSE + (split * tl.num_programs(1) + bh) * Tq + offs_m, lse, mask=row_ok)


@triton.jit
def _visible(offs_m, offs_n, Tq, Tk, diag, KEEP, SCOPE, b, CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr,
             HAS_SCOPE: tl.constexpr):
    """(BLOCK_M, BLOCK_N): key offs_n visible to query offs_m (the module docstring's rule), False out of range."""
    vis = (offs_m[:, None] < Tq) & (offs_n[None, :] < Tk)
    if CAUSAL:
        vis = vis & (offs_n[None, :] <= offs_m[:, None] + diag)
    if HAS_KEEP:
        keep = (tl.load(KEEP + b * Tk + offs_n, mask=offs_n < Tk, other=0) != 0)[None, :]
        if HAS_SCOPE:
            scoped = tl.load(SCOPE + b * Tq + offs_m, mask=offs_m < Tq, other=1) != 0
            keep = keep | (scoped[:, None] == 0)
        vis = vis & keep
    return vis


@triton.jit
def _probabilities(q, k, lse, vis, DOT_PRECISION: tl.constexpr):
    """p = softmax row values recomputed from the forward's log2-domain log-sum-exp; 0 where not visible (rows
    that saw no key have lse = -inf and no visible key)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
    return tl.where(vis, tl.math.exp2(s - lse_safe[:, None]), 0.0)


@triton.jit
def _program_head(Hq, group):
    """(b * Hq + h, b, h, the K/V head of h) of this program (axis 1 of the grid)."""
    bh = tl.program_id(1).to(tl.int64)
    h = bh % Hq
    return bh, bh // Hq, h, h // group


@triton.jit
def _scaled_q(Q, offs_m, offs_d, row_ok, D, stride_qt, qk_scale):
    """(q, q * scale * log2(e) in q's dtype, as the forward multiplies it)."""
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < D),
                other=0.0)
    return q, (q.to(tl.float32) * qk_scale).to(Q.dtype.element_ty)


@triton.jit
def _masked_attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, KEEP, SCOPE, DK, DV,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
        stride_dob, stride_doh, stride_dot, stride_dkb, stride_dkh, stride_dkt,
        Hq, group, Tq, Tk, D, qk_scale, sm_scale,
        CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_SCOPE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One block of keys of one query head: dV = sum_i p_ij dO_i, dK = scale sum_i p_ij (dO_i.v_j - delta_i) q_i,
    over the query blocks that can see it. DK, DV are per query head (B, Hq, Tk, D) float32 (GQA: summed over
    the group by the launcher)."""
    bh, b, h, hk = _program_head(Hq, group)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < Tk) & (offs_d[None, :] < D)
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask,
                other=0.0)
    Q += b * stride_qb + h * stride_qh
    DO += b * stride_dob + h * stride_doh
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    diag = Tk - Tq
    lo = 0
    if CAUSAL:  # query i sees key j from i = j - diag on
        lo = tl.maximum(tl.program_id(0) * BLOCK_N - diag, 0) // BLOCK_M * BLOCK_M
    for m0 in range(lo, Tq, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Tq
        q, qs = _scaled_q(Q, offs_m, offs_d, row_ok, D, stride_qt, qk_scale)
        do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :],
                     mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        lse = tl.load(LSE + bh * Tq + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * Tq + offs_m, mask=row_ok, other=0.0)
        vis = _visible(offs_m, offs_n, Tq, Tk, diag, KEEP, SCOPE, b, CAUSAL, HAS_KEEP, HAS_SCOPE)
        p = _probabilities(qs, k.to(qs.dtype), lse, vis, DOT_PRECISION)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v.to(do.dtype)), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    out = DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
    tl.store(out, dk * sm_scale, mask=kv_mask)
    out = DV + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
    tl.store(out, dv, mask=kv_mask)


@triton.jit
def _masked_attn_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, KEEP, SCOPE, DQ,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
        stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt,
        Hq, group, Tq, Tk, D, qk_scale, sm_scale,
        CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_SCOPE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One block of queries of one head: dQ = scale sum_j p_ij (dO_i.v_j - delta_i) k_j over its visible keys."""
    pid_m = tl.program_id(0)
    bh, b, h, hk = _program_head(Hq, group)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Tq
    q, qs = _scaled_q(Q + b * stride_qb + h * stride_qh, offs_m, offs_d, row_ok, D, stride_qt, qk_scale)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    lse = tl.load(LSE + bh * Tq + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * Tq + offs_m, mask=row_ok, other=0.0)
    K += b * stride_kb + hk * stride_kh
    V += b * stride_vb + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    diag = Tk - Tq
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, tl.minimum(Tq - 1, pid_m * BLOCK_M + BLOCK_M - 1) + diag + 1)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < Tk) & (offs_d[None, :] < D)
        k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        vis = _visible(offs_m, offs_n, Tq, Tk, diag, KEEP, SCOPE, b, CAUSAL, HAS_KEEP, HAS_SCOPE)
        p = _probabilities(qs, k.to(qs.dtype), lse, vis, DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v.to(do.dtype)), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(q.dtype), k.to(q.dtype), input_precision=DOT_PRECISION)
    out = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
    tl.store(out, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


# ------------------------------------------------------------------------------------------ launcher
def _blocks(tq: int, d: int) -> tuple[int, int, int]:
    block_d = max(16, next_power_of_2(d))
    block_m = 16 if tq <= 16 else 64
    block_n = 64 if block_d <= 128 else 32
    return block_m, block_n, block_d


def kept_key_index(key_keep: torch.Tensor):
    """(IDX, COUNT) for the kernel: IDX[b] = kept key positions in order (then the rest), COUNT[b, p] =
    number of kept keys before position p. Built with device ops only (no host synchronization)."""
    B, T = key_keep.shape
    kept_upto = torch.cumsum(key_keep, dim=1, dtype=torch.int32)  # kept keys in [0, j]
    pos = torch.arange(T, dtype=torch.int32, device=key_keep.device).expand(B, T)
    # a kept key goes to its rank among the kept ones, a hidden one after all kept keys, in order (a
    # stable sort by "hidden" without sorting: a sort is several launches and the slowest part on a GPU)
    dest = torch.where(key_keep, kept_upto - 1, kept_upto[:, -1:] + pos - kept_upto)
    idx = torch.empty((B, T), dtype=torch.int32, device=key_keep.device).scatter_(1, dest.long(), pos)
    return idx, torch.nn.functional.pad(kept_upto, (1, 0)).contiguous()


def tensor_version(t: torch.Tensor | None):
    """t's version counter (bumped by every in-place change), -1 for None, None for an inference tensor
    (made under torch.inference_mode: it has no counter, so nothing made from it can be reused safely)."""
    if t is None:
        return -1
    return None if t.is_inference() else t._version


class LastCall:
    """The result of the last call, given again while the same tensors (the same objects at the same
    versions: an in-place change bumps it) and the same other arguments come back: the layers of one
    forward pass the same masks. Inference tensors have no version and are never reused. The tensors held
    here keep their ids from being reused."""

    def __init__(self):
        self._last = None  # (tensors, key, value)

    def get(self, tensors: tuple, args: tuple, build):
        versions = tuple(tensor_version(t) for t in tensors)
        key = None if None in versions else (versions, args)
        last = self._last
        if key is not None and last is not None and last[1] == key and all(a is b for a, b in zip(last[0], tensors)):
            return last[2]
        value = build()
        self._last = (tensors, key, value) if key is not None else None
        return value


_PREPARED = LastCall()


def prepared_keys(key_keep: torch.Tensor):
    """(key_keep as int8, IDX, COUNT) for the kernel, reused for the same mask (LastCall)."""
    return _PREPARED.get((key_keep,), (), lambda: (key_keep.to(torch.int8).contiguous(), *kept_key_index(key_keep)))


def default_splits(B: int, Hq: int, Tq: int, Tk: int, block_m: int, device) -> int:
    """Split the keys when too few (query block, head) programs would fill the GPU (decode)."""
    programs = B * Hq * cdiv(Tq, block_m)
    if device.type != "cuda" or programs >= 256 or Tk < 1024:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(cdiv(2 * sms, programs), Tk // 512, 64))


def _mask_arguments(key_keep, query_scope, device):
    """(keep int8, IDX, COUNT, scope int8) as the kernels take them; placeholders the kernels never read where
    there is no mask."""
    if key_keep is None:
        keep = torch.empty(1, dtype=torch.int32, device=device)
        return keep, keep, keep, keep
    keep, idx, count = prepared_keys(key_keep)
    scope = query_scope.to(torch.int8).contiguous() if query_scope is not None else keep  # unread then
    return keep, idx, count, scope


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(q, k, v, key_keep, query_scope, causal: bool, scale: float, num_splits: int):
    """(out (B, Hq, Tq, D) in q's dtype, lse (B, Hq, Tq) float32: the log2-domain log-sum-exp of each row's
    visible scores, -inf where it sees none)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    block_m, block_n, block_d = _blocks(Tq, D)
    splits = num_splits or default_splits(B, Hq, Tq, Tk, block_m, q.device)
    per_split = cdiv(Tk, splits)
    per_split = cdiv(per_split, block_n) * block_n
    splits = cdiv(Tk, per_split) if Tk else 1
    keep, idx, count, scope = _mask_arguments(key_keep, query_scope, q.device)
    out = torch.empty((splits, B, Hq, Tq, D), dtype=q.dtype if splits == 1 else torch.float32, device=q.device)
    lse = torch.empty((splits, B * Hq, Tq), dtype=torch.float32, device=q.device)
    grid = (cdiv(Tq, block_m), B * Hq, splits)
    sq, sk, sv, so = q.stride(), k.stride(), v.stride(), out.stride()
    _masked_attn_fwd_kernel[grid](
        q, k, v, keep, scope, idx, count, out, lse, sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sv[0], sv[1], sv[2],
        so[1], so[2], so[3], so[0],
        Hq, Hq // Hkv, Tq, Tk, D, scale * LOG2E, per_split,
        CAUSAL=causal, HAS_KEEP=key_keep is not None, HAS_SCOPE=query_scope is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, num_stages=2)
    lse = lse.view(splits, B, Hq, Tq)
    if splits == 1:
        return out[0], lse[0]
    return merge_splits(out, lse).to(q.dtype), merge_lse(lse)


def merge_splits(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Combine per-split normalized outputs (S, B, H, Tq, D) with their log2 log-sum-exps (S, B, H, Tq)."""
    top = lse.max(0).values
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    w = torch.exp2(lse - top)  # 0 for splits that saw no key
    total = w.sum(0)
    return (w.unsqueeze(-1) * out).sum(0) / torch.where(total == 0, 1.0, total).unsqueeze(-1)


def merge_lse(lse: torch.Tensor) -> torch.Tensor:
    """The log2 log-sum-exp of whole rows from the splits' (S, B, H, Tq); -inf where no split saw a key."""
    top = lse.max(0).values
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    return top + torch.log2(torch.exp2(lse - top).sum(0))


def _bwd_blocks(d: int) -> tuple[int, int, int]:
    block_d = max(16, next_power_of_2(d))
    block = 64 if block_d <= 64 else 32
    return block, block, block_d


def _backward(grad_out, q, k, v, out, lse, key_keep, query_scope, causal: bool, scale: float):
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    q, k, v, do = (_last_dim_contiguous(t) for t in (q, k, v, grad_out))
    delta = (do.float() * out.float()).sum(-1)  # (B, Hq, Tq): rowsum(dO * O)
    lse = lse.contiguous()
    block_m, block_n, block_d = _bwd_blocks(D)
    keep, _, _, scope = _mask_arguments(key_keep, query_scope, q.device)
    dq = torch.empty((B, Hq, Tq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hq, Tk, D), dtype=torch.float32, device=q.device)  # per query head
    dv = torch.empty_like(dk)
    sq, sk, sv, sd = q.stride(), k.stride(), v.stride(), do.stride()
    common = (sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sv[0], sv[1], sv[2], sd[0], sd[1], sd[2])
    meta = dict(CAUSAL=causal, HAS_KEEP=key_keep is not None, HAS_SCOPE=query_scope is not None, BLOCK_M=block_m,
                BLOCK_N=block_n, BLOCK_D=block_d, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                num_warps=4)
    sizes = (Hq, Hq // Hkv, Tq, Tk, D, scale * LOG2E, scale)
    _masked_attn_bwd_dkdv_kernel[(cdiv(Tk, block_n), B * Hq)](
        q, k, v, do, lse, delta, keep, scope, dk, dv, *common, dk.stride(0), dk.stride(1), dk.stride(2), *sizes,
        **meta)
    _masked_attn_bwd_dq_kernel[(cdiv(Tq, block_m), B * Hq)](
        q, k, v, do, lse, delta, keep, scope, dq, *common, dq.stride(0), dq.stride(1), dq.stride(2), *sizes, **meta)
    group = Hq // Hkv
    return (dq, dk.view(B, Hkv, group, Tk, D).sum(2).to(k.dtype), dv.view(B, Hkv, group, Tk, D).sum(2).to(v.dtype))


# ------------------------------------------------------------------------------------------ operators
@torch.library.custom_op("mmalign::masked_attention_triton", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, Tensor? key_keep, Tensor? query_scope, bool causal, "
                                "float scale, int num_splits) -> (Tensor, Tensor)")
def _masked_attention_op(q, k, v, key_keep, query_scope, causal, scale, num_splits):
    """(out, lse) of the Triton kernels; ``num_splits`` 0: automatic. Differentiable w.r.t. q, k, v through out
    (the lse output, for the backward, takes no gradient)."""
    return _forward(q, k, v, key_keep, query_scope, causal, scale, num_splits)


@_masked_attention_op.register_fake
def _masked_attention_fake(q, k, v, key_keep, query_scope, causal, scale, num_splits):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("mmalign::masked_attention_bwd_triton", mutates_args=(),
                         schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
                                "Tensor? key_keep, Tensor? query_scope, bool causal, float scale) "
                                "-> (Tensor, Tensor, Tensor)")
def _masked_attention_bwd_op(grad_out, q, k, v, out, lse, key_keep, query_scope, causal, scale):
    """(dq, dk, dv) of the Triton backward kernels, in the dtypes of q, k, v."""
    return _backward(grad_out, q, k, v, out, lse, key_keep, query_scope, causal, scale)


@_masked_attention_bwd_op.register_fake
def _masked_attention_bwd_fake(grad_out, q, k, v, out, lse, key_keep, query_scope, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, key_keep, query_scope, causal, scale, _ = inputs
    ctx.save_for_backward(q, k, v, *output, key_keep, query_scope)
    ctx.causal, ctx.scale = causal, scale


def _autograd_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, key_keep, query_scope = ctx.saved_tensors
    dq, dk, dv = torch.ops.mmalign.masked_attention_bwd_triton.default(grad_out, q, k, v, out, lse, key_keep,
                                                                       query_scope, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


_masked_attention_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def masked_attention_triton(q, k, v, key_keep=None, *, query_scope=None, causal=True, scale=None, num_splits=None):
    """The Triton backend of :func:`masked_attention` (no argument checks): the operator's output."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return operator("masked_attention_triton")(q, k, v, key_keep, query_scope, causal, scale, num_splits or 0)[0]


# ------------------------------------------------------------------------------------------- public
def pack_keep(keep: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B, ceil(T/8)) uint8, bit j % 8 of byte j // 8 (little-endian) set when key j is kept."""
    B, T = keep.shape
    bits = torch.nn.functional.pad(keep.to(torch.uint8), (0, (-T) % 8)).view(B, -1, 8)
    return (bits << torch.arange(8, dtype=torch.uint8, device=keep.device)).sum(-1, dtype=torch.uint8)


def unpack_keep(packed: torch.Tensor, length: int) -> torch.Tensor:
    """The inverse of :func:`pack_keep`: (B, ceil(length/8)) uint8 -> (B, length) bool."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & 1).reshape(packed.shape[0], -1)[:, :length].bool()


def _check(q, k, v, key_keep, query_scope):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor (B, H, T, D), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.device != q.device or t.dtype != q.dtype:
            raise ValueError(f"{name}: expected {q.dtype} on {q.device} like q, got {t.dtype} on {t.device}")
    B, Hq, Tq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k, v: expected equal shapes, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k: expected (B, Hkv, Tk, D) = ({B}, Hkv, Tk, {D}), got {tuple(k.shape)}")
    if k.shape[1] == 0 or Hq % k.shape[1]:
        raise ValueError(f"k: its {k.shape[1]} heads must divide q's {Hq} heads (GQA/MQA)")
    if D > 256:
        raise ValueError(f"q: head dim {D} > 256 is not supported")
    Tk = k.shape[2]
    for name, t, shape in (("key_keep", key_keep, (B, Tk)), ("query_scope", query_scope, (B, Tq))):
        if t is None:
            continue
        if t.dtype != torch.bool or tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected a bool tensor of shape {shape}, got {t.dtype} {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device}, got {t.device}")
    if query_scope is not None and key_keep is None:
        raise ValueError("query_scope: only meaningful with key_keep (which keys the scoped queries lose)")


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, key_keep: torch.Tensor | None = None,
                     query_scope: torch.Tensor | None = None, causal: bool = True, scale: float | None = None,
                     num_splits: int | None = None, backend: str | None = None) -> torch.Tensor:
    """Causal attention where ``key_keep[b, j] = False`` hides key j of sample b (see the module
    docstring for shapes and the exact rule). Returns (B, Hq, Tq, D) in q's dtype.

    Backends: ``triton`` (CUDA; CPU tensors under ``TRITON_INTERPRET=1``; fp32/fp16/bf16; the operator
    ``mmalign::masked_attention_triton``, with a Triton backward) and ``reference`` (SDPA with a boolean mask; any
    float dtype, autograd). When a gradient is needed the automatic choice is the reference (its backward is
    cuDNN's or FlashAttention's; ``backend="triton"`` runs the Triton backward). ``num_splits`` forces the
    split-KV decode path."""
    if isinstance(key_keep, torch.Tensor) and key_keep.dtype == torch.uint8:  # a packed bitmask
        want = (q.shape[0], (k.shape[2] + 7) // 8)
        if tuple(key_keep.shape) != want:
            raise ValueError(f"key_keep: a packed uint8 bitmask must have shape {want}, got {tuple(key_keep.shape)}")
        key_keep = unpack_keep(key_keep, k.shape[2])
    _check(q, k, v, key_keep, query_scope)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if backend is None and needs_grad:
        backend = "reference"
    name = _dispatch.select("masked_attention", q.device, q.dtype, backend)
    if name == "reference":
        return masked_attention_reference(q, k, v, key_keep, query_scope=query_scope, causal=causal, scale=scale)
    return masked_attention_triton(q, k, v, key_keep, query_scope=query_scope, causal=causal, scale=scale,
                                   num_splits=num_splits)
