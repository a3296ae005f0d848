"""Fake (meta) kernels for the C++ operators, so that torch.compile and FakeTensor tracing see their
output shapes without running them. Imported by mmalign._ext once mmalign._C is loaded."""
from __future__ import annotations

import torch

from .damo_step_triton import step_outputs_like
from .sequence_logps import token_logps_bwd_fake, token_logps_bwd_inplace_fake, token_logps_fwd_fake


torch.library.register_fake("mmalign::token_logps_fwd")(token_logps_fwd_fake)
torch.library.register_fake("mmalign::token_logps_bwd")(token_logps_bwd_fake)
torch.library.register_fake("mmalign::token_logps_bwd_")(token_logps_bwd_inplace_fake)


@torch.library.register_fake("mmalign::damo_step_fwd")
def _damo_step_fwd_fake(pc, *args):
    return step_outputs_like(pc, with_grads=True, with_scale=False)


@torch.library.register_fake("mmalign::damo_step")
def _damo_step_fake(pc, *args):
    return step_outputs_like(pc, with_grads=False, with_scale=False)
