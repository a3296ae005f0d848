"""The dispatch table: which backend runs which op on which device and dtype, and why not.

Backends:
  ``triton``    Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests).
  ``cuda``      hand-written CUDA C++ kernels in ``mmalign._C`` (built when nvcc + CUDA torch exist).
  ``cpp``       C++ CPU kernels in ``mmalign._C``.
  ``reference`` eager PyTorch transcribing docs/math.md; runs everywhere, slowest, most memory.

Automatic selection takes the first backend of ``PRIORITY[device type]`` that has no reason against it.
``backend=`` (per call) or the ``MMALIGN_BACKEND`` environment variable (``triton`` for every op, or
``sequence_logps=cuda,fused_linear_sequence_logps=triton``) forces one; a forced backend that cannot run
raises :class:`BackendUnavailable` with its reasons. Every public function of :mod:`mmalign.functional`
dispatches under its own name. The choice is made here, before any operator runs: the operators themselves
(``torch.ops.mmalign.*``) are one per backend and never choose. Nothing here touches a GPU at import time.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from . import _ext, _triton
from .ops.limits import DAMO_ONE_PROGRAM_MAX_N

BACKENDS = ("triton", "cuda", "cpp", "reference")

# On CUDA, the CUDA C++ kernels where an op has them, else Triton. Measured on an H100, bf16, B*T=16384
# (benchmarks/results/NVIDIA-H100-80GB-HBM3-2026-11-22): sequence_logps fwd+bwd V=32000 cuda 1.24 ms vs
# triton 1.28 ms, V=152064 4.90 vs 5.01 ms; fwd 0.43 vs 0.46 and 1.49 vs 1.56 ms. On CPU, the C++
# kernels; the Triton interpreter only when forced or when the extension is missing (it is a test
# vehicle: ~2 ms per program instance).
PRIORITY = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpp", "triton", "reference"),
}

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class OpSupport:
    """What one op offers: a Triton implementation, and the C++ operators backing ``cpp`` and ``cuda``
    (qualified names, None where there is no such kernel). ``cuda_auto_max_n``: automatic selection takes
    the CUDA C++ kernel only for batches of at most that many rows (None: any size); past it the next
    backend of PRIORITY runs. Asked for (``backend="cuda"``, ``MMALIGN_BACKEND``) it runs up to
    ``cuda_max_n``, the most rows the CUDA C++ kernel can hold (None: no limit); past that, "cuda" (asked for
    or not) runs the op's Triton kernels, whose multi-program path takes any size."""

    triton: bool
    cpp: str | None
    cuda: str | None
    dtypes: tuple = FLOATS
    triton_dtypes: tuple = FLOATS
    cuda_auto_max_n: int | None = None
    cuda_max_n: int | None = None


# The table. The four log-prob functions run the same per-token kernels (the fused-linear ones chunk by chunk);
# preference_loss runs through the DAMO step kernel (no filter, alpha = 1). The CUDA C++ DAMO step kernel
# (csrc/cuda/damo_step.cu, one thread block, at most DAMO_ONE_PROGRAM_MAX_N pairs) passed every GPU test on an
# H100 and is faster than Triton for small batches, slower for large ones (it ranks by counting, O(N^2 /
# threads)): benchmarks/results/NVIDIA-H100-80GB-HBM3-2026-11-23-7d5fd4e, damo_step fwd 0.070 vs 0.260 ms at
# N=16, 0.158 vs 0.310 at 256, 1.505 vs 0.352 at 4096. Without a selection (preference_loss) it was faster at
# every size measured (16, 256, 4096), so it runs up to its limit.
_LOGPS = OpSupport(triton=True, cpp="mmalign::token_logps_fwd", cuda="mmalign::token_logps_fwd")
TABLE: dict[str, OpSupport] = {
    "token_logps": _LOGPS,
    "sequence_logps": _LOGPS,
    "fused_linear_token_logps": _LOGPS,
    "fused_linear_sequence_logps": _LOGPS,
    "preference_loss": OpSupport(triton=True, cpp="mmalign::damo_step_fwd", cuda="mmalign::damo_step_fwd",
                                 cuda_max_n=DAMO_ONE_PROGRAM_MAX_N),
    "damo_step": OpSupport(triton=True, cpp="mmalign::damo_step_fwd", cuda="mmalign::damo_step_fwd",
                           cuda_auto_max_n=256, cuda_max_n=DAMO_ONE_PROGRAM_MAX_N),
    # tl.dot has no float64: float64 (the tests' exactness checks) runs the SDPA reference.
    "masked_attention": OpSupport(triton=True, cpp=None, cuda=None,
                                  triton_dtypes=(torch.float32, torch.float16, torch.bfloat16)),
}


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run these inputs."""


def _device_type(device) -> str:
    return device.type if isinstance(device, torch.device) else torch.device(device).type


def not_supported_reasons(op: str, backend: str, device, dtype: torch.dtype) -> list[str]:
    """Why ``backend`` cannot run ``op`` on (device, dtype); an empty list means it can."""
    if op not in TABLE:
        raise KeyError(f"unknown op {op!r}; known: {sorted(TABLE)}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    sup, dev = TABLE[op], _device_type(device)
    reasons: list[str] = []
    if dtype not in sup.dtypes:
        reasons.append(f"dtype {dtype} is not supported (expected one of {[str(d) for d in sup.dtypes]})")
    if backend == "reference":
        return reasons
    if backend == "triton":
        if not sup.triton:
            reasons.append(f"{op} has no Triton implementation")
        elif dtype not in sup.triton_dtypes:
            reasons.append(f"dtype {dtype}: the Triton kernel takes {[str(d) for d in sup.triton_dtypes]}")
        if not _triton.HAS_TRITON:
            reasons.append(_triton.IMPORT_ERROR)
        if _triton.interpreting():
            if dev != "cpu":
                reasons.append("TRITON_INTERPRET=1 is set: Triton runs on CPU tensors only")
            if dtype == torch.bfloat16:
                reasons.append("bfloat16 arithmetic is wrong under the Triton interpreter (TRITON_INTERPRET=1)")
        elif dev != "cuda":
            reasons.append(f"device {dev}: Triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)")
        return reasons
    # compiled backends
    want = "cuda" if backend == "cuda" else "cpu"
    if dev != want:
        reasons.append(f"device {dev}: the {backend} backend runs on {want} tensors")
    qualname = sup.cuda if backend == "cuda" else sup.cpp
    loaded, why = _ext.load()
    if qualname is None:
        reasons.append(f"{op} has no {'CUDA C++' if backend == 'cuda' else 'C++ CPU'} kernel"
                       + (" (its CUDA path is Triton)" if backend == "cuda" and sup.triton else ""))
    elif not loaded:
        reasons.append(why)
    elif not _ext.has_kernel(qualname, "CUDA" if backend == "cuda" else "CPU"):
        reasons.append(f"mmalign._C was built without {backend.upper()} kernels"
                       + (" (torch without CUDA, nvcc not found, or MMALIGN_BUILD_CUDA=0)" if backend == "cuda" else ""))
    return reasons


def _forced(op: str) -> str | None:
    spec = os.environ.get("MMALIGN_BACKEND", "").strip()
    if not spec:
        return None
    if "=" not in spec:
        return spec
    for part in spec.split(","):
        name, _, value = part.partition("=")
        if name.strip() == op:
            return value.strip()
    return None


# select() runs on every op call; os.environ.get re-encodes the name and decodes the value each time
# (~1 us). The cache key only needs the raw values: one dict lookup each (os.environ.get as fallback).
_ENV_DATA, _ENV_ENCODE = getattr(os.environ, "_data", None), getattr(os.environ, "encodekey", None)
_ENV_KEYS = {n: _ENV_ENCODE(n) for n in ("MMALIGN_BACKEND", "TRITON_INTERPRET")} if _ENV_ENCODE else {}


def _raw_env(name: str):
    if _ENV_DATA is None or name not in _ENV_KEYS:
        return os.environ.get(name)
    return _ENV_DATA.get(_ENV_KEYS[name])


def select(op: str, device, dtype: torch.dtype, backend: str | None = None, n: int | None = None) -> str:
    """The backend that runs ``op`` on (device, dtype) for ``n`` rows (None: any): ``backend`` if given,
    else ``MMALIGN_BACKEND``, else the first of ``PRIORITY`` that can run (the CUDA kernel only up to the
    op's ``cuda_auto_max_n``); "cuda" for more rows than the op's ``cuda_max_n`` becomes "triton". A forced
    backend that cannot run raises. The answer is cached per (op, device, dtype, backend, past
    cuda_auto_max_n, past cuda_max_n, MMALIGN_BACKEND, TRITON_INTERPRET); the key holds the device itself
    (hashing a torch.device is ~8x cheaper than reading its ``.type``)."""
    sup = TABLE.get(op)
    past_auto = n is not None and sup is not None and sup.cuda_auto_max_n is not None and n > sup.cuda_auto_max_n
    past_max = n is not None and sup is not None and sup.cuda_max_n is not None and n > sup.cuda_max_n
    if torch.compiler.is_compiling():
        return _select_while_compiling(op, device, dtype, backend, past_auto or past_max, past_max)
    return _select(op, device, dtype, backend, past_auto or past_max, past_max, _raw_env("MMALIGN_BACKEND"),
                   _raw_env("TRITON_INTERPRET"))


# torch.compile calls this once per compilation and takes the answer as a constant (it reads the environment, the
# extension's registry and Triton: nothing a graph can hold): the compiled graph holds the chosen backend's
# operators, and the choice is never inside it.
@torch.compiler.assume_constant_result
def _select_while_compiling(op: str, device, dtype: torch.dtype, backend, too_big_for_cuda: bool,
                            past_cuda_kernel: bool) -> str:
    return _select(op, device, dtype, backend, too_big_for_cuda, past_cuda_kernel, _raw_env("MMALIGN_BACKEND"),
                   _raw_env("TRITON_INTERPRET"))


@functools.lru_cache(maxsize=1024)
def _select(op: str, device, dtype: torch.dtype, backend, too_big_for_cuda: bool, past_cuda_kernel: bool, _env,
            _interp) -> str:
    forced, source = (backend, "backend=") if backend is not None else (_forced(op), "MMALIGN_BACKEND")
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"{source}: expected one of {BACKENDS}, got {forced!r}")
        if forced == "cuda" and past_cuda_kernel:  # the same op's Triton kernels take any size
            forced, source = "triton", f"{source}cuda, past the CUDA kernel's {TABLE[op].cuda_max_n} rows"
        reasons = not_supported_reasons(op, forced, device, dtype)
        if reasons:
            raise BackendUnavailable(f"{op}: backend {forced!r} (from {source}) cannot run on "
                                     f"{torch.device(device)} {dtype}: " + "; ".join(reasons))
        return forced
    for name in PRIORITY.get(_device_type(device), ("reference",)):
        if name == "cuda" and too_big_for_cuda:
            continue
        if not not_supported_reasons(op, name, device, dtype):
            return name
    raise BackendUnavailable(f"{op}: no backend can run on {torch.device(device)} {dtype}: "
                             + "; ".join(not_supported_reasons(op, "reference", device, dtype)))


def report(device, dtype: torch.dtype) -> dict[str, dict[str, list[str]]]:
    """For every op: {backend: reasons it cannot run} on (device, dtype); empty lists can run."""
    return {op: {b: not_supported_reasons(op, b, device, dtype) for b in BACKENDS} for op in TABLE}
