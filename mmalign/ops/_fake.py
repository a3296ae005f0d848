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


@torch.library.register_fake("mmalign::damo_step_fwd")
def _damo_step_fwd_fake(pc, pr, rc, rr, beta, beta_scalar, alpha_d, weights, g, g_out, step, step_scalar, seed, K,
                        gamma, rho, eps, min_beta, paper, select, loss_kind, use_m, combine_sum, incr_step):
    dt, N = _acc(pc.dtype), pc.shape[0]
    vec = lambda: pc.new_empty((N,), dtype=dt)  # noqa: E731
    return (pc.new_empty((), dtype=dt), vec(), pc.new_empty((N,), dtype=torch.bool), vec(), vec(), vec(), vec(),
            vec(), pc.new_empty((), dtype=dt))
