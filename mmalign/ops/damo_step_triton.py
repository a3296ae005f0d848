"""The DAMO step's Triton layer (the math is in :mod:`mmalign.ops.damo_step`'s docstring and docs/math.md §3): kernels,
launchers, and the ``torch.library`` operators that run them.

Two forward paths, one backward:
  * N <= MAX_FUSED_N: ``_damo_step_kernel``, one program holds and sorts the whole batch (1 launch).
  * N >  MAX_FUSED_N: a grid of MP_BLOCK-pair programs in four kernels, ``_mp_keys_kernel`` (per-program
    sums, packed ranking keys), the K-th largest key by ``torch.topk`` on the device, ``_mp_select_kernel``
    (the kept set and its sums), ``_mp_loss_kernel`` (per-pair outputs) and ``_mp_finish_kernel`` (one
    program: loss, alpha_M, running mean, step). The sampled selection adds one keys launch (its Gumbel
    noise depends on a batch-wide maximum). Nothing waits on the host.
  * ``_damo_step_bwd_kernel``: d loss / d u was computed by the forward; backward scales it.

Both forward paths build the same float32 ranking keys from the same @triton.jit helpers, so they keep
the same pairs. Partial sums go through a (6, P) buffer and are reduced in a fixed order by every program
that needs them (no float atomics): the same inputs give the same bits on every rank and every run.

Operators (the C++ ones, ``mmalign::damo_step_fwd`` and ``mmalign::damo_step``, have the same arguments, but
for the running mean, which here is one tensor read and updated in place):
  ``mmalign::damo_step_fwd_triton``  the forward kernels; mutates ``running_mean`` and ``step`` (declared).
  ``mmalign::damo_step_bwd_triton``  the backward kernel (functional).
  ``mmalign::damo_step_triton``      the differentiable step: an Autograd kernel over the two above. Its
                                     mutations rule out ``torch.library.register_autograd`` (functional ops
                                     only), so the Autograd kernel is registered as the C++ op registers its own.
None is ``torch.library.triton_op``: a triton_op's fake kernel and its decomposition under torch.compile run
the Python body on fake tensors, which the Triton interpreter (the tests' CPU path) cannot launch on. The
custom ops are opaque to torch.compile and run the same launchers everywhere. Importing this module defines
them and touches no GPU.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor

from .. import _triton
from .._triton import cdiv, next_power_of_2, tl, triton
from . import limits
from ._library import operator

# One program holds and sorts the whole batch up to MAX_FUSED_N pairs; larger batches take the multi-program
# path, MP_BLOCK pairs per program (module names: the tests shrink them to reach that path at small sizes).
MAX_FUSED_N = limits.DAMO_ONE_PROGRAM_MAX_N
MP_BLOCK = limits.DAMO_MP_BLOCK


def _constexpr(value: int):
    """A code of mmalign.ops.limits as the kernels read it (a global tl.constexpr)."""
    return tl.constexpr(value) if _triton.HAS_TRITON else value


_SELECT_ALL, _SELECT_SAMPLE = _constexpr(limits.SELECT_ALL), _constexpr(limits.SELECT_CLOSEST_SAMPLE)
_SELECT_BOTTOM, _SELECT_TOP = _constexpr(limits.SELECT_BOTTOM), _constexpr(limits.SELECT_TOP)
_LOSS_SIGMOID, _LOSS_IPO = _constexpr(limits.LOSS_TYPES.index("sigmoid")), _constexpr(limits.LOSS_TYPES.index("ipo"))

# ----------------------------------------------------------------------------------------------------
# Shared pieces of math (every forward kernel computes them the same way)
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _mix64(z):
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit
def _log1p(x):
    # accurate log(1 + x) for x >= 0 (Goldberg): exact where 1 + x rounds to 1
    y = 1.0 + x
    d = y - 1.0
    return tl.where(d == 0.0, x, tl.log(y) * (x / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _not_finite(x):
    return (x != x) | (tl.abs(x) == float("inf"))


@triton.jit
def _scalar(hi, lo, ACC_FP64: tl.constexpr):
    """A float argument, passed as the exact float32 pair of split_float: on the GPU Triton passes Python
    floats as float32, which would round beta, gamma, ... inside the float64 kernels (the interpreter
    keeps them as Python floats and cannot show it)."""
    acc = tl.float64 if ACC_FP64 else tl.float32
    return tl.cast(hi, acc) + tl.cast(lo, acc)


@triton.jit
def _pairs(PC, PR, RC, RR, BETA, offs, m, beta_hi, beta_lo, stride_beta, HAS_BETA_T: tl.constexpr,
           ACC_FP64: tl.constexpr):
    """(logr_w, logr_l, beta) of the pairs at ``offs``, in the accumulation dtype."""
    acc = tl.float64 if ACC_FP64 else tl.float32
    logr_w = tl.load(PC + offs, mask=m, other=0.0).to(acc) - tl.load(RC + offs, mask=m, other=0.0).to(acc)
    logr_l = tl.load(PR + offs, mask=m, other=0.0).to(acc) - tl.load(RR + offs, mask=m, other=0.0).to(acc)
    if HAS_BETA_T:
        beta = tl.load(BETA + offs * stride_beta, mask=m, other=1.0).to(acc)
    else:
        beta = tl.zeros_like(logr_w) + _scalar(beta_hi, beta_lo, ACC_FP64)
    return logr_w, logr_l, beta


@triton.jit
def _model_aware(u, beta, g, PAPER: tl.constexpr):
    """A_i: the margin u_i ("official"), or R-hat_i = beta u_i / g (beta u_i while |g| < 1e-6, "paper")."""
    A = u
    if PAPER:
        R = beta * u
        A = tl.where(tl.abs(g) < 1e-6, R, R / tl.where(tl.abs(g) < 1e-6, 1.0, g))
    return A


@triton.jit
def _selection_key(A, g, PAPER: tl.constexpr, SELECT: tl.constexpr):
    """The ranking key before Gumbel noise: the kept set is the K largest (SELECT codes of damo_step)."""
    if SELECT == _SELECT_BOTTOM:
        key = -A
    elif SELECT == _SELECT_TOP:
        key = A
    elif PAPER:
        key = -(A - g) * (A - g)
    else:
        key = -(A - g) * (A - g) / 2  # log w
    return key


@triton.jit
def _step_value(STEP, step_scalar, STEP_IS_T: tl.constexpr):
    if STEP_IS_T:
        step = tl.load(STEP).to(tl.uint64)
    else:
        step = tl.zeros((), tl.uint64) + step_scalar
    return step


@triton.jit
def _gumbel(seed, step, offs):
    """-log(-log U_i), U_i = uniform(seed, step, i) of uniforms_reference (float32)."""
    rkey = _mix64(_mix64(tl.zeros((), tl.uint64) + seed) + step)
    z = _mix64(rkey + (offs + 1).to(tl.uint64) * 0x9E3779B97F4A7C15)
    U = ((z >> 40).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return -tl.log(-tl.log(U))


@triton.jit
def _packed(key, rev, m):
    """key rounded to float32 as an order-preserving int64 with ``rev`` (larger for lower indices: ties go
    to the lower index) in the low 32 bits; INT64_MIN where ~m."""
    kb = key.to(tl.float32).to(tl.int32, bitcast=True)
    ordered = tl.where(kb < 0, kb ^ 0x7FFFFFFF, kb)
    comp = (ordered.to(tl.int64) << 32) | rev.to(tl.int64)
    return tl.where(m, comp, -9223372036854775807 - 1)


@triton.jit
def _kept_term(A, PAPER: tl.constexpr):
    """What alpha_M averages over the kept set: sigmoid(A_i) ("official") or R-hat_i ("paper")."""
    t = A
    if not PAPER:
        t = _sigmoid(A)
    return t


@triton.jit
def _alpha_m(s, K, g, PAPER: tl.constexpr):
    """alpha_M from s, the sum of _kept_term over the K kept pairs."""
    if PAPER:
        a = _sigmoid(s / K) / _sigmoid(g)
    else:
        a = s / K / _sigmoid(g)
    return a


@triton.jit
def _running_mean(g, gamma, s, sum_a, K, N, PAPER: tl.constexpr):
    if PAPER:
        r = s / K  # R-bar
    else:
        r = sum_a / N  # mean of A over the whole batch
    return gamma * g + (1 - gamma) * r


@triton.jit
def _pair_beta(beta, alpha_m, ALPHA_D, offs, m, rho, min_beta, USE_D: tl.constexpr, COMBINE_SUM: tl.constexpr):
    if USE_D:
        a_d = tl.load(ALPHA_D + offs, mask=m, other=1.0).to(beta.dtype)
    else:
        a_d = tl.zeros_like(beta) + 1.0
    if COMBINE_SUM:
        alpha = (1 - rho) * alpha_m + rho * a_d
    else:
        alpha = a_d * alpha_m
    return tl.maximum(beta * alpha, min_beta)


@triton.jit
def _pair_loss(u, beta_i, eps, LOSS_KIND: tl.constexpr):
    """(l_i, d l_i / d u_i) of docs/math.md §2: sigmoid (label smoothing eps), ipo, hinge."""
    mm = beta_i * u
    if LOSS_KIND == _LOSS_SIGMOID:
        losses = -(1 - eps) * _logsigmoid(mm) - eps * _logsigmoid(-mm)
        dl_du = beta_i * (-(1 - eps) * _sigmoid(-mm) + eps * _sigmoid(mm))
    elif LOSS_KIND == _LOSS_IPO:
        d = u - 1 / (2 * beta_i)
        losses = d * d
        dl_du = 2 * d
    else:
        losses = tl.maximum(1 - mm, 0.0)
        dl_du = tl.where(1 - mm > 0, -beta_i, 0.0)
    return losses, dl_du


@triton.jit
def _store_pairs(LOSSES, BETA_OUT, RW, RL, MARGINS, ACCURACIES, DL_DU, offs, m, losses, beta_i, logr_w, logr_l,
                 dl_du):
    tl.store(LOSSES + offs, losses, mask=m)
    tl.store(BETA_OUT + offs, beta_i, mask=m)
    r_w, r_l = beta_i * logr_w, beta_i * logr_l
    tl.store(RW + offs, r_w, mask=m)
    tl.store(RL + offs, r_l, mask=m)
    tl.store(MARGINS + offs, r_w - r_l, mask=m)
    tl.store(ACCURACIES + offs, (r_w > r_l).to(tl.uint8), mask=m)
    tl.store(DL_DU + offs, dl_du, mask=m)


# ----------------------------------------------------------------------------------------------------
# N <= MAX_FUSED_N: the whole step in one program
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _damo_step_kernel(
        PC, PR, RC, RR, BETA, ALPHA_D, WEIGHTS, G, STEP,
        LOSS, LOSSES, KEEP, BETA_OUT, RW, RL, MARGINS, ACCURACIES, GRAD_U, DL_DU, G_OUT, ALPHA_M_OUT, INV_DENOM,
        N, K, beta_hi, beta_lo, stride_beta, gamma_hi, gamma_lo, rho_hi, rho_lo, eps_hi, eps_lo, min_beta_hi,
        min_beta_lo, seed, step_scalar,
        PAPER: tl.constexpr, SELECT: tl.constexpr, LOSS_KIND: tl.constexpr, USE_M: tl.constexpr,
        USE_D: tl.constexpr, COMBINE_SUM: tl.constexpr, HAS_BETA_T: tl.constexpr, HAS_W: tl.constexpr,
        STEP_IS_T: tl.constexpr, INCR_STEP: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_N: tl.constexpr):
    acc = tl.float64 if ACC_FP64 else tl.float32
    offs = tl.arange(0, BLOCK_N)
    m = offs < N
    logr_w, logr_l, beta = _pairs(PC, PR, RC, RR, BETA, offs, m, beta_hi, beta_lo, stride_beta, HAS_BETA_T, ACC_FP64)
    gamma, rho = _scalar(gamma_hi, gamma_lo, ACC_FP64), _scalar(rho_hi, rho_lo, ACC_FP64)
    eps, min_beta = _scalar(eps_hi, eps_lo, ACC_FP64), _scalar(min_beta_hi, min_beta_lo, ACC_FP64)
    u = logr_w - logr_l
    g = tl.load(G).to(acc)
    A = _model_aware(u, beta, g, PAPER)
    bad = (tl.sum(tl.where(m & _not_finite(A), 1, 0), 0) > 0) | _not_finite(g)

    # ---- the kept set S: the K largest keys ----
    if SELECT == _SELECT_ALL:
        keep = m
    else:
        key = _selection_key(A, g, PAPER, SELECT)
        if SELECT == _SELECT_SAMPLE:  # Gumbel-top-K == sampling without replacement ~ w (unless every w is 0)
            any_w = tl.max(tl.where(m, tl.exp(key), 0.0), 0) > 0.0
            noise = _gumbel(seed, _step_value(STEP, step_scalar, STEP_IS_T), offs)
            key = tl.where(any_w, key + noise.to(acc), key)
        comp = _packed(key, BLOCK_N - 1 - offs, m)
        ranked = tl.sort(comp, descending=True)
        thr = tl.sum(tl.where(offs == K - 1, ranked, 0), 0)
        keep = m & (comp >= thr)
    keep_f = tl.where(keep, 1.0, 0.0).to(acc)

    # ---- alpha_M, the running mean, beta_i, the losses and their (weighted) mean over S ----
    s = tl.sum(_kept_term(A, PAPER) * keep_f, 0)
    alpha_m = _alpha_m(s, K, g, PAPER)
    g_new = _running_mean(g, gamma, s, tl.sum(tl.where(m, A, 0.0), 0), K, N, PAPER)
    if not USE_M:
        alpha_m = tl.full((), 1.0, acc)
    beta_i = _pair_beta(beta, alpha_m, ALPHA_D, offs, m, rho, min_beta, USE_D, COMBINE_SUM)
    losses, dl_du = _pair_loss(u, beta_i, eps, LOSS_KIND)
    wt = keep_f
    if HAS_W:
        wt = wt * tl.load(WEIGHTS + offs, mask=m, other=0.0).to(acc)
    denom = tl.sum(wt, 0)
    loss = tl.sum(wt * losses, 0) / denom

    nan = float("nan")
    tl.store(LOSS, tl.where(bad, nan, loss))
    tl.store(ALPHA_M_OUT, alpha_m)
    tl.store(INV_DENOM, tl.full((), 1.0, acc))  # GRAD_U is d loss / d u itself
    tl.store(G_OUT, tl.where(bad, g, g_new).to(G_OUT.dtype.element_ty))
    tl.store(KEEP + offs, (keep & (bad == 0)).to(tl.uint8), mask=m)
    tl.store(GRAD_U + offs, tl.where(bad, nan, wt / denom * dl_du), mask=m)
    _store_pairs(LOSSES, BETA_OUT, RW, RL, MARGINS, ACCURACIES, DL_DU, offs, m, tl.where(bad, nan, losses), beta_i,
                 logr_w, logr_l, dl_du)
    if INCR_STEP:
        tl.store(STEP, tl.load(STEP) + 1)


# ----------------------------------------------------------------------------------------------------
# N > MAX_FUSED_N: a grid of MP_BLOCK-pair programs. PART is the (6, P) partials buffer, one value per
# program in each column: 0 sum of A, 1 count of non-finite A, 2 max ranking key (sampled selection),
# 3 sum of the kept terms of alpha_M, 4 sum of the kept weights, 5 weighted sum of the kept losses. Each
# kernel reduces the columns it needs over all P programs, in the same order in every program.
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _partials(PART, col, P, P_BLOCK: tl.constexpr, IS_MAX: tl.constexpr):
    i = tl.arange(0, P_BLOCK)
    if IS_MAX:
        r = tl.max(tl.load(PART + col * P + i, mask=i < P, other=float("-inf")), 0)
    else:
        r = tl.sum(tl.load(PART + col * P + i, mask=i < P, other=0.0), 0)
    return r


@triton.jit
def _mp_bad(PART, g, P, P_BLOCK: tl.constexpr):
    return (_partials(PART, 1, P, P_BLOCK, False) > 0) | _not_finite(g)


@triton.jit
def _mp_block(PC, PR, RC, RR, BETA, G, N, beta_hi, beta_lo, stride_beta, HAS_BETA_T: tl.constexpr,
              ACC_FP64: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's pairs: (pid, offs, mask, logr_w, logr_l, beta, g)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m = offs < N
    logr_w, logr_l, beta = _pairs(PC, PR, RC, RR, BETA, offs, m, beta_hi, beta_lo, stride_beta, HAS_BETA_T, ACC_FP64)
    return pid, offs, m, logr_w, logr_l, beta, tl.load(G).to(logr_w.dtype)


@triton.jit
def _mp_keys_kernel(PC, PR, RC, RR, BETA, G, STEP, PART, COMP, N, P, beta_hi, beta_lo, stride_beta, seed, step_scalar,
                    PAPER: tl.constexpr, SELECT: tl.constexpr, HAS_BETA_T: tl.constexpr, STEP_IS_T: tl.constexpr,
                    ACC_FP64: tl.constexpr, STATS: tl.constexpr, KEYS: tl.constexpr, BLOCK_N: tl.constexpr,
                    P_BLOCK: tl.constexpr):
    """STATS: this program's sum of A, count of non-finite A, max key (sampled selection). KEYS: the packed
    ranking keys (the sampled selection reads the max key of a previous STATS launch)."""
    acc = tl.float64 if ACC_FP64 else tl.float32
    pid, offs, m, logr_w, logr_l, beta, g = _mp_block(PC, PR, RC, RR, BETA, G, N, beta_hi, beta_lo, stride_beta,
                                                      HAS_BETA_T, ACC_FP64, BLOCK_N)
    A = _model_aware(logr_w - logr_l, beta, g, PAPER)
    if STATS:
        tl.store(PART + 0 * P + pid, tl.sum(tl.where(m, A, 0.0), 0))
        tl.store(PART + 1 * P + pid, tl.sum(tl.where(m & _not_finite(A), 1.0, 0.0), 0).to(acc))
    if SELECT != _SELECT_ALL:
        key = _selection_key(A, g, PAPER, SELECT)
        if STATS and SELECT == _SELECT_SAMPLE:
            tl.store(PART + 2 * P + pid, tl.max(tl.where(m, key, float("-inf")), 0))
        if KEYS:
            if SELECT == _SELECT_SAMPLE:
                any_w = tl.exp(_partials(PART, 2, P, P_BLOCK, True)) > 0.0
                noise = _gumbel(seed, _step_value(STEP, step_scalar, STEP_IS_T), offs)
                key = tl.where(any_w, key + noise.to(acc), key)
            tl.store(COMP + offs, _packed(key, N - 1 - offs, m), mask=m)


@triton.jit
def _mp_select_kernel(PC, PR, RC, RR, BETA, G, PART, COMP, THR, KEEP, N, P, beta_hi, beta_lo, stride_beta,
                      PAPER: tl.constexpr, SELECT: tl.constexpr, HAS_BETA_T: tl.constexpr, ACC_FP64: tl.constexpr,
                      BLOCK_N: tl.constexpr, P_BLOCK: tl.constexpr):
    """The kept set (keys >= the K-th largest) and this program's sum of the kept terms of alpha_M."""
    acc = tl.float64 if ACC_FP64 else tl.float32
    pid, offs, m, logr_w, logr_l, beta, g = _mp_block(PC, PR, RC, RR, BETA, G, N, beta_hi, beta_lo, stride_beta,
                                                      HAS_BETA_T, ACC_FP64, BLOCK_N)
    A = _model_aware(logr_w - logr_l, beta, g, PAPER)
    if SELECT == _SELECT_ALL:
        keep = m
    else:
        keep = m & (tl.load(COMP + offs, mask=m, other=0) >= tl.load(THR))
    tl.store(PART + 3 * P + pid, tl.sum(_kept_term(A, PAPER) * tl.where(keep, 1.0, 0.0).to(acc), 0))
    bad = _mp_bad(PART, g, P, P_BLOCK)
    tl.store(KEEP + offs, (keep & (bad == 0)).to(tl.uint8), mask=m)


@triton.jit
def _mp_loss_kernel(PC, PR, RC, RR, BETA, ALPHA_D, WEIGHTS, G, PART, KEEP,
                    LOSSES, BETA_OUT, RW, RL, MARGINS, ACCURACIES, GRAD_U, DL_DU,
                    N, P, K, beta_hi, beta_lo, stride_beta, rho_hi, rho_lo, eps_hi, eps_lo, min_beta_hi, min_beta_lo,
                    PAPER: tl.constexpr, LOSS_KIND: tl.constexpr, USE_M: tl.constexpr, USE_D: tl.constexpr,
                    COMBINE_SUM: tl.constexpr, HAS_BETA_T: tl.constexpr, HAS_W: tl.constexpr,
                    ACC_FP64: tl.constexpr, BLOCK_N: tl.constexpr, P_BLOCK: tl.constexpr):
    """Per-pair outputs; GRAD_U gets w_i dl_i/du_i (backward scales it by 1 / sum w)."""
    acc = tl.float64 if ACC_FP64 else tl.float32
    pid, offs, m, logr_w, logr_l, beta, g = _mp_block(PC, PR, RC, RR, BETA, G, N, beta_hi, beta_lo, stride_beta,
                                                      HAS_BETA_T, ACC_FP64, BLOCK_N)
    u = logr_w - logr_l
    if USE_M:
        alpha_m = _alpha_m(_partials(PART, 3, P, P_BLOCK, False), K, g, PAPER)
    else:
        alpha_m = tl.full((), 1.0, acc)
    beta_i = _pair_beta(beta, alpha_m, ALPHA_D, offs, m, _scalar(rho_hi, rho_lo, ACC_FP64),
                        _scalar(min_beta_hi, min_beta_lo, ACC_FP64), USE_D, COMBINE_SUM)
    losses, dl_du = _pair_loss(u, beta_i, _scalar(eps_hi, eps_lo, ACC_FP64), LOSS_KIND)
    wt = tl.load(KEEP + offs, mask=m, other=0).to(acc)
    if HAS_W:
        wt = wt * tl.load(WEIGHTS + offs, mask=m, other=0.0).to(acc)
    tl.store(PART + 4 * P + pid, tl.sum(wt, 0))
    tl.store(PART + 5 * P + pid, tl.sum(wt * losses, 0))
    bad = _mp_bad(PART, g, P, P_BLOCK)
    nan = float("nan")
    tl.store(GRAD_U + offs, tl.where(bad, nan, wt * dl_du), mask=m)
    _store_pairs(LOSSES, BETA_OUT, RW, RL, MARGINS, ACCURACIES, DL_DU, offs, m, tl.where(bad, nan, losses), beta_i,
                 logr_w, logr_l, dl_du)


@triton.jit
def _mp_finish_kernel(G, STEP, PART, LOSS, INV_DENOM, G_OUT, ALPHA_M_OUT, N, P, K, gamma_hi, gamma_lo,
                      PAPER: tl.constexpr, USE_M: tl.constexpr, INCR_STEP: tl.constexpr, ACC_FP64: tl.constexpr,
                      P_BLOCK: tl.constexpr):
    """One program: the loss, 1 / sum w, alpha_M, the running mean and the step counter."""
    acc = tl.float64 if ACC_FP64 else tl.float32
    g = tl.load(G).to(acc)
    bad = _mp_bad(PART, g, P, P_BLOCK)
    s = _partials(PART, 3, P, P_BLOCK, False)
    if USE_M:
        alpha_m = _alpha_m(s, K, g, PAPER)
    else:
        alpha_m = tl.full((), 1.0, acc)
    g_new = _running_mean(g, _scalar(gamma_hi, gamma_lo, ACC_FP64), s, _partials(PART, 0, P, P_BLOCK, False), K, N,
                          PAPER)
    denom = _partials(PART, 4, P, P_BLOCK, False)
    loss = _partials(PART, 5, P, P_BLOCK, False) / denom
    tl.store(LOSS, tl.where(bad, float("nan"), loss))
    tl.store(INV_DENOM, 1.0 / denom)
    tl.store(ALPHA_M_OUT, alpha_m)
    tl.store(G_OUT, tl.where(bad, g, g_new).to(G_OUT.dtype.element_ty))
    if INCR_STEP:
        tl.store(STEP, tl.load(STEP) + 1)


# ----------------------------------------------------------------------------------------------------
# Backward: gu = grad_loss * scale * GRAD_U + grad_losses * dl/du; grad pc = grad rr = gu, pr/rc = -gu
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _damo_step_bwd_kernel(GRAD_U, DL_DU, G_LOSS, G_LOSSES, SCALE, POS, NEG, N, stride_gls, HAS_GL: tl.constexpr,
                          HAS_GLS: tl.constexpr, HAS_SCALE: tl.constexpr, NEED_NEG: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = offs < N
    gu = tl.zeros((BLOCK_N,), GRAD_U.dtype.element_ty)
    if HAS_GL:
        gl = tl.load(G_LOSS)
        if HAS_SCALE:
            gl = gl * tl.load(SCALE)
        gu += tl.load(GRAD_U + offs, mask=m, other=0.0) * gl
    if HAS_GLS:
        gu += tl.load(G_LOSSES + offs * stride_gls, mask=m, other=0.0) * tl.load(DL_DU + offs, mask=m, other=0.0)
    tl.store(POS + offs, gu, mask=m)
    if NEED_NEG:
        tl.store(NEG + offs, -gu, mask=m)


# ----------------------------------------------------------------------------------------------------
# Launchers. Inputs are contiguous (N,) tensors on one device.
# ----------------------------------------------------------------------------------------------------


class KernelArgs(NamedTuple):
    """The configuration as the damo_step operators take it (their arguments K ... combine_sum, in order):
    mmalign.ops.damo_step.kernel_args builds it from a DAMOConfig."""

    K: int
    gamma: float
    rho: float
    eps: float
    min_beta: float
    paper: bool
    select: int  # a SELECT code of mmalign.ops.limits
    loss_kind: int  # an index in mmalign.ops.limits.LOSS_TYPES
    use_m: bool
    combine_sum: bool


class StepArgs(NamedTuple):
    """The arguments of ``mmalign::damo_step_fwd_triton`` in schema order, the configuration's as ``k``."""

    pc: Tensor
    pr: Tensor
    rc: Tensor
    rr: Tensor
    beta: Optional[Tensor]  # 0-dim or (N,); None: beta_scalar
    beta_scalar: float
    alpha_d: Optional[Tensor]  # None: alpha_D = 1
    weights: Optional[Tensor]  # None: 1
    running_mean: Tensor  # 0-dim float32 g: read, then overwritten with the updated g
    step: Optional[Tensor]  # 0-dim int64 read on the device (incremented with incr_step); None: step_scalar
    step_scalar: int
    seed: int
    k: KernelArgs
    incr_step: bool

    @staticmethod
    def of(args: tuple) -> "StepArgs":
        return StepArgs(*args[:12], KernelArgs(*args[12:22]), args[22])


class StepOutputs(NamedTuple):
    """The outputs of ``mmalign::damo_step_fwd_triton``: those of the C++ ``damo_step_fwd``, then ``inv_denom``
    (d loss / d u = inv_denom * grad_u; 1 on the one-program path, whose grad_u is d loss / d u itself)."""

    loss: Tensor
    losses: Tensor
    keep: Tensor
    beta: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    margins: Tensor
    accuracies: Tensor
    grad_u: Tensor
    dl_du: Tensor
    alpha_m: Tensor
    inv_denom: Tensor


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def step_outputs_like(pc: Tensor, with_grads: bool, with_scale: bool) -> tuple:
    """Empty outputs of a damo_step operator for the pairs of ``pc`` (also its fake kernel): loss, losses, keep,
    beta_i, chosen/rejected rewards, margins, accuracies, [grad_u, dl_du], alpha_M, [inv_denom]; float64 for
    float64 inputs, else float32."""
    dt, N = _acc(pc.dtype), pc.shape[0]
    vec = lambda: pc.new_empty((N,), dtype=dt)  # noqa: E731
    mask = lambda: pc.new_empty((N,), dtype=torch.bool)  # noqa: E731
    outs = [pc.new_empty((), dtype=dt), vec(), mask(), vec(), vec(), vec(), vec(), mask()]
    outs += [vec(), vec()] if with_grads else []
    outs.append(pc.new_empty((), dtype=dt))
    outs += [pc.new_empty((), dtype=dt)] if with_scale else []
    return tuple(outs)


def _one_program(n: int) -> dict:
    """Block and warps of the kernels that hold the whole batch of n pairs in one program."""
    return dict(BLOCK_N=max(16, next_power_of_2(n)), num_warps=4 if n <= 1024 else 8)


def _grid(n: int) -> tuple[int, dict]:
    """Programs and launch options of the multi-program kernels (and of the backward past one program)."""
    if n <= MAX_FUSED_N:
        return 1, _one_program(n)
    return cdiv(n, MP_BLOCK), dict(BLOCK_N=MP_BLOCK, num_warps=4)


def _outputs(n: int, dt, dev) -> StepOutputs:
    """Empty outputs; bools as uint8 for the kernels."""
    vec = lambda dtype=dt: torch.empty(n, dtype=dtype, device=dev)  # noqa: E731
    scalar = lambda: torch.empty((), dtype=dt, device=dev)  # noqa: E731
    return StepOutputs(scalar(), vec(), vec(torch.uint8), vec(), vec(), vec(), vec(), vec(torch.uint8), vec(), vec(),
                       scalar(), scalar())


def split_float(x: float) -> tuple[float, float]:
    """(hi, lo), both exactly float32, with hi + lo = x to about 2^-48 relative (see _scalar)."""
    hi = float(np.float32(x))
    return (hi, float(np.float32(x - hi))) if math.isfinite(hi) else (hi, 0.0)


@functools.lru_cache(maxsize=1024)
def _config_floats(gamma: float, rho: float, eps: float, min_beta: float) -> dict[str, tuple[float, float]]:
    """gamma, rho, eps and min_beta as the kernels take them: split_float pairs, by name."""
    return {"gamma": split_float(gamma), "rho": split_float(rho), "eps": split_float(eps),
            "min_beta": split_float(min_beta)}


def _common(a: StepArgs):
    """Kernel arguments every forward kernel shares: (beta tensor or dummy, step tensor or dummy, beta
    scalar as a split_float pair, beta stride, step scalar, HAS_BETA_T, STEP_IS_T, ACC_FP64)."""
    beta_t, step_t = a.beta, a.step
    return (beta_t if beta_t is not None else a.pc, step_t if step_t is not None else a.pc,
            (0.0, 0.0) if beta_t is not None else split_float(float(a.beta_scalar)),
            (beta_t.stride(0) if beta_t.dim() else 0) if beta_t is not None else 0,
            0 if step_t is not None else int(a.step_scalar), beta_t is not None, step_t is not None,
            a.pc.dtype == torch.float64)


def _finish_outputs(out: StepOutputs) -> StepOutputs:
    return out._replace(keep=out.keep.view(torch.bool), accuracies=out.accuracies.view(torch.bool))


def _fused_fwd(a: StepArgs) -> StepOutputs:
    N = a.pc.shape[0]
    out = _outputs(N, _acc(a.pc.dtype), a.pc.device)
    beta_t, step_t, beta_s, stride_beta, step_s, has_beta_t, step_is_t, fp64 = _common(a)
    f = _config_floats(a.k.gamma, a.k.rho, a.k.eps, a.k.min_beta)
    _damo_step_kernel[(1,)](
        a.pc, a.pr, a.rc, a.rr, beta_t, a.alpha_d if a.alpha_d is not None else a.pc,
        a.weights if a.weights is not None else a.pc, a.running_mean, step_t,
        out.loss, out.losses, out.keep, out.beta, out.chosen_rewards, out.rejected_rewards, out.margins,
        out.accuracies, out.grad_u, out.dl_du, a.running_mean, out.alpha_m, out.inv_denom,
        N, a.k.K, *beta_s, stride_beta, *f["gamma"], *f["rho"], *f["eps"], *f["min_beta"], int(a.seed), step_s,
        PAPER=a.k.paper, SELECT=a.k.select, LOSS_KIND=a.k.loss_kind, USE_M=a.k.use_m, USE_D=a.alpha_d is not None,
        COMBINE_SUM=a.k.combine_sum, HAS_BETA_T=has_beta_t, HAS_W=a.weights is not None, STEP_IS_T=step_is_t,
        INCR_STEP=a.incr_step and step_is_t, ACC_FP64=fp64, **_one_program(N))
    return _finish_outputs(out)


def _multi_program_fwd(a: StepArgs) -> StepOutputs:
    N, dt, dev = a.pc.shape[0], _acc(a.pc.dtype), a.pc.device
    out = _outputs(N, dt, dev)
    beta_t, step_t, beta_s, stride_beta, step_s, has_beta_t, step_is_t, fp64 = _common(a)
    f = _config_floats(a.k.gamma, a.k.rho, a.k.eps, a.k.min_beta)
    P, launch = _grid(N)
    blocks = dict(launch, P_BLOCK=max(16, next_power_of_2(P)))
    part = torch.empty((6, P), dtype=dt, device=dev)
    selects = a.k.select != limits.SELECT_ALL
    comp = torch.empty(N if selects else 1, dtype=torch.int64, device=dev)
    inputs = (a.pc, a.pr, a.rc, a.rr, beta_t)
    g = a.running_mean  # read by every kernel, overwritten by the last one
    keys = lambda stats, write: _mp_keys_kernel[(P,)](  # noqa: E731
        *inputs, g, step_t, part, comp, N, P, *beta_s, stride_beta, int(a.seed), step_s, PAPER=a.k.paper,
        SELECT=a.k.select, HAS_BETA_T=has_beta_t, STEP_IS_T=step_is_t, ACC_FP64=fp64, STATS=stats, KEYS=write,
        **blocks)
    sampled = a.k.select == limits.SELECT_CLOSEST_SAMPLE  # its keys need the batch-wide max of log w first
    keys(True, selects and not sampled)
    if sampled:
        keys(False, True)
    thr = torch.topk(comp, a.k.K, sorted=False).values.min() if selects else comp
    _mp_select_kernel[(P,)](*inputs, g, part, comp, thr, out.keep, N, P, *beta_s, stride_beta, PAPER=a.k.paper,
                            SELECT=a.k.select, HAS_BETA_T=has_beta_t, ACC_FP64=fp64, **blocks)
    _mp_loss_kernel[(P,)](
        *inputs, a.alpha_d if a.alpha_d is not None else a.pc, a.weights if a.weights is not None else a.pc, g,
        part, out.keep, out.losses, out.beta, out.chosen_rewards, out.rejected_rewards, out.margins,
        out.accuracies, out.grad_u, out.dl_du, N, P, a.k.K, *beta_s, stride_beta, *f["rho"], *f["eps"], *f["min_beta"],
        PAPER=a.k.paper, LOSS_KIND=a.k.loss_kind, USE_M=a.k.use_m, USE_D=a.alpha_d is not None,
        COMBINE_SUM=a.k.combine_sum, HAS_BETA_T=has_beta_t, HAS_W=a.weights is not None, ACC_FP64=fp64, **blocks)
    _mp_finish_kernel[(1,)](g, step_t, part, out.loss, out.inv_denom, g, out.alpha_m, N, P, a.k.K, *f["gamma"],
                            PAPER=a.k.paper, USE_M=a.k.use_m, INCR_STEP=a.incr_step and step_is_t, ACC_FP64=fp64,
                            P_BLOCK=blocks["P_BLOCK"])
    return _finish_outputs(out)


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.is_contiguous() else t.contiguous()


# ----------------------------------------------------------------------------------------------------
# Operators
# ----------------------------------------------------------------------------------------------------

_STEP_ARGS = ("(Tensor pc, Tensor pr, Tensor rc, Tensor rr, Tensor? beta, float beta_scalar, Tensor? alpha_d, "
              "Tensor? weights, Tensor(a!) running_mean, Tensor(b!)? step, int step_scalar, int seed, int K, "
              "float gamma, float rho, float eps, float min_beta, bool paper, int select, int loss_kind, bool use_m, "
              "bool combine_sum, bool incr_step)")


@torch.library.custom_op("mmalign::damo_step_fwd_triton", mutates_args=("running_mean", "step"),
                         schema=_STEP_ARGS + " -> (" + ", ".join(["Tensor"] * 12) + ")")
def damo_step_fwd_triton(*args) -> tuple:
    """The forward kernels: :class:`StepOutputs`; ``running_mean`` gets the updated g (unchanged for non-finite
    inputs), ``step`` += 1 with ``incr_step``. One launch up to MAX_FUSED_N pairs, the multi-program path beyond."""
    a = StepArgs.of(args)
    a = a._replace(pc=_contiguous(a.pc), pr=_contiguous(a.pr), rc=_contiguous(a.rc), rr=_contiguous(a.rr),
                   beta=_contiguous(a.beta), alpha_d=_contiguous(a.alpha_d), weights=_contiguous(a.weights))
    return tuple((_fused_fwd if a.pc.shape[0] <= MAX_FUSED_N else _multi_program_fwd)(a))


@damo_step_fwd_triton.register_fake
def _damo_step_fwd_triton_fake(pc, *args):
    return step_outputs_like(pc, with_grads=True, with_scale=True)


@torch.library.custom_op("mmalign::damo_step_bwd_triton", mutates_args=(),
                         schema="(Tensor grad_u, Tensor dl_du, Tensor inv_denom, Tensor? grad_loss, "
                                "Tensor? grad_losses, bool need_neg) -> (Tensor, Tensor)")
def damo_step_bwd_triton(grad_u, dl_du, inv_denom, grad_loss, grad_losses, need_neg):
    """(gu, -gu) with gu = grad_loss * inv_denom * grad_u + grad_losses * dl_du (either gradient may be None:
    zeros then); the second output is empty unless ``need_neg``. grad pc = grad rr = gu, grad pr = grad rc = -gu."""
    N = grad_u.shape[0]
    pos = torch.empty_like(grad_u)
    neg = torch.empty_like(grad_u) if need_neg else grad_u.new_empty((0,))
    P, launch = _grid(N)
    _damo_step_bwd_kernel[(P,)](
        grad_u, dl_du, grad_loss if grad_loss is not None else grad_u,
        grad_losses if grad_losses is not None else grad_u, inv_denom, pos, neg if need_neg else pos, N,
        grad_losses.stride(0) if grad_losses is not None else 0, HAS_GL=grad_loss is not None,
        HAS_GLS=grad_losses is not None, HAS_SCALE=True, NEED_NEG=need_neg, **launch)
    return pos, neg


@damo_step_bwd_triton.register_fake
def _damo_step_bwd_triton_fake(grad_u, dl_du, inv_denom, grad_loss, grad_losses, need_neg):
    return torch.empty_like(grad_u), torch.empty_like(grad_u) if need_neg else grad_u.new_empty((0,))


# mmalign::damo_step_triton: the differentiable step (loss, losses, keep, beta_i, chosen/rejected rewards, margins,
# accuracies, alpha_M), differentiable w.r.t. pc, pr, rc, rr through loss and losses.
_LIB = torch.library.Library("mmalign", "FRAGMENT")
_LIB.define("damo_step_triton" + _STEP_ARGS + " -> (" + ", ".join(["Tensor"] * 9) + ")")


def _public(o) -> tuple:
    return (*o[:8], o[10])


class _DAMOStepFunction(torch.autograd.Function):
    """The gradient is closed-form and computed by the forward (d loss / d u_i and d l_i / d u_i are saved), so
    backward is one small kernel (u = pc - rc - pr + rr); beta_i, alpha_D, the weights and the kept set are
    constants. The C++ op has the same Function in C++ (csrc/damo_step_autograd.cpp)."""

    @staticmethod
    def forward(ctx, pc, pr, rc, rr, *rest):
        with torch._C._AutoDispatchBelowAutograd():
            o = operator("damo_step_fwd_triton")(pc, pr, rc, rr, *rest)
        ctx.save_for_backward(o[8], o[9], o[11])
        out = _public(o)
        ctx.mark_non_differentiable(*out[2:])
        # unused outputs give None, not a zero tensor each: the backward kernel takes either gradient as absent
        ctx.set_materialize_grads(False)
        ctx.n_rest = len(rest)
        return out

    @staticmethod
    def backward(ctx, grad_loss, grad_losses, *_):
        need = ctx.needs_input_grad
        pos, neg = operator("damo_step_bwd_triton")(*ctx.saved_tensors, grad_loss, grad_losses, need[1] or need[2])
        return (pos if need[0] else None, neg if need[1] else None, neg if need[2] else None,
                pos if need[3] else None) + (None,) * ctx.n_rest


def _damo_step_autograd(*args):
    return _DAMOStepFunction.apply(*args)


def _damo_step_no_autograd(*args):
    return _public(operator("damo_step_fwd_triton")(*args))


_LIB.impl("damo_step_triton", _damo_step_autograd, "Autograd")
_LIB.impl("damo_step_triton", _damo_step_no_autograd, "CompositeExplicitAutograd")
torch.library.register_fake("mmalign::damo_step_triton",
                            lambda pc, *args: step_outputs_like(pc, with_grads=False, with_scale=False), lib=_LIB)
