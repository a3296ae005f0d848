"""The model-aware DAMO step (SPEC.md sections 2, 3 and 5) in one launch.

Per pair i of a batch of N (log-ratios logr_w, logr_l, margin u = logr_w - logr_l):

variant="official" (the released code, default):
    A_i = u_i (detached);  w_i = exp(-(A_i - g)^2 / 2);  K = floor(keep_ratio * N)
    S = K pairs drawn without replacement with probability ~ w_i (selection="sample": top-K of
        log w_i + Gumbel noise) or the K largest w_i (selection="topk"); every w_i == 0 -> the K
        closest to g
    alpha_M = mean_S sigmoid(A_i) / sigmoid(g);  beta_i = max(beta * alpha_D,i * alpha_M, 1e-3)
    loss = mean_S l(beta_i, u_i);  g <- gamma g + (1 - gamma) mean_all A_i
variant="paper" (Eq. 9-15):
    R_i = beta u_i;  Rh_i = R_i / g (R_i while |g| < 1e-6);  d_i = (Rh_i - g)^2
    S = K smallest d_i ("both"), K smallest Rh ("bottom" drops the largest), K largest ("top"), all ("none")
    Rbar = mean_S Rh;  alpha_M = sigmoid(Rbar) / sigmoid(g);  beta_i = beta alpha_D,i alpha_M
    loss = mean_S l(beta_i, u_i);  g <- gamma g + (1 - gamma) Rbar
combine="sum": alpha_i = (1 - rho) alpha_M + rho alpha_D,i. Presets: dpo (alpha = 1, no filter), d2po
(alpha_D), mdpo (alpha_M, filter), damo (both). filter "bottom"/"top"/"none" also apply to "official"
(ordering by A_i). l is the per-pair loss of SPEC.md section 2; beta_i is a constant for gradients.

Random numbers: U_i = uniform(seed, step, i) from a counter-based splitmix64 hash, the same bits in the
reference (numpy), the Triton kernel and the C++ kernel, so every backend, rank and run draws the same
mask for the same (seed, step). Ordering ties break towards the lower index; the kernels order keys
rounded to float32.

Non-finite inputs (a NaN or +-inf margin, or a non-finite running mean): loss and per-pair losses are
NaN, the keep mask is all False, gradients are NaN, and the running mean is left unchanged. With
``check_finite=True`` (the default) the functional API raises before that, naming the argument.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import torch

from .._triton import tl, triton
from .preference_loss import LOSS_TYPES, pair_loss_reference

# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------

VARIANTS = ("official", "paper")
SELECTIONS = ("sample", "topk")
FILTERS = ("both", "bottom", "top", "none")
COMBINES = ("product", "sum")
PRESETS = {
    "dpo": dict(use_alpha_m=False, use_alpha_d=False, filter="none"),
    "d2po": dict(use_alpha_m=False, use_alpha_d=True, filter="none"),
    "mdpo": dict(use_alpha_m=True, use_alpha_d=False),
    "damo": dict(use_alpha_m=True, use_alpha_d=True),
}
OFFICIAL_MIN_BETA = 1e-3

# kernel codes
SELECT_ALL, SELECT_CLOSEST, SELECT_CLOSEST_SAMPLE, SELECT_BOTTOM, SELECT_TOP = range(5)


@dataclass(frozen=True, eq=False)
class DAMOConfig:
    """Everything that decides the DAMO step but the data. See the module docstring and SPEC.md §3/§5."""

    variant: str = "official"
    selection: str = "sample"
    filter: str = "both"
    keep: float | int = 0.8  # a ratio in (0, 1] (K = max(1, floor(ratio N))) or K itself (int >= 1)
    gamma: float = 0.9
    combine: str = "product"
    rho: float = 0.5
    use_alpha_m: bool = True
    use_alpha_d: bool = True
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0

    # Equality and hash see keep's type: keep=1 (K = 1) and keep=1.0 (every pair) differ although
    # 1 == 1.0 in Python. The hash is computed once (configs are hashed on every step by caches).
    def _key(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self)) + (type(self.keep),)

    def __eq__(self, other) -> bool:
        return type(other) is DAMOConfig and self._key() == other._key()

    def __hash__(self) -> int:
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(self._key())
            object.__setattr__(self, "_hash", h)
        return h

    @staticmethod
    def from_preset(preset: str | None, **overrides) -> "DAMOConfig":
        """The validated configuration of ``preset`` with ``overrides`` (None values ignored); cached."""
        # typed key: an lru_cache would take keep=1.0 for a cached keep=1 (1 == 1.0)
        return _from_preset(preset, tuple(sorted((k, type(v).__name__, v) for k, v in overrides.items()
                                                 if v is not None)))

    @staticmethod
    def _build(preset: str | None, overrides: dict) -> "DAMOConfig":
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)} or None, got {preset!r}")
        base = dict(PRESETS[preset]) if preset else {}
        base.update(overrides)
        cfg = DAMOConfig(**base)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        _validate(self)

    def _check(self) -> None:
        for name, allowed in (("variant", VARIANTS), ("selection", SELECTIONS), ("filter", FILTERS),
                              ("combine", COMBINES), ("loss_type", LOSS_TYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {list(allowed)}, got {getattr(self, name)!r}")
        k = self.keep
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise TypeError(f"keep: expected a ratio in (0, 1] or an int K >= 1, got {k!r}")
        if isinstance(k, int) and k < 1:
            raise ValueError(f"keep: expected K >= 1, got {k}")
        if isinstance(k, float) and not 0.0 < k <= 1.0:
            raise ValueError(f"keep: expected a keep ratio in (0, 1], got {k}")
        if not (isinstance(self.gamma, (int, float)) and 0.0 <= self.gamma < 1.0):
            raise ValueError(f"gamma: expected a value in [0, 1), got {self.gamma!r}")
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"rho: expected a value in [0, 1], got {self.rho!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: expected a value in [0, 0.5), got {self.label_smoothing!r}")

    def k(self, n: int) -> int:
        """Number of kept pairs for a batch of n."""
        if self.filter == "none":
            return n
        if isinstance(self.keep, int):
            if self.keep > n:
                raise ValueError(f"keep: K = {self.keep} is larger than the batch N = {n}")
            return self.keep
        return max(1, math.floor(self.keep * n))

    def select_code(self) -> int:
        if self.filter == "none":
            return SELECT_ALL
        if self.filter == "bottom":
            return SELECT_BOTTOM
        if self.filter == "top":
            return SELECT_TOP
        return SELECT_CLOSEST_SAMPLE if (self.variant == "official" and self.selection == "sample") else SELECT_CLOSEST

    def min_beta(self) -> float:
        return OFFICIAL_MIN_BETA if self.variant == "official" else -math.inf


@functools.lru_cache(maxsize=256)
def _from_preset(preset, overrides: tuple) -> DAMOConfig:
    return DAMOConfig._build(preset, {k: v for k, _, v in overrides})


@functools.lru_cache(maxsize=256)
def _validate(cfg: DAMOConfig) -> None:  # configurations are frozen: check each one once
    cfg._check()


class DAMOMetrics(NamedTuple):
    """Per-step metrics of :func:`mmalign.functional.damo_step` (detached, except ``losses``)."""

    keep: torch.Tensor  # (N,) bool, the kept set S
    alpha_m: torch.Tensor  # 0-dim, model-aware factor (1 when unused)
    beta: torch.Tensor  # (N,) per-pair beta_i used in the loss
    chosen_rewards: torch.Tensor  # (N,) beta_i * logr_w
    rejected_rewards: torch.Tensor  # (N,) beta_i * logr_l
    margins: torch.Tensor  # (N,)
    accuracies: torch.Tensor  # (N,) bool
    losses: torch.Tensor  # (N,) per-pair losses l(beta_i, u_i) (all pairs, kept or not), differentiable


class DAMOStep(NamedTuple):
    loss: torch.Tensor  # 0-dim, differentiable w.r.t. the policy (and reference) log-probs
    running_mean: torch.Tensor  # 0-dim float32, the updated g
    metrics: DAMOMetrics


# ----------------------------------------------------------------------------------------------------
# Counter-based random numbers (identical bits in every backend)
# ----------------------------------------------------------------------------------------------------

_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix64_np(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    return z ^ (z >> np.uint64(31))


def uniforms_reference(seed: int, step: int, n: int) -> torch.Tensor:
    """U_i in (0, 1), i < n, float32: key = mix(mix(seed) + step); U_i = (mix(key + (i+1) golden) >> 40 + 0.5) / 2^24."""
    with np.errstate(over="ignore"):
        key = _mix64_np(_mix64_np(np.uint64(seed)) + np.uint64(step))
        z = _mix64_np(key + (np.arange(1, n + 1, dtype=np.uint64) * np.uint64(_GOLDEN)))
    return torch.from_numpy(((z >> np.uint64(40)).astype(np.float64) + 0.5) / 2**24).float()


# ----------------------------------------------------------------------------------------------------
# Reference (SPEC.md sections 2, 3, 5, literally)
# ----------------------------------------------------------------------------------------------------


def _top_k_mask(key: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest keys (ties: lower index first)."""
    order = torch.sort(key, descending=True, stable=True).indices[:k]
    return torch.zeros(key.shape, dtype=torch.bool, device=key.device).index_fill_(0, order, True)


def _ratios(pc, pr, rc, rr, beta, running_mean, cfg: DAMOConfig):
    """(logr_w, logr_l, u, K, g, beta_i before alpha) of SPEC.md §2-3 in the log-probs' dtype; g and beta are
    constants for the gradient. A float beta is filled on the device (no host-to-device copy)."""
    logr_w, logr_l = pc - rc, pr - rr
    u = logr_w - logr_l
    dt, dev, N = u.dtype, u.device, u.shape[0]
    beta_t = (beta.detach().to(device=dev, dtype=dt) if isinstance(beta, torch.Tensor)
              else torch.full((), float(beta), dtype=dt, device=dev))
    return logr_w, logr_l, u, cfg.k(N), running_mean.detach().to(dt), beta_t.expand(N)


def damo_step_reference(pc, pr, rc, rr, beta, running_mean, cfg: DAMOConfig, *, alpha_d=None, weights=None,
                        seed: int = 0, step: int = 0) -> DAMOStep:
    """The DAMO step, eager. Inputs (N,) log-probs; beta float or (N,); running_mean 0-dim; alpha_d,
    weights (N,) or None. Differentiable w.r.t. the log-probs."""
    logr_w, logr_l, u, K, g, beta_t = _ratios(pc, pr, rc, rr, beta, running_mean, cfg)
    N, dt = u.shape[0], u.dtype
    A = u.detach()
    if cfg.variant == "paper":
        R = beta_t * A  # Eq. 9
        A = R if abs(g.item()) < 1e-6 else R / g  # Eq. 10 (R-hat)
    finite = bool(torch.isfinite(A).all()) and bool(torch.isfinite(g))

    code = cfg.select_code()
    if code == SELECT_ALL:
        keep = torch.ones(N, dtype=torch.bool, device=u.device)
    elif code == SELECT_BOTTOM:
        keep = _top_k_mask(-A, K)
    elif code == SELECT_TOP:
        keep = _top_k_mask(A, K)
    elif cfg.variant == "paper":
        keep = _top_k_mask(-((A - g) ** 2), K)  # Eq. 11: K smallest d_i
    else:
        log_w = -((A - g) ** 2) / 2
        key = log_w
        if code == SELECT_CLOSEST_SAMPLE and bool((torch.exp(log_w) > 0).any()):
            U = uniforms_reference(seed, step, N).to(device=u.device, dtype=dt)
            key = log_w + (-torch.log(-torch.log(U)))  # Gumbel-top-K == sampling without replacement ~ w
        keep = _top_k_mask(key, K)

    return _step_given_mask(u, logr_w, logr_l, A, g, keep, finite, beta_t, cfg, K, alpha_d, weights,
                            running_mean.dtype)


def _step_given_mask(u, logr_w, logr_l, A, g, keep, finite, beta_t, cfg: DAMOConfig, K: int, alpha_d, weights,
                     g_dtype) -> DAMOStep:
    """SPEC.md §3 from the kept set on: alpha_M, g, beta_i, the losses and their mean over S. ``finite``
    (a bool or a 0-dim bool tensor) False gives the documented propagation: NaN loss, empty mask, g
    unchanged (applied with torch.where: no host synchronization here)."""
    N, dt = u.shape[0], u.dtype
    keep_f = keep.to(dt)
    if cfg.variant == "official":
        alpha_m = (torch.sigmoid(A) * keep_f).sum() / K / torch.sigmoid(g)
        g_new = cfg.gamma * g + (1 - cfg.gamma) * A.mean()
    else:
        r_bar = (A * keep_f).sum() / K  # Eq. 12, mean over the K kept pairs
        alpha_m = torch.sigmoid(r_bar) / torch.sigmoid(g)  # Eq. 13
        g_new = cfg.gamma * g + (1 - cfg.gamma) * r_bar  # Eq. 15
    a_m = alpha_m if cfg.use_alpha_m else torch.ones((), dtype=dt, device=u.device)
    a_d = alpha_d.to(dt) if (cfg.use_alpha_d and alpha_d is not None) else torch.ones(N, dtype=dt, device=u.device)
    alpha = a_d * a_m if cfg.combine == "product" else (1 - cfg.rho) * a_m + cfg.rho * a_d
    beta_i = torch.clamp(beta_t * alpha, min=cfg.min_beta()) if cfg.variant == "official" else beta_t * alpha
    losses = pair_loss_reference(u, beta_i, cfg.loss_type, cfg.label_smoothing)
    wt = keep_f if weights is None else keep_f * weights.to(dt)
    loss = (wt * losses).sum() / wt.sum()
    r_w, r_l = (beta_i * logr_w).detach(), (beta_i * logr_l).detach()
    if finite is not True:  # documented propagation: NaN loss, empty mask, g unchanged
        ok = torch.as_tensor(finite, device=u.device)
        scale = torch.where(ok, torch.ones((), dtype=dt, device=u.device), float("nan"))  # NaN gradients too
        loss, losses = loss * scale, losses * scale
        keep = keep & ok
        g_new = torch.where(ok, g_new, g)
    metrics = DAMOMetrics(keep, a_m.detach(), beta_i, r_w, r_l, r_w - r_l, r_w > r_l, losses)
    return DAMOStep(loss, g_new.detach().to(g_dtype), metrics)


# ----------------------------------------------------------------------------------------------------
# Beyond one Triton program (N > MAX_FUSED_N): the same step in PyTorch ops, with no host synchronization
# ----------------------------------------------------------------------------------------------------

_M64 = 1 << 64


def _i64(x: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return x - _M64 if x >= 1 << 63 else x


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> on int64 is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix64_t(z: torch.Tensor) -> torch.Tensor:  # int64 arithmetic wraps modulo 2^64 like uint64
    z = (z ^ _shr(z, 30)) * _i64(_MIX1)
    z = (z ^ _shr(z, 27)) * _i64(_MIX2)
    return z ^ _shr(z, 31)


def uniforms_device(seed: int, step: int | torch.Tensor, n: int, device) -> torch.Tensor:
    """:func:`uniforms_reference`'s bits computed on ``device`` (``step`` may be a 0-dim int64 tensor
    there): float32 U_i, no host round trip."""
    with np.errstate(over="ignore"):
        mixed_seed = int(_mix64_np(np.uint64(seed)))
    step_t = step if isinstance(step, torch.Tensor) else torch.full((), step, dtype=torch.int64, device=device)
    key = _mix64_t(step_t.to(device=device, dtype=torch.int64) + _i64(mixed_seed))
    i = torch.arange(1, n + 1, dtype=torch.int64, device=device)
    z = _mix64_t(key + i * _i64(_GOLDEN))
    return (_shr(z, 40).to(torch.float32) + 0.5) * (1.0 / 16777216.0)


def _rank_mask(key: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest keys rounded to float32, ties towards the lower index (the kernels' ordering),
    through one on-device top-k of packed (key bits, index) int64 values."""
    n = key.shape[0]
    kb = key.to(torch.float32).view(torch.int32)
    ordered = torch.where(kb < 0, kb ^ 0x7FFFFFFF, kb).to(torch.int64)
    comp = (ordered << 32) | (n - 1 - torch.arange(n, device=key.device))
    thr = torch.topk(comp, k).values[-1:]
    return comp >= thr


def damo_step_unfused(pc, pr, rc, rr, beta, running_mean, cfg: DAMOConfig, *, alpha_d=None, weights=None,
                      seed: int = 0, step: int | torch.Tensor = 0) -> DAMOStep:
    """The step of :func:`damo_step_reference` for batches one Triton program cannot hold: PyTorch ops
    only (several launches), no host synchronization (``step`` may be a device tensor), the kernels'
    float32 key ordering and random bits. Differentiable w.r.t. the log-probs."""
    logr_w, logr_l, u, K, g, beta_t = _ratios(pc, pr, rc, rr, beta, running_mean, cfg)
    N, dt = u.shape[0], u.dtype
    A = u.detach()
    if cfg.variant == "paper":
        R = beta_t * A
        A = torch.where(g.abs() < 1e-6, R, R / torch.where(g.abs() < 1e-6, torch.ones_like(g), g))
    finite = torch.isfinite(A).all() & torch.isfinite(g)
    code = cfg.select_code()
    if code == SELECT_ALL:
        keep = torch.ones(N, dtype=torch.bool, device=u.device)
    elif code in (SELECT_BOTTOM, SELECT_TOP):
        keep = _rank_mask(-A if code == SELECT_BOTTOM else A, K)
    elif cfg.variant == "paper":
        keep = _rank_mask(-((A - g) ** 2), K)
    else:
        key = -((A - g) ** 2) / 2
        if code == SELECT_CLOSEST_SAMPLE:
            gumbel = -torch.log(-torch.log(uniforms_device(seed, step, N, u.device)))
            key = torch.where(torch.exp(key.max()) > 0, key + gumbel.to(dt), key)
        keep = _rank_mask(key, K)
    return _step_given_mask(u, logr_w, logr_l, A, g, keep, finite, beta_t, cfg, K, alpha_d, weights,
                            running_mean.dtype)


# ----------------------------------------------------------------------------------------------------
# Triton kernel: the whole step in one program (N <= MAX_FUSED_N)
# ----------------------------------------------------------------------------------------------------

# One program holds and sorts the whole batch: 8192 pairs fit (a DAMO batch is 16 to a few thousand
# pairs). Larger batches take damo_step_unfused (PyTorch ops: several launches, no host synchronization).
MAX_FUSED_N = 8192


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
def _damo_step_kernel(
        PC, PR, RC, RR, BETA, ALPHA_D, WEIGHTS, G, STEP,
        LOSS, LOSSES, KEEP, BETA_OUT, RW, RL, MARGINS, ACCURACIES, GRAD_U, DL_DU, G_OUT, ALPHA_M_OUT,
        N, K, beta_scalar, stride_beta, gamma, rho, eps, min_beta, seed, step_scalar,
        PAPER: tl.constexpr, SELECT: tl.constexpr, LOSS_KIND: tl.constexpr, USE_M: tl.constexpr,
        USE_D: tl.constexpr, COMBINE_SUM: tl.constexpr, HAS_BETA_T: tl.constexpr, HAS_W: tl.constexpr,
        STEP_IS_T: tl.constexpr, INCR_STEP: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK_N: tl.constexpr):
    acc = tl.float64 if ACC_FP64 else tl.float32
    offs = tl.arange(0, BLOCK_N)
    m = offs < N
    logr_w = tl.load(PC + offs, mask=m, other=0.0).to(acc) - tl.load(RC + offs, mask=m, other=0.0).to(acc)
    logr_l = tl.load(PR + offs, mask=m, other=0.0).to(acc) - tl.load(RR + offs, mask=m, other=0.0).to(acc)
    u = logr_w - logr_l
    g = tl.load(G).to(acc)
    if HAS_BETA_T:
        beta = tl.load(BETA + offs * stride_beta, mask=m, other=1.0).to(acc)
    else:
        beta = tl.zeros((BLOCK_N,), acc) + beta_scalar
    A = u
    if PAPER:
        R = beta * u
        A = tl.where(tl.abs(g) < 1e-6, R, R / tl.where(tl.abs(g) < 1e-6, 1.0, g))
    n_bad = tl.sum(tl.where(m & ((A != A) | (tl.abs(A) == float("inf"))), 1, 0), 0)
    bad = (n_bad > 0) | (g != g) | (tl.abs(g) == float("inf"))

    # ---- the kept set S: rank by a key; ties towards the lower index ----
    if SELECT == 0:
        keep = m
    else:
        if SELECT == 3:
            key = -A
        elif SELECT == 4:
            key = A
        elif PAPER:
            key = -(A - g) * (A - g)
        else:
            key = -(A - g) * (A - g) / 2  # log w
            if SELECT == 2:
                w = tl.exp(key)
                any_w = tl.max(tl.where(m, w, 0.0), 0) > 0.0
                if STEP_IS_T:
                    step = tl.load(STEP).to(tl.uint64)
                else:
                    step = tl.zeros((), tl.uint64) + step_scalar
                rkey = _mix64(_mix64(tl.zeros((), tl.uint64) + seed) + step)
                z = _mix64(rkey + (offs + 1).to(tl.uint64) * 0x9E3779B97F4A7C15)
                U = ((z >> 40).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
                gumbel = -tl.log(-tl.log(U))
                key = tl.where(any_w, key + gumbel.to(acc), key)
        kb = key.to(tl.float32).to(tl.int32, bitcast=True)
        ordered = tl.where(kb < 0, kb ^ 0x7FFFFFFF, kb)
        comp = (ordered.to(tl.int64) << 32) | (BLOCK_N - 1 - offs).to(tl.int64)
        comp = tl.where(m, comp, -9223372036854775807 - 1)
        ranked = tl.sort(comp, descending=True)
        thr = tl.sum(tl.where(offs == K - 1, ranked, 0), 0)
        keep = m & (comp >= thr)
    keep_f = tl.where(keep, 1.0, 0.0).to(acc)

    # ---- alpha_M and the running mean ----
    if PAPER:
        r_bar = tl.sum(A * keep_f, 0) / K
        alpha_m = _sigmoid(r_bar) / _sigmoid(g)
        g_new = gamma * g + (1 - gamma) * r_bar
    else:
        alpha_m = tl.sum(_sigmoid(A) * keep_f, 0) / K / _sigmoid(g)
        g_new = gamma * g + (1 - gamma) * tl.sum(tl.where(m, A, 0.0), 0) / N
    if not USE_M:
        alpha_m = tl.full((), 1.0, acc)
    if USE_D:
        a_d = tl.load(ALPHA_D + offs, mask=m, other=1.0).to(acc)
    else:
        a_d = tl.zeros((BLOCK_N,), acc) + 1.0
    if COMBINE_SUM:
        alpha = (1 - rho) * alpha_m + rho * a_d
    else:
        alpha = a_d * alpha_m
    beta_i = tl.maximum(beta * alpha, min_beta)

    # ---- per-pair loss, its derivative in u, and the (weighted) mean over S ----
    mm = beta_i * u
    if LOSS_KIND == 0:
        losses = -(1 - eps) * _logsigmoid(mm) - eps * _logsigmoid(-mm)
        dl_du = beta_i * (-(1 - eps) * _sigmoid(-mm) + eps * _sigmoid(mm))
    elif LOSS_KIND == 1:
        d = u - 1 / (2 * beta_i)
        losses = d * d
        dl_du = 2 * d
    else:
        losses = tl.maximum(1 - mm, 0.0)
        dl_du = tl.where(1 - mm > 0, -beta_i, 0.0)
    wt = keep_f
    if HAS_W:
        wt = wt * tl.load(WEIGHTS + offs, mask=m, other=0.0).to(acc)
    denom = tl.sum(wt, 0)
    loss = tl.sum(wt * losses, 0) / denom
    grad_u = wt / denom * dl_du

    nan = float("nan")
    loss = tl.where(bad, nan, loss)
    losses = tl.where(bad, nan, losses)
    grad_u = tl.where(bad, nan, grad_u)
    keep = tl.where(bad, 0.0, keep_f) > 0.5
    g_new = tl.where(bad, g, g_new)

    tl.store(LOSS, loss)
    tl.store(ALPHA_M_OUT, alpha_m)
    tl.store(G_OUT, g_new.to(G_OUT.dtype.element_ty))
    tl.store(LOSSES + offs, losses, mask=m)
    tl.store(KEEP + offs, keep.to(tl.uint8), mask=m)
    tl.store(BETA_OUT + offs, beta_i, mask=m)
    r_w, r_l = beta_i * logr_w, beta_i * logr_l
    tl.store(RW + offs, r_w, mask=m)
    tl.store(RL + offs, r_l, mask=m)
    tl.store(MARGINS + offs, r_w - r_l, mask=m)
    tl.store(ACCURACIES + offs, (r_w > r_l).to(tl.uint8), mask=m)
    tl.store(GRAD_U + offs, grad_u, mask=m)
    tl.store(DL_DU + offs, dl_du, mask=m)
    if INCR_STEP:
        tl.store(STEP, tl.load(STEP) + 1)


# ----------------------------------------------------------------------------------------------------
# Backward (Triton): gu = grad_loss * dloss/du + grad_losses * dl/du; grad pc = grad rr = gu, pr/rc = -gu
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _damo_step_bwd_kernel(GRAD_U, DL_DU, G_LOSS, G_LOSSES, POS, NEG, N, stride_gls, HAS_GL: tl.constexpr,
                          HAS_GLS: tl.constexpr, NEED_NEG: tl.constexpr, BLOCK_N: tl.constexpr):
    offs = tl.arange(0, BLOCK_N)
    m = offs < N
    gu = tl.zeros((BLOCK_N,), GRAD_U.dtype.element_ty)
    if HAS_GL:
        gu += tl.load(GRAD_U + offs, mask=m, other=0.0) * tl.load(G_LOSS)
    if HAS_GLS:
        gu += tl.load(G_LOSSES + offs * stride_gls, mask=m, other=0.0) * tl.load(DL_DU + offs, mask=m, other=0.0)
    tl.store(POS + offs, gu, mask=m)
    if NEED_NEG:
        tl.store(NEG + offs, -gu, mask=m)


# ----------------------------------------------------------------------------------------------------
# Launchers. Inputs are (N,) tensors on one device (contiguous for Triton; any stride for C++).
# ----------------------------------------------------------------------------------------------------


class StepInputs(NamedTuple):
    pc: torch.Tensor
    pr: torch.Tensor
    rc: torch.Tensor
    rr: torch.Tensor
    beta: float | torch.Tensor  # float, 0-dim or (N,) tensor
    alpha_d: torch.Tensor | None
    weights: torch.Tensor | None
    g: torch.Tensor  # 0-dim running mean (read)
    g_out: torch.Tensor  # 0-dim, receives the updated running mean (may be g itself)
    step: int | torch.Tensor  # 0-dim int64 tensor: read on device (and incremented when incr_step)
    seed: int
    incr_step: bool
    check: bool = False  # C++ only: raise on non-finite inputs or beta <= 0 (Triton: checked by the caller)


class StepOutputs(NamedTuple):
    """What every backend returns (the order of the mmalign::damo_step operator's outputs)."""

    loss: torch.Tensor
    losses: torch.Tensor
    keep: torch.Tensor
    beta: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracies: torch.Tensor
    alpha_m: torch.Tensor


class KernelArgs(NamedTuple):
    K: int
    gamma: float
    rho: float
    eps: float
    min_beta: float
    paper: bool
    select: int
    loss_kind: int
    use_m: bool
    combine_sum: bool


@functools.lru_cache(maxsize=1024)
def kernel_args(cfg: DAMOConfig, n: int) -> KernelArgs:
    """The configuration as the kernels take it, for a batch of n pairs (cached: configs are frozen)."""
    return KernelArgs(cfg.k(n), float(cfg.gamma), float(cfg.rho), float(cfg.label_smoothing), cfg.min_beta(),
                      cfg.variant == "paper", cfg.select_code(), LOSS_TYPES.index(cfg.loss_type), cfg.use_alpha_m,
                      cfg.combine == "sum")


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _one_program(n: int) -> dict:
    """Block and warps of the kernels that hold the whole batch of n pairs in one program."""
    return dict(BLOCK_N=max(16, triton.next_power_of_2(n)), num_warps=4 if n <= 1024 else 8)


def _triton_fwd(x: StepInputs, cfg: DAMOConfig):
    """The forward kernel: (StepOutputs, d loss / d u, d l_i / d u_i)."""
    N, dt, dev = x.pc.shape[0], _acc(x.pc.dtype), x.pc.device
    k = kernel_args(cfg, N)
    vec = lambda dtype=dt: torch.empty(N, dtype=dtype, device=dev)  # noqa: E731
    loss, alpha_m = torch.empty((), dtype=dt, device=dev), torch.empty((), dtype=dt, device=dev)
    losses, beta_i, r_w, r_l, margins, grad_u, dl_du = (vec() for _ in range(7))
    keep, acc = vec(torch.uint8), vec(torch.uint8)
    beta_t = x.beta if isinstance(x.beta, torch.Tensor) else None
    step_t = x.step if isinstance(x.step, torch.Tensor) else None
    dummy = x.pc
    _damo_step_kernel[(1,)](
        x.pc, x.pr, x.rc, x.rr, beta_t if beta_t is not None else dummy,
        x.alpha_d if x.alpha_d is not None else dummy, x.weights if x.weights is not None else dummy,
        x.g, step_t if step_t is not None else dummy,
        loss, losses, keep, beta_i, r_w, r_l, margins, acc, grad_u, dl_du, x.g_out, alpha_m,
        N, k.K, 0.0 if beta_t is not None else float(x.beta),
        (beta_t.stride(0) if beta_t.dim() else 0) if beta_t is not None else 0,
        k.gamma, k.rho, k.eps, k.min_beta, int(x.seed), 0 if step_t is not None else int(x.step),
        PAPER=k.paper, SELECT=k.select, LOSS_KIND=k.loss_kind, USE_M=k.use_m,
        USE_D=cfg.use_alpha_d and x.alpha_d is not None, COMBINE_SUM=k.combine_sum,
        HAS_BETA_T=beta_t is not None, HAS_W=x.weights is not None, STEP_IS_T=step_t is not None,
        INCR_STEP=x.incr_step and step_t is not None, ACC_FP64=x.pc.dtype == torch.float64,
        **_one_program(N))
    out = StepOutputs(loss, losses, keep.view(torch.bool), beta_i, r_w, r_l, margins, acc.view(torch.bool), alpha_m)
    return out, grad_u, dl_du


def _triton_bwd(grad_u, dl_du, g_loss, g_losses, need_neg: bool):
    N = grad_u.shape[0]
    pos = torch.empty_like(grad_u)
    neg = torch.empty_like(grad_u) if need_neg else pos
    _damo_step_bwd_kernel[(1,)](
        grad_u, dl_du, g_loss if g_loss is not None else grad_u, g_losses if g_losses is not None else grad_u,
        pos, neg, N, g_losses.stride(0) if g_losses is not None else 0, HAS_GL=g_loss is not None,
        HAS_GLS=g_losses is not None, NEED_NEG=need_neg, **_one_program(N))
    return pos, neg


class DAMOStepFunction(torch.autograd.Function):
    """Autograd for the Triton kernels: (pc, pr, rc, rr) -> StepOutputs; the updated running mean is
    written into ``inputs.g_out``. The gradient is closed-form and computed by the forward kernel
    (d loss / d u_i is saved), so backward is one small kernel (u = pc - rc - pr + rr). The C++ backend
    has the same Function in C++ (csrc/damo_step_autograd.cpp)."""

    @staticmethod
    def forward(ctx, pc, pr, rc, rr, inputs: StepInputs, cfg: DAMOConfig):
        out, grad_u, dl_du = _triton_fwd(inputs._replace(pc=pc, pr=pr, rc=rc, rr=rr), cfg)
        ctx.save_for_backward(grad_u, dl_du)
        ctx.mark_non_differentiable(*out[2:])
        return tuple(out)

    @staticmethod
    def backward(ctx, g_loss, g_losses, *_):
        need = ctx.needs_input_grad
        pos, neg = _triton_bwd(*ctx.saved_tensors, g_loss, g_losses, need[1] or need[2])
        return (pos if need[0] else None, neg if need[1] else None, neg if need[2] else None,
                pos if need[3] else None, None, None)


@functools.lru_cache(maxsize=None)
def _op(name: str):
    """The C++ operator's callable, without torch.ops' Python-level OpOverloadPacket/OpOverload calls."""
    overload = getattr(torch.ops.mmalign, name).default
    return getattr(overload, "_op", overload)


def _cpp_step(x: StepInputs, cfg: DAMOConfig):
    N = x.pc.shape[0]
    beta_t = x.beta if isinstance(x.beta, torch.Tensor) else None
    step_t = x.step if isinstance(x.step, torch.Tensor) else None
    return _op("damo_step")(
        x.pc, x.pr, x.rc, x.rr, beta_t.expand(N) if beta_t is not None else None,
        0.0 if beta_t is not None else float(x.beta), x.alpha_d if cfg.use_alpha_d else None, x.weights,
        x.g, x.g_out, step_t, 0 if step_t is not None else int(x.step), int(x.seed), *kernel_args(cfg, N),
        x.incr_step and step_t is not None, x.check)


def fused_step(backend: str, x: StepInputs, cfg: DAMOConfig) -> StepOutputs:
    """One fused step on ``backend`` ("triton" or "cpp"); differentiable w.r.t. x.pc, pr, rc, rr."""
    if backend == "cpp":
        return StepOutputs(*_cpp_step(x, cfg))
    x = x._replace(pc=x.pc.contiguous(), pr=x.pr.contiguous(), rc=x.rc.contiguous(), rr=x.rr.contiguous(),
                   beta=x.beta.contiguous() if isinstance(x.beta, torch.Tensor) else x.beta,
                   alpha_d=None if x.alpha_d is None else x.alpha_d.contiguous(),
                   weights=None if x.weights is None else x.weights.contiguous())
    return StepOutputs(*DAMOStepFunction.apply(x.pc, x.pr, x.rc, x.rr, x, cfg))
