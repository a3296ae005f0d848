"""Patch a Hugging Face model so that ``model(..., labels=labels, fused_lm_head=True)`` returns label
log-probabilities through :func:`mmalign.functional.fused_linear_sequence_logps`: the backbone runs,
the LM head projects only the positions whose next-token label is not -100, chunk by chunk, and the
(batch, seq, vocab) logits never exist. Without ``fused_lm_head`` the forward is the original one
(generation is unchanged). The output carries

    log_probs  (B, T-1)  per-token log p(labels[:, t+1] | ...), 0 where the label is ignored
    logps      (B,)      their sum per sequence (docs/math.md §1)

the same protocol as TRL's own fused head, so TRL trainers consume it as is.

    undo = patch_sequence_logps(model)    # any model mmalign.models takes apart (every family of FAMILIES)
    ...
    undo()                                # the original forward is back

Only the model instance is patched (an instance attribute), never a class or ``torch.nn.functional``.
The fused path calls the backbone itself: a wrapper already installed on the instance's forward (such as
accelerate's autocast wrapper under mixed precision) does not apply to it, so patch before wrapping, or
call the model under the same ``torch.autocast`` (as ``DAMODPOTrainer`` does).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from .. import functional as F
from ..models import adapter_for


@dataclass
class FusedLogpsOutput:
    log_probs: torch.Tensor
    logps: torch.Tensor
    logits: None = None
    loss: torch.Tensor | None = None  # mean negative log-likelihood of the labelled tokens (TRL reads it)


def patch_sequence_logps(model, *, ignore_index: int = -100) -> Callable[[], None]:
    """Patch ``model`` (see the module docstring); returns the function that undoes it. Any model whose decoder
    and LM head :mod:`mmalign.models` finds: the fused path runs the model's own forward up to its decoder (its
    positions, masks, image features as it computes them), then its LM head and logit transform in the fused op.
    A family whose logit transform is unknown raises ValueError."""
    adapter = adapter_for(model)
    head, transform = adapter.head, adapter.transform.kwargs()
    had_own = "forward" in vars(model)
    original = model.forward

    @functools.wraps(type(model).forward)
    def forward(*args, fused_lm_head: bool = False, labels=None, **kwargs):
        if not fused_lm_head:
            return original(*args, labels=labels, **kwargs) if labels is not None else original(*args, **kwargs)
        if labels is None:
            raise ValueError("labels: fused_lm_head=True needs the labels whose log-probs to compute")
        for name in ("use_cache", "num_items_in_batch", "logits_to_keep"):
            kwargs.pop(name, None)
        hidden = adapter.final_hidden(original, *args, use_cache=False, **kwargs)
        tok = F.fused_linear_token_logps(hidden[:, :-1], head.weight, labels[:, 1:], bias=head.bias,
                                         ignore_index=ignore_index, **transform)
        count = (labels[:, 1:] != ignore_index).sum().clamp_min(1)
        return FusedLogpsOutput(log_probs=tok, logps=tok.sum(-1), loss=-tok.sum() / count)

    model.forward = forward

    def undo():
        if had_own:
            model.forward = original
        else:
            del model.forward

    return undo
