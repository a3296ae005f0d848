"""How the op modules call the operators they registered (``torch.ops.mmalign.*``)."""
from __future__ import annotations

import functools

import torch


def operator(name: str):
    """torch.ops.mmalign.<name>: its raw callable in eager mode (without the OpOverloadPacket/OpOverload Python
    calls, a few microseconds each on every step), the OpOverload itself under torch.compile (which Dynamo
    traces)."""
    if torch.compiler.is_compiling():
        return getattr(torch.ops.mmalign, name).default
    return _raw(name)


@functools.lru_cache(maxsize=None)
def _raw(name: str):
    overload = getattr(torch.ops.mmalign, name).default
    return getattr(overload, "_op", overload)


def bump_versions(*tensors) -> None:
    """Advance autograd's version counter of tensors a C++ operator wrote in place (a None is skipped). The C++
    operators declare their mutations in their schemas, but their Autograd kernel runs the forward below
    ADInplaceOrView, where a version bump would happen; the Python operators (torch.library.custom_op) bump
    their own. Eager only: under torch.compile, functionalization follows the schema."""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        if t is not None and not t.is_inference():
            torch.autograd.graph.increment_version(t)
