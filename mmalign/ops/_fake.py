"""Fake (meta) kernels for the C++ operators, so that torch.compile and FakeTensor tracing see their
output shapes without running them. Imported by mmalign._ext once mmalign._C is loaded."""
from __future__ import annotations

import torch


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("mmalign::token_logps_fwd")
def _token_logps_fwd_fake(logits, labels, ignore_index):
    out = labels.new_empty(labels.shape, dtype=_acc(logits.dtype))
    return out, labels.new_empty(labels.shape, dtype=_acc(logits.dtype))


@torch.library.register_fake("mmalign::token_logps_bwd")
def _token_logps_bwd_fake(grad, logits, labels, lse, ignore_index):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("mmalign::token_logps_bwd_")
def _token_logps_bwd_inplace_fake(logits, grad, labels, lse, ignore_index):
    return None


def _damo_step_outputs(pc, with_grads: bool):
    dt, N = _acc(pc.dtype), pc.shape[0]
    vec = lambda: pc.new_empty((N,), dtype=dt)  # noqa: E731
    outs = [pc.new_empty((), dtype=dt), vec(), pc.new_empty((N,), dtype=torch.bool), vec(), vec(), vec(), vec(),
            pc.new_empty((N,), dtype=torch.bool)]
    return tuple(outs + ([vec(), vec()] if with_grads else []) + [pc.new_empty((), dtype=dt)])


@torch.library.register_fake("mmalign::damo_step_fwd")
def _damo_step_fwd_fake(pc, *args):
    return _damo_step_outputs(pc, with_grads=True)


@torch.library.register_fake("mmalign::damo_step")
def _damo_step_fake(pc, *args):
    return _damo_step_outputs(pc, with_grads=False)
