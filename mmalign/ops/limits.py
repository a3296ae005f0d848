"""Sizes and codes that the Python launchers, the dispatch table and the compiled kernels share, each defined
here once. The C++ and CUDA sources cannot import Python: their copies are named beside each constant, and
tests/ops/test_limits.py reads those headers and fails when a value here and there differ.

Importing this module imports nothing else (the op modules, ``mmalign._dispatch`` and the tests all read it)."""
from __future__ import annotations

# ---------------------------------------------------------------------------------------------------- DAMO step
# One program (Triton) or one thread block (CUDA C++) holds and sorts the whole batch up to this many pairs: a
# DAMO batch is 16 to a few thousand pairs. Past it the Triton kernels take their multi-program path, and the
# CUDA C++ kernel cannot run (the dispatch table sends "cuda" to Triton there: mmalign._dispatch.select).
# csrc/cuda/damo_step_kernel.cuh: kMaxN = kThreads * kItems.
DAMO_ONE_PROGRAM_MAX_N = 8192
# Pairs per program of the Triton multi-program path.
DAMO_MP_BLOCK = 1024

# The kept-set rules, as the kernels take them (the ``select`` argument of the damo_step operators).
# csrc/damo_step_math.h: enum DamoSelect {kSelectAll, kSelectClosest, kSelectClosestSample, kSelectBottom,
# kSelectTop}.
SELECT_ALL, SELECT_CLOSEST, SELECT_CLOSEST_SAMPLE, SELECT_BOTTOM, SELECT_TOP = range(5)

# The per-pair losses of docs/math.md section 2; a kernel's ``loss_kind`` is the index in this tuple
# (csrc/cpu/damo_step.cpp and csrc/cuda/damo_step_kernel.cuh: 0 sigmoid, 1 ipo, else hinge).
LOSS_TYPES = ("sigmoid", "ipo", "hinge")

# variant="official": beta_i is clamped below at this value (the released code's torch.clamp(min=1e-3)).
OFFICIAL_MIN_BETA = 1e-3
