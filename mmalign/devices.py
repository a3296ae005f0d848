"""Which device a command runs on: the ``device`` option every job and the trainer take, checked up front, and the
default (this process's GPU under torchrun, else the CPU)."""
from __future__ import annotations

import os


def check_device(device: str | None) -> None:
    """A ``device`` argument that torch can use here, or ValueError naming it (None: choose automatically)."""
    import torch

    if device is None:
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} asked for, but torch sees no CUDA device")


def default_device(device: str | None = None) -> str:
    """``device`` if given, else this process's GPU (``cuda:LOCAL_RANK``, as torchrun sets it) or the CPU;
    ``"cuda"`` alone also means this process's GPU (under torchrun, every rank its own)."""
    import torch

    local_gpu = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if device:
        return local_gpu if device == "cuda" else device
    return local_gpu if torch.cuda.is_available() else "cpu"
