"""Argument checks whose errors name the argument and what was expected."""
from __future__ import annotations

import torch

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def tensor(name: str, t, *, dim: int | None = None, dtypes=None, device=None, shape=None) -> None:
    """Raise TypeError/ValueError naming ``name`` when ``t`` is not a tensor of the expected kind.
    ``shape`` may hold None for free dimensions."""
    # on the hot path of every op call: cheap tests first, messages built only on failure
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name}: expected {dim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None and not _shape_matches(t.shape, shape):
        want = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != (device if isinstance(device, torch.device) else torch.device(device)):
        raise ValueError(f"{name}: expected device {device}, got {t.device}")


def _shape_matches(have, want) -> bool:
    if len(have) != len(want):
        return False
    for w, s in zip(want, have):
        if w is not None and w != s:
            return False
    return True


def choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}")


def labels(name: str, labels_: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every label is in [0, vocab) or equals ignore_index (one host synchronization)."""
    bad = (labels_ != ignore_index) & ((labels_ < 0) | (labels_ >= vocab))
    if bool(bad.any()):
        pos = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"{name}: expected values in [0, {vocab}) or ignore_index={ignore_index}, "
                         f"got {labels_[pos].item()} at position {pos}")
