"""Public functional API (torch.nn.functional style). Each function checks its arguments, picks a backend through
mmalign._dispatch (under its own name), and calls that backend's operators (``torch.ops.mmalign.*``) or the
eager reference.

Conventions, the same in every function:
* the input tensors come first and positionally, in the order of the formula (the four log-probs of a pair:
  policy chosen, policy rejected, reference chosen, reference rejected); ``beta`` follows them, positional or
  keyword; every option is keyword-only;
* the result is a tensor, or a NamedTuple named ``...Output`` whose fields never depend on the arguments;
  configurations (:class:`DAMOConfig`) and outputs are importable from here and from :mod:`mmalign.nn`;
* nothing communicates unless handed a process group (``group=``): with ``group=None`` a call sees this process's
  tensors only, whether or not torch.distributed is initialized;
* under ``torch.compile`` every function traces whole (``fullgraph=True``); the value checks that need a host
  synchronization (label range, finite log-probs) are skipped while compiling (the C++ DAMO kernel still makes
  its own, in the kernel).
"""
from __future__ import annotations

import math

import torch
import torch.distributed

from . import _checks, _dispatch
from .attention.masked import masked_attention
from .ops.damo_step import (DAMOConfig, DAMOStepOutput, StepInputs, damo_step_reference, fused_step, kernel_args,
                            plain_loss_kernel_args)
from .ops.fused_linear_sequence_logps import (FusedLinearTokenLogpsFunction, chunk_rows,
                                              fused_linear_token_logps_reference)
from .ops.preference_loss import PreferenceLossOutput, check_loss, preference_loss_reference
from .ops.sequence_logps import TokenLogpsFunction, reduce_token_logps, token_logps_reference

_DIST_AVAILABLE = torch.distributed.is_available()
_DEFAULT_CONFIG = DAMOConfig()

__all__ = ["token_logps", "sequence_logps", "fused_linear_token_logps", "fused_linear_sequence_logps",
           "preference_loss", "damo_step", "masked_attention", "PreferenceLossOutput", "DAMOStepOutput", "DAMOConfig"]


def _check_values(check: bool) -> bool:
    """Whether to run a value check that synchronizes with the host: not while torch.compile traces."""
    return check and not torch.compiler.is_compiling()


# ----------------------------------------------------------------------------------------------------
# Log-probabilities (docs/math.md section 1)
# ----------------------------------------------------------------------------------------------------


def _check_logps_inputs(logits, labels, ignore_index, check_labels):
    _checks.tensor("logits", logits, dim=3, dtypes=_checks.FLOATS)
    _checks.tensor("labels", labels, shape=tuple(logits.shape[:2]), device=logits.device,
                   dtypes=(torch.int64, torch.int32))
    if not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    if _check_values(check_labels):
        _checks.labels("labels", labels, logits.shape[-1], ignore_index)


def _token_logps(op, logits, labels, ignore_index, inplace_backward, check_labels, backend):
    _check_logps_inputs(logits, labels, ignore_index, check_labels)
    labels = labels.long().contiguous()
    name = _dispatch.select(op, logits.device, logits.dtype, backend)
    if name == "reference":
        return token_logps_reference(logits, labels, ignore_index)
    if logits.shape[-1] > 1 and logits.stride(-1) != 1:
        logits = logits.contiguous()
    return TokenLogpsFunction.apply(logits, labels, ignore_index, name, inplace_backward)


def token_logps(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                inplace_backward: bool = False, check_labels: bool = True, backend: str | None = None) -> torch.Tensor:
    """Per-token label log-probabilities, docs/math.md section 1: ``z[b,t,y] - logsumexp_v z[b,t,v]``, fused (no
    log_softmax, no fp32 copy of the logits).

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
    return _token_logps("token_logps", logits, labels, ignore_index, inplace_backward, check_labels, backend)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                   reduction: str = "sum", inplace_backward: bool = False, check_labels: bool = True,
                   backend: str | None = None) -> torch.Tensor:
    """Sequence log-probabilities of the labels, docs/math.md section 1: ``logp[b] = sum_t tok[b,t]``
    (reduction="sum") or ``/ n_b`` non-ignored tokens ("mean"; 0 tokens give 0), with ``tok`` of
    :func:`token_logps` (same arguments). Returns (B,) float32 (float64 for float64 logits); for the per-token
    values as well, call :func:`token_logps` and sum over T (``logp = tok.sum(-1)`` is exactly the "sum").

    Backends: triton (CUDA), cuda (CUDA C++), cpp (CPU C++), reference (eager)."""
    _checks.choice("reduction", reduction, ("sum", "mean"))
    tok = _token_logps("sequence_logps", logits, labels, ignore_index, inplace_backward, check_labels, backend)
    return reduce_token_logps(tok, labels, ignore_index, reduction)


def fused_linear_token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                             bias: torch.Tensor | None = None, ignore_index: int = -100, chunk_size: int | None = None,
                             memory_budget_mb: float = 256.0, accumulate_fp32: bool = True, check_labels: bool = True,
                             logit_scale: float = 1.0, logit_softcap: float | None = None,
                             backend: str | None = None) -> torch.Tensor:
    """``token_logps(hidden @ weight.T + bias, labels)`` without the logits of all tokens, docs/math.md §1.

    Only positions whose label is not ``ignore_index`` are computed (gathered first: one host
    synchronization for their count; under torch.compile every position, the ignored ones giving 0),
    ``chunk_size`` rows at a time; ``chunk_size=None`` picks the largest chunk whose logits fit
    ``memory_budget_mb``. Gradients flow to hidden, weight and bias.

    Args:
        hidden: (B, T, H) final hidden states, aligned with ``labels`` (position t predicts labels[b,t]).
        weight: (V, H) LM head; bias: (V,) or None. Same dtype and device as ``hidden``.
        labels: (B, T) int64, values in [0, V) or ``ignore_index``.
        accumulate_fp32: accumulate grad_weight/grad_bias in fp32 across chunks for fp16/bf16.
        logit_scale, logit_softcap: the model family's transform of the head's output, if any
            (:func:`mmalign.models.logit_transform` reads it from a Hugging Face model): the logits are
            ``softcap * tanh(logit_scale * z / softcap)`` (Gemma-2's soft-capping; Cohere multiplies by a
            scale, Granite divides: scale = 1 / logits_scaling).
    Under ``torch.autocast`` the op does what autocast does for a linear layer: hidden, weight and bias are
    cast to the autocast dtype (differentiably: an fp32 weight gets its gradient in fp32), and forward and
    backward both run in that dtype.
    Returns: (B, T) float32 (float64 for float64 inputs), 0 at ignored positions."""
    return _fused_linear("fused_linear_token_logps", hidden, weight, labels, bias, ignore_index, chunk_size,
                         memory_budget_mb, accumulate_fp32, check_labels, logit_scale, logit_softcap, backend)


def fused_linear_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                                bias: torch.Tensor | None = None, ignore_index: int = -100,
                                reduction: str = "sum", chunk_size: int | None = None,
                                memory_budget_mb: float = 256.0, accumulate_fp32: bool = True,
                                check_labels: bool = True, logit_scale: float = 1.0,
                                logit_softcap: float | None = None, backend: str | None = None) -> torch.Tensor:
    """``sequence_logps(hidden @ weight.T + bias, labels)`` without the logits of all tokens, docs/math.md §1: the
    per-token values of :func:`fused_linear_token_logps` (same arguments) reduced over T ("sum" or "mean", as in
    :func:`sequence_logps`). Returns (B,) float32 (float64 for float64 inputs)."""
    _checks.choice("reduction", reduction, ("sum", "mean"))
    tok = _fused_linear("fused_linear_sequence_logps", hidden, weight, labels, bias, ignore_index, chunk_size,
                        memory_budget_mb, accumulate_fp32, check_labels, logit_scale, logit_softcap, backend)
    return reduce_token_logps(tok, labels, ignore_index, reduction)


def _fused_linear(op, hidden, weight, labels, bias, ignore_index, chunk_size, memory_budget_mb, accumulate_fp32,
                  check_labels, logit_scale, logit_softcap, backend):
    if isinstance(hidden, torch.Tensor) and torch.is_autocast_enabled(hidden.device.type):
        dt, kind = torch.get_autocast_dtype(hidden.device.type), hidden.device.type
        cast = lambda t: t.to(dt) if isinstance(t, torch.Tensor) else t  # noqa: E731
        with torch.autocast(kind, enabled=False):
            return _fused_linear(op, cast(hidden), cast(weight), labels, cast(bias), ignore_index, chunk_size,
                                 memory_budget_mb, accumulate_fp32, check_labels, logit_scale, logit_softcap, backend)
    _checks.tensor("hidden", hidden, dim=3, dtypes=_checks.FLOATS)
    B, T, H = hidden.shape
    _checks.tensor("weight", weight, dim=2, shape=(None, H), dtypes=(hidden.dtype,), device=hidden.device)
    V = weight.shape[0]
    if bias is not None:
        _checks.tensor("bias", bias, shape=(V,), dtypes=(hidden.dtype,), device=hidden.device)
    _checks.tensor("labels", labels, shape=(B, T), device=hidden.device, dtypes=(torch.int64, torch.int32))
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    scale, softcap = _logit_transform_args(logit_scale, logit_softcap)
    if _check_values(check_labels):
        _checks.labels("labels", labels, V, ignore_index)
    labels = labels.long()
    name = _dispatch.select(op, hidden.device, hidden.dtype, backend)
    if name == "reference":
        return fused_linear_token_logps_reference(hidden, weight, labels, bias, ignore_index, scale, softcap)
    chunk = chunk_size or chunk_rows(V, hidden.dtype, memory_budget_mb)
    flat = labels.reshape(-1)
    if torch.compiler.is_compiling():  # how many positions count is data: a traced graph takes them all
        return FusedLinearTokenLogpsFunction.apply(hidden.reshape(B * T, H), weight, bias, flat.contiguous(),
                                                   ignore_index, name, chunk, accumulate_fp32, scale,
                                                   softcap).view(B, T)
    rows = (flat != ignore_index).nonzero().squeeze(1)
    h_sel = hidden.reshape(B * T, H).index_select(0, rows)
    tok_sel = FusedLinearTokenLogpsFunction.apply(h_sel, weight, bias, flat.index_select(0, rows).contiguous(),
                                                  ignore_index, name, chunk, accumulate_fp32, scale, softcap)
    return tok_sel.new_zeros(B * T).index_copy(0, rows, tok_sel).view(B, T)


def _logit_transform_args(scale, softcap) -> tuple[float, float | None]:
    ok = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)  # noqa: E731
    if not (ok(scale) and scale != 0):
        raise ValueError(f"logit_scale: expected a finite non-zero float, got {scale!r}")
    if softcap is not None and not (ok(softcap) and softcap > 0):
        raise ValueError(f"logit_softcap: expected a finite float > 0 or None, got {softcap!r}")
    return float(scale), None if softcap is None else float(softcap)


# ----------------------------------------------------------------------------------------------------
# Preference losses and the DAMO step (docs/math.md sections 2, 3, 5)
# ----------------------------------------------------------------------------------------------------


_LOGP_NAMES = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def _check_pair_inputs(logps, beta, running_mean, alpha_d, weights):
    """Shapes, dtypes and devices of the per-pair inputs. Returns (N, device). Runs on every step: one
    cheap test per tensor; :func:`_checks.tensor` builds the message of the first that fails."""
    first, floats = logps[0], _checks.FLOATS
    if not (isinstance(first, torch.Tensor) and first.dim() == 1 and first.dtype in floats):
        _checks.tensor(_LOGP_NAMES[0], first, dim=1, dtypes=floats)
    shape, dev = first.shape, first.device
    N = shape[0]
    if N == 0:
        raise ValueError(f"{_LOGP_NAMES[0]}: expected at least one pair, got shape (0,)")
    for name, t in ((_LOGP_NAMES[1], logps[1]), (_LOGP_NAMES[2], logps[2]), (_LOGP_NAMES[3], logps[3]),
                    ("alpha_d", alpha_d), ("weights", weights)):
        if t is not None and not (isinstance(t, torch.Tensor) and t.shape == shape and t.dtype in floats
                                  and t.device == dev):
            _checks.tensor(name, t, shape=(N,), dtypes=floats, device=dev)
    if isinstance(beta, torch.Tensor):
        if beta.dim() > 1 or (beta.dim() == 1 and beta.shape[0] != N):
            raise ValueError(f"beta: expected a float, a 0-dim tensor or shape ({N},), got {tuple(beta.shape)}")
        _checks.tensor("beta", beta, dtypes=floats, device=dev)
    elif not isinstance(beta, (int, float)) or isinstance(beta, bool):
        raise TypeError(f"beta: expected a float or a tensor, got {type(beta).__name__}")
    elif not beta > 0:
        raise ValueError(f"beta: expected beta > 0, got {beta}")
    if running_mean is not None and not (isinstance(running_mean, torch.Tensor) and running_mean.dim() == 0
                                         and running_mean.dtype == torch.float32 and running_mean.device == dev):
        _checks.tensor("running_mean", running_mean, shape=(), dtypes=(torch.float32,), device=dev)
    return N, dev


def _one_dtype(logps: tuple) -> tuple:
    """The four log-probs in their common dtype (torch's type promotion, as the eager reference computes
    with them; a differentiable cast, only when they differ): every kernel takes one input dtype."""
    dt = logps[0].dtype
    if logps[1].dtype is dt and logps[2].dtype is dt and logps[3].dtype is dt:
        return logps
    for t in logps[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return tuple(t.to(dt) for t in logps)


def _check_pair_values(logps, beta, running_mean, alpha_d, weights):
    """Finite inputs and beta > 0: one fused test and one host synchronization (the C++ kernel makes
    the same test itself, for free; the slow search for the culprit runs only on failure)."""
    named = [(n, t) for n, t in zip(_LOGP_NAMES, logps)]
    named += [(n, t) for n, t in (("running_mean", running_mean), ("alpha_d", alpha_d), ("weights", weights))
              if t is not None]
    flat = [t.detach().reshape(-1) for _, t in named]
    if len({t.dtype for t in flat}) > 1:
        flat = [t.to(torch.float64) for t in flat]
    ok = torch.isfinite(torch.cat(flat)).all()
    if isinstance(beta, torch.Tensor):
        ok = ok & (beta > 0).all()
    if not bool(ok):
        for name, t in named:
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: expected finite values, got NaN or inf (pass check_inputs=False to "
                                 "let them propagate: NaN loss, empty mask, g unchanged)")
        raise ValueError("beta: expected every beta > 0")




def preference_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta=0.1, *,
                    loss_type: str = "sigmoid", label_smoothing: float = 0.0, weights: torch.Tensor | None = None,
                    reduction: str = "mean", check_inputs: bool = True,
                    backend: str | None = None) -> PreferenceLossOutput:
    """DPO / IPO / hinge loss with a scalar or per-pair beta, docs/math.md section 2, in one fused launch.

    Args: the four (N,) sequence log-probs (of different float dtypes: computed in their promoted dtype,
    as torch promotes them); ``beta`` a float, 0-dim or (N,) tensor (> 0, a constant for gradients);
    ``weights`` (N,) per-pair weights. reduction="mean": sum(w l) / sum(w) (plain mean without
    weights); "none": w l per pair.
    Returns: :class:`PreferenceLossOutput` (loss, losses, chosen_rewards, rejected_rewards, margins,
    accuracies); gradients flow to the four log-probs."""
    _checks.choice("loss_type", loss_type, ("sigmoid", "ipo", "hinge"))
    check_loss(loss_type, label_smoothing)
    _checks.choice("reduction", reduction, ("mean", "none"))
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    N, dev = _check_pair_inputs(logps, beta, None, None, weights)
    logps = _one_dtype(logps)
    name = _dispatch.select("preference_loss", dev, logps[0].dtype, backend, n=N)
    if _check_values(check_inputs) and name != "cpp":  # the C++ kernel checks the values itself
        _check_pair_values(logps, beta, None, None, weights)
    if name == "reference":
        return preference_loss_reference(*logps, beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                         weights=weights, reduction=reduction)
    # the DAMO step with every pair kept, alpha = 1 and no beta clamp is exactly §2; the running mean it updates
    # is a scratch value
    scratch = torch.zeros((), dtype=torch.float32, device=dev)
    loss, losses, _, _, r_w, r_l, margins, acc, _ = fused_step(
        name, StepInputs(*logps, beta, None, weights, scratch, scratch, 0, 0, False, check_inputs and name == "cpp"),
        plain_loss_kernel_args(N, loss_type, label_smoothing))
    if reduction == "none":
        loss = losses if weights is None else losses * weights
    return PreferenceLossOutput(loss, losses, r_w, r_l, margins, acc)


def damo_step(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta=0.1, *,
              running_mean: torch.Tensor, config: DAMOConfig | None = None, alpha_d: torch.Tensor | None = None,
              weights: torch.Tensor | None = None, seed: int = 0, step: int | torch.Tensor = 0,
              increment_step: bool = False, inplace: bool = False, group=None, check_inputs: bool = True,
              backend: str | None = None) -> DAMOStepOutput:
    """The model-aware DAMO step of docs/math.md section 3 (and section 5's presets) in one launch.

    Args:
        policy_*/ref_* logps: (N,) sequence log-probs (policy ones differentiable); of different float
            dtypes, they are computed in their promoted dtype (torch.promote_types), on every backend.
        beta: base beta (float, 0-dim or (N,) tensor), as in :func:`preference_loss`.
        running_mean: 0-dim float32 tensor g (init 0). Updated in place with ``inplace=True``; the
            updated value is returned either way.
        config: a :class:`DAMOConfig`; None is ``DAMOConfig()`` (the damo preset: variant="official",
            selection="sample", filter="both", keep=0.8, gamma=0.9, combine="product", loss_type="sigmoid").
            The presets of docs/math.md §5: ``DAMOConfig.from_preset("dpo" | "d2po" | "mdpo" | "damo", **fields)``.
        alpha_d: (N,) data-aware factors or None (1); weights: (N,) per-pair weights of the mean over S.
        seed, step: the random draw of selection="sample" is a function of (seed, step, i) only;
            ``step`` may be a 0-dim int64 tensor read on the device (CUDA graphs) and incremented by the
            kernel with ``increment_step=True``.
        group: a torch.distributed process group, or None. With a group of several ranks, the batch is the
            concatenation of every rank's pairs (every rank must pass the same N): margins, log-ratios and
            alpha_d are all-gathered, every rank computes the same mask, alpha_M and g, and each returns the loss
            of its own slice (the sum over ranks is the loss of the global batch) and its own slice of the
            per-pair outputs. None: this process's pairs alone, no communication, whether or not
            torch.distributed is initialized (torch.distributed.group.WORLD names the default group).
        check_inputs: raise on non-finite inputs or beta <= 0 (on CUDA one host synchronization; the C++ CPU
            kernel tests them in the same pass, at no cost).
        backend: None (automatic: "cpp" on CPU; on CUDA "cuda" up to 256 pairs, "triton" beyond), "triton"
            (one program up to mmalign.ops.limits.DAMO_ONE_PROGRAM_MAX_N pairs, a multi-program path beyond),
            "cuda" (the CUDA C++ kernel with C++ autograd, up to that many pairs, then Triton), "cpp", or
            "reference" (docs/math.md literally, host syncs).
    Returns: :class:`DAMOStepOutput` (loss, losses, chosen_rewards, rejected_rewards, margins, accuracies, keep,
    alpha_m, beta, running_mean); gradients flow to the four log-probs through loss and losses."""
    cfg = _DEFAULT_CONFIG if config is None else config
    if not isinstance(cfg, DAMOConfig):
        raise TypeError(f"config: expected a DAMOConfig (DAMOConfig.from_preset(name, ...) for a preset), "
                        f"got {type(cfg).__name__}")
    cfg.validate()
    logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    N, dev = _check_pair_inputs(logps, beta, running_mean, alpha_d, weights)
    logps = _one_dtype(logps)
    if isinstance(step, torch.Tensor) and not (step.dim() == 0 and step.dtype == torch.int64 and step.device == dev):
        _checks.tensor("step", step, shape=(), dtypes=(torch.int64,), device=dev)
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed: expected an int in [0, 2**63), got {seed!r}")
    if group is not None and _world(group) > 1:
        if _check_values(check_inputs):
            _check_pair_values(logps, beta, running_mean, alpha_d, weights)
        return _damo_step_distributed(logps, running_mean, beta, alpha_d, weights, cfg, seed, step, increment_step,
                                      inplace, group, backend)
    kernel_args(cfg, N)  # raises when K > N (cached per config and N)
    name = _dispatch.select("damo_step", dev, logps[0].dtype, backend, n=N)
    if _check_values(check_inputs) and name != "cpp":  # the C++ kernel checks the values itself
        _check_pair_values(logps, beta, running_mean, alpha_d, weights)
    return _damo_step_local(logps, running_mean, beta, alpha_d, weights, cfg, seed, step, increment_step, inplace,
                            name, check_inputs)


def _damo_step_local(logps, running_mean, beta, alpha_d, weights, cfg, seed, step, increment_step, inplace, name,
                     check=False) -> DAMOStepOutput:
    """The step on one process; ``check``: let the C++ kernel check the values (cpp backend only)."""
    if name == "reference":
        out = damo_step_reference(*logps, beta, running_mean, cfg, alpha_d=alpha_d, weights=weights, seed=seed,
                                  step=int(step))
        if increment_step and isinstance(step, torch.Tensor):
            step.add_(1)
        if inplace:
            running_mean.copy_(out.running_mean)
            return out._replace(running_mean=running_mean)
        return out
    g_out = running_mean if inplace else torch.empty_like(running_mean)
    loss, losses, keep, beta_i, r_w, r_l, margins, acc, alpha_m = fused_step(
        name, StepInputs(*logps, beta, alpha_d if cfg.use_alpha_d else None, weights, running_mean, g_out, step, seed,
                         increment_step, check and name == "cpp"), kernel_args(cfg, logps[0].shape[0]))
    return DAMOStepOutput(loss, losses, r_w, r_l, margins, acc, keep, alpha_m, beta_i, g_out)


def _world(group) -> int:
    if not (_DIST_AVAILABLE and torch.distributed.is_initialized()):
        raise ValueError("group: torch.distributed is not initialized")
    return torch.distributed.get_world_size(group)


def _damo_step_distributed(logps, running_mean, beta, alpha_d, weights, cfg, seed, step, increment_step, inplace,
                           group, backend) -> DAMOStepOutput:
    """Gather the per-pair statistics of every rank of ``group``, run the step on the global batch (identically on
    every rank), and return this rank's share of the loss. This rank's slice of the gathered log-ratios stays in
    the autograd graph, so the kernel's own backward gives its exact gradient."""
    dist = torch.distributed
    pc, pr, rc, rr = logps
    logr_w, logr_l = pc - rc, pr - rr
    world, rank, N = dist.get_world_size(group), dist.get_rank(group), pc.shape[0]

    def gather(t):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.detach().contiguous(), group=group)
        parts[rank] = t  # this rank's slice, still differentiable
        return torch.cat(parts)

    gw, gl = gather(logr_w), gather(logr_l)
    g_beta = gather(beta.expand(N)) if isinstance(beta, torch.Tensor) and beta.dim() == 1 else beta
    g_ad = gather(alpha_d) if alpha_d is not None else None
    g_wt = gather(weights) if weights is not None else None
    zeros = torch.zeros_like(gw)
    name = _dispatch.select("damo_step", gw.device, gw.dtype, backend, n=gw.shape[0])
    out = _damo_step_local((gw, gl, zeros, zeros), running_mean, g_beta, g_ad, g_wt, cfg, seed, step,
                           increment_step, inplace, name)
    sl = slice(rank * N, (rank + 1) * N)
    wt = out.keep.to(out.losses.dtype) * (g_wt if g_wt is not None else 1.0)
    loss = (wt[sl] / wt.sum() * out.losses[sl]).sum()  # the ranks' shares sum to the global mean over S
    return DAMOStepOutput(loss, out.losses[sl], out.chosen_rewards[sl], out.rejected_rewards[sl], out.margins[sl],
                          out.accuracies[sl], out.keep[sl], out.alpha_m, out.beta[sl], out.running_mean)
