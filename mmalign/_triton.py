"""Optional Triton import. Kernel modules import ``triton``/``tl``/``jit`` from here so that the package
imports (and the other backends work) where Triton is missing."""
from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    IMPORT_ERROR = ""
except Exception as e:  # ImportError, or a broken install
    HAS_TRITON = False
    IMPORT_ERROR = f"triton is not importable ({type(e).__name__}: {e})"

    class _Lang:  # enough for kernel signatures to be defined; the kernels are never launched
        constexpr = None
        float32 = float64 = None

    class _Triton:
        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = _Triton()  # type: ignore[assignment]
    tl = _Lang()  # type: ignore[assignment]


# Host-side helpers. triton.cdiv and triton.next_power_of_2 are ConstexprFunctions whose calls from Python
# go through Triton's constexpr machinery (several microseconds each: 40% of masked_attention's Python
# cost); launchers call these plain ones.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
