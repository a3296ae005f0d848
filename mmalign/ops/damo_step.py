"""The model-aware DAMO step (docs/math.md sections 2, 3 and 5): configuration, output, eager reference, and the call
of each backend's operator (``mmalign::damo_step``, C++ with C++ autograd; ``mmalign::damo_step_triton``, whose
kernels are in :mod:`mmalign.ops.damo_step_triton`). Which backend runs is decided by the caller
(:mod:`mmalign._dispatch`), never here.

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
(ordering by A_i). l is the per-pair loss of docs/math.md section 2; beta_i is a constant for gradients.

Random numbers: U_i = uniform(seed, step, i) from a counter-based splitmix64 hash, the same bits in the
reference (numpy), the Triton kernel and the C++ kernel, so every backend, rank and run draws the same
mask for the same (seed, step). Ordering ties break towards the lower index; the kernels order keys
rounded to float32.

Non-finite inputs (a NaN or +-inf margin, or a non-finite running mean): loss and per-pair losses are
NaN, the keep mask is all False, gradients are NaN, and the running mean is left unchanged. With
``check_inputs=True`` (the default) the functional API raises before that, naming the argument.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import torch

from .damo_step_triton import KernelArgs  # (the module defines the operator mmalign::damo_step_triton)
from ._library import bump_versions, operator
from .limits import (LOSS_TYPES, OFFICIAL_MIN_BETA, SELECT_ALL, SELECT_BOTTOM, SELECT_CLOSEST, SELECT_CLOSEST_SAMPLE,
                     SELECT_TOP)
from .preference_loss import check_loss, pair_loss_reference

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

@dataclass(frozen=True, eq=False)
class DAMOConfig:
    """Everything that decides the DAMO step but the data (see the module docstring and docs/math.md §3/§5). Build one
    with the fields themselves (``DAMOConfig(variant="paper", keep=12)``, checked when used) or from a preset of
    docs/math.md §5 (``DAMOConfig.from_preset("mdpo", selection="topk")``, checked at once)."""

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
        unknown = sorted(set(overrides) - {f.name for f in fields(DAMOConfig)})
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: unknown DAMO option(s); expected some of "
                             f"{[f.name for f in fields(DAMOConfig)]}")
        base = dict(PRESETS[preset]) if preset else {}
        base.update(overrides)
        cfg = DAMOConfig(**base)
        cfg.validate()
        cfg._refuse_unread(overrides, preset)
        return cfg

    def _refuse_unread(self, given: dict, preset: str | None) -> None:
        """An argument given explicitly that this configuration never reads, because of a setting the caller did
        not give (the preset's or the default), is an error, not silently ignored: ``preset="dpo", keep=0.5``
        filters nothing, the preset keeps every pair. (``filter="none", keep=3`` is a choice: it passes.)"""
        unread = {  # argument: (the settings that make it unread, why)
            "keep": ({"filter"} if self.filter == "none" else set(), "filter='none' keeps every pair"),
            "selection": ({n for n, unread in (("variant", self.variant == "paper"), ("filter", self.filter != "both"))
                           if unread}, "only variant='official' with filter='both' selects by sampling or top-K"),
            "rho": ({"combine"} if self.combine != "sum" else set(),
                    "only combine='sum' mixes alpha_M and alpha_D with rho"),
        }
        for name, (causes, why) in unread.items():
            if name in given and causes and not causes & given.keys():
                where = f" (preset {preset!r})" if preset else " (the default)"
                raise ValueError(f"{name}: has no effect here{where}: {why}")

    def validate(self) -> None:
        _cached(_validate)(self)

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
        check_loss(self.loss_type, self.label_smoothing)

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


def _cached(fn):
    """An lru_cache'd function, or the function it wraps while torch.compile traces (Dynamo would trace through
    the cache anyway, with a warning): the cache saves Python time on every eager step, a trace runs once."""
    return fn.__wrapped__ if torch.compiler.is_compiling() else fn


@functools.lru_cache(maxsize=256)
def _validate(cfg: DAMOConfig) -> None:  # configurations are frozen: check each one once
    cfg._check()


class DAMOStepOutput(NamedTuple):
    """Result of :func:`mmalign.functional.damo_step` and :class:`mmalign.nn.DAMOLoss`. The first six fields are
    those of :class:`mmalign.ops.preference_loss.PreferenceLossOutput`, in the same order; all but ``loss`` and
    ``losses`` are detached."""

    loss: torch.Tensor  # 0-dim, (weighted) mean over S; differentiable w.r.t. the four log-probs
    losses: torch.Tensor  # (N,) per-pair losses l(beta_i, u_i) (all pairs, kept or not), differentiable
    chosen_rewards: torch.Tensor  # (N,) beta_i * logr_w
    rejected_rewards: torch.Tensor  # (N,) beta_i * logr_l
    margins: torch.Tensor  # (N,) chosen_rewards - rejected_rewards
    accuracies: torch.Tensor  # (N,) bool, chosen_rewards > rejected_rewards
    keep: torch.Tensor  # (N,) bool, the kept set S
    alpha_m: torch.Tensor  # 0-dim, model-aware factor (1 when unused)
    beta: torch.Tensor  # (N,) per-pair beta_i used in the loss
    running_mean: torch.Tensor  # 0-dim float32, the updated g (the argument itself when updated in place)


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
# Reference (docs/math.md sections 2, 3, 5, literally)
# ----------------------------------------------------------------------------------------------------


def _top_k_mask(key: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest keys (ties: lower index first)."""
    order = torch.sort(key, descending=True, stable=True).indices[:k]
    return torch.zeros(key.shape, dtype=torch.bool, device=key.device).index_fill_(0, order, True)


def damo_step_reference(pc, pr, rc, rr, beta, running_mean, cfg: DAMOConfig, *, alpha_d=None, weights=None,
                        seed: int = 0, step: int = 0) -> DAMOStepOutput:
    """The DAMO step, eager. Inputs (N,) log-probs; beta float or (N,); running_mean 0-dim; alpha_d,
    weights (N,) or None. Differentiable w.r.t. the log-probs."""
    logr_w, logr_l = pc - rc, pr - rr
    u = logr_w - logr_l
    dt, dev, N = u.dtype, u.device, u.shape[0]
    K, g = cfg.k(N), running_mean.detach().to(dt)  # g and beta are constants for the gradient
    beta_t = (beta.detach().to(device=dev, dtype=dt) if isinstance(beta, torch.Tensor)
              else torch.full((), float(beta), dtype=dt, device=dev)).expand(N)
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
    if not finite:  # documented propagation: NaN loss, empty mask, g unchanged
        nan = torch.full((), float("nan"), dtype=dt, device=u.device)
        loss, losses = loss * nan, losses * nan  # NaN gradients too
        keep = torch.zeros_like(keep)
        g_new = g
    return DAMOStepOutput(loss, losses, r_w, r_l, r_w - r_l, r_w > r_l, keep, a_m.detach(), beta_i,
                          g_new.detach().to(running_mean.dtype))


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


def kernel_args(cfg: DAMOConfig, n: int) -> KernelArgs:
    """The configuration as the kernels take it, for a batch of n pairs (cached: configs are frozen); raises when
    the configuration keeps more pairs than n."""
    return _cached(_kernel_args)(cfg, n)


@functools.lru_cache(maxsize=1024)
def _kernel_args(cfg: DAMOConfig, n: int) -> KernelArgs:
    return KernelArgs(cfg.k(n), float(cfg.gamma), float(cfg.rho), float(cfg.label_smoothing), cfg.min_beta(),
                      cfg.variant == "paper", cfg.select_code(), LOSS_TYPES.index(cfg.loss_type), cfg.use_alpha_m,
                      cfg.combine == "sum")


def plain_loss_kernel_args(n: int, loss_type: str, label_smoothing: float) -> KernelArgs:
    """The step that is exactly docs/math.md §2's loss: every pair kept, alpha = 1, no beta clamp ("paper" variant
    without a filter; gamma and rho, which then only touch a running mean nobody reads, at their defaults)."""
    return KernelArgs(n, 0.9, 0.5, float(label_smoothing), -math.inf, True, SELECT_ALL, LOSS_TYPES.index(loss_type),
                      False, False)


def fused_step(backend: str, x: StepInputs, k: KernelArgs) -> tuple:
    """One fused step on ``backend`` ("triton", or "cpp" / "cuda": the C++ operator with its C++ autograd) with
    the kernel arguments ``k`` (:func:`kernel_args`); x.alpha_d is None unless the configuration uses it.
    Differentiable w.r.t. x.pc, pr, rc, rr. Returns (loss, losses, keep, beta_i, chosen_rewards, rejected_rewards,
    margins, accuracies, alpha_M), the outputs of mmalign::damo_step; x.g_out receives the updated running mean.
    ``backend`` is what mmalign._dispatch.select chose for these inputs (past the CUDA kernel's one thread block
    it chooses "triton")."""
    beta_t = x.beta if isinstance(x.beta, torch.Tensor) else None
    step_t = x.step if isinstance(x.step, torch.Tensor) else None
    beta_s = 0.0 if beta_t is not None else float(x.beta)
    step_s = 0 if step_t is not None else int(x.step)
    incr = x.incr_step and step_t is not None
    if backend != "triton":
        out = operator("damo_step")(
            x.pc, x.pr, x.rc, x.rr, beta_t.expand(x.pc.shape[0]) if beta_t is not None else None, beta_s, x.alpha_d,
            x.weights, x.g, x.g_out, step_t, step_s, int(x.seed), *k, incr, x.check)
        bump_versions(x.g_out, step_t if incr else None)
        return out
    # the Triton operator reads and updates one running-mean tensor: g itself in place, else the g_out buffer
    if x.g_out is not x.g:
        x.g_out.copy_(x.g)
    return operator("damo_step_triton")(x.pc, x.pr, x.rc, x.rr, beta_t, beta_s, x.alpha_d, x.weights, x.g_out, step_t,
                                        step_s, int(x.seed), *k, incr)
