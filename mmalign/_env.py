"""What ``mmalign env`` reports: versions, devices, and per op which backends run here and why not."""
from __future__ import annotations

import importlib.metadata as md
import platform
import sys

import torch

from . import _dispatch, _ext, _triton

_PACKAGES = ("torch", "triton", "numpy", "transformers", "deepspeed", "open_clip_torch",
             "sentence-transformers", "datasets", "trl", "liger-kernel", "flash-attn", "pytest-benchmark")


def _version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"


def probes() -> list[tuple[str, torch.dtype]]:
    """(device, dtype) pairs worth reporting on this machine: CPU fp32, and CUDA bf16 when a GPU exists."""
    out = [("cpu", torch.float32)]
    if torch.cuda.is_available():
        out.append(("cuda", torch.bfloat16))
    return out


def collect() -> dict:
    loaded, why = _ext.load()
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    return {
        "mmalign": __import__("mmalign").__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in _PACKAGES},
        "torch_cuda": torch.version.cuda or "none (CPU build)",
        "devices": devices,
        "extension": "loaded" if loaded else why,
        "extension_cuda_kernels": _ext.has_kernel("mmalign::token_logps_fwd", "CUDA"),
        "triton_interpret": _triton.interpreting(),
        "backends": {f"{dev} {str(dt).replace('torch.', '')}": _dispatch.report(dev, dt) for dev, dt in probes()},
        "selected": {f"{dev} {str(dt).replace('torch.', '')}": {op: _safe_select(op, dev, dt) for op in _dispatch.TABLE}
                     for dev, dt in probes()},
    }


def _safe_select(op, dev, dt) -> str:
    try:
        name = _dispatch.select(op, dev, dt)
        limit = _dispatch.TABLE[op].cuda_auto_max_n
        if name == "cuda" and limit is not None:
            return f"cuda up to {limit} rows, {_dispatch.select(op, dev, dt, n=limit + 1)} beyond"
        return name
    except Exception as e:  # a forced MMALIGN_BACKEND that cannot run
        return f"error: {e}"


def format_report(info: dict) -> str:
    lines = [f"mmalign {info['mmalign']}  python {info['python']}  {info['platform']}"]
    lines += [f"  {k:<22} {v}" for k, v in info["packages"].items()]
    lines += [f"torch CUDA: {info['torch_cuda']}", "devices: " + ", ".join(info["devices"]),
              f"extension mmalign._C: {info['extension']} (CUDA kernels: {info['extension_cuda_kernels']})",
              f"TRITON_INTERPRET: {info['triton_interpret']}"]
    for probe, ops in info["backends"].items():
        lines.append(f"\nbackends on {probe}:")
        for op, backends in ops.items():
            lines.append(f"  {op}  -> uses {info['selected'][probe][op]}")
            for b, reasons in backends.items():
                lines.append(f"    {b:<10} " + ("available" if not reasons else "no: " + "; ".join(reasons)))
    return "\n".join(lines)
