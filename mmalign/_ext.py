"""Loading of the compiled extension ``mmalign._C`` (built by setup.py; optional)."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def load() -> tuple[bool, str]:
    """Import ``mmalign._C`` once. Returns (loaded, why not)."""
    try:
        from . import _C  # noqa: F401  (importing registers the operators)
    except ImportError as e:  # not built (MMALIGN_BUILD_EXT=0) or built against another torch
        return False, f"mmalign._C is not importable ({e}); reinstall with `pip install --no-build-isolation .`"
    from .ops import _fake  # noqa: F401  (fake kernels for torch.compile)
    return True, ""


def has_kernel(qualname: str, dispatch_key: str) -> bool:
    """Whether operator ``qualname`` (e.g. ``mmalign::token_logps_fwd``) has a ``dispatch_key`` kernel."""
    if not load()[0]:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualname, dispatch_key)
