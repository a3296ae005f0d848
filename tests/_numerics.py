"""Helpers shared by the numerical tests (flash-attn's rule for low precision, backend lists)."""
from __future__ import annotations

import torch

from mmalign import _dispatch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends(op: str, device: str, dtype: torch.dtype, include_reference: bool = False) -> list[str]:
    """The backends that can run ``op`` here; tests parametrize over them."""
    out = [b for b in _dispatch.BACKENDS if not _dispatch.not_supported_reasons(op, b, device, dtype)]
    return out if include_reference else [b for b in out if b != "reference"]


def cases(op: str, dtypes=(torch.float64,)) -> list:
    """(device, backend, dtype) triples runnable here, reference excluded, as pytest params."""
    import pytest

    return [pytest.param(d, b, dt, id=f"{d}-{b}-{str(dt).replace('torch.', '')}")
            for d in DEVICES for dt in dtypes for b in backends(op, d, dt)]


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def assert_low_precision(out: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor, floor: float, name: str):
    """flash-attn's rule: error of the kernel <= 2 x error of eager in the same precision + floor,
    both measured against the float64 reference. NaN never passes."""
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    e_out, e_eager = max_err(out, ref64), max_err(eager, ref64)
    assert e_out <= 2 * e_eager + floor, f"{name}: error {e_out:.3e} > 2 x eager {e_eager:.3e} + {floor:.1e}"
