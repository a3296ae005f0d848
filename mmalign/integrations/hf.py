"""Patch a Hugging Face model so that ``model(..., labels=labels, fused_lm_head=True)`` returns label
log-probabilities through :func:`mmalign.functional.fused_linear_sequence_logps`: the backbone runs,
the LM head projects only the positions whose next-token label is not -100, chunk by chunk, and the
(batch, seq, vocab) logits never exist. Without ``fused_lm_head`` the forward is the original one
(generation is unchanged). The output carries

    log_probs  (B, T-1)  per-token log p(labels[:, t+1] | ...), 0 where the label is ignored
    logps      (B,)      their sum per sequence (SPEC.md §1)

the same protocol as TRL's own fused head, so TRL trainers consume it as is.

    undo = patch_sequence_logps(model)    # one table says where each model type keeps backbone and head
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
from ..lm_logits import logit_transform


@dataclass
class FusedLogpsOutput:
    log_probs: torch.Tensor
    logps: torch.Tensor
    logits: None = None
    loss: torch.Tensor | None = None  # mean negative log-likelihood of the labelled tokens (TRL reads it)


def _backbone_head(model):
    return model.model, model.lm_head


# model type -> (backbone returning last_hidden_state, lm_head). The one place to add a model family.
# The logits transform of a family (Gemma-2's soft-capping, Cohere's and Granite's scales) is read by
# mmalign.lm_logits.logit_transform and applied inside the fused op.
MODELS: dict[str, Callable] = {name: _backbone_head for name in (
    "llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "phi3",
    "olmo", "olmo2", "cohere", "cohere2", "granite", "granitemoe", "granitemoeshared",           # causal LMs
    "llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "gemma3", "idefics3", "mllama",  # VLMs
)}


def patch_sequence_logps(model, *, ignore_index: int = -100) -> Callable[[], None]:
    """Patch ``model`` (see the module docstring); returns the function that undoes it."""
    kind = getattr(model.config, "model_type", None)
    if kind not in MODELS:
        raise ValueError(f"model type {kind!r} is not in mmalign.integrations.hf.MODELS "
                         f"({sorted(MODELS)}): add how to reach its backbone and LM head there")
    backbone, head = MODELS[kind](model)
    transform = logit_transform(model).kwargs()
    had_own = "forward" in vars(model)
    original = model.forward

    @functools.wraps(type(model).forward)
    def forward(*args, fused_lm_head: bool = False, labels=None, **kwargs):
        if not fused_lm_head:
            return original(*args, labels=labels, **kwargs) if labels is not None else original(*args, **kwargs)
        if labels is None:
            raise ValueError("labels: fused_lm_head=True needs the labels whose log-probs to compute")
        kwargs.pop("use_cache", None)
        kwargs.pop("num_items_in_batch", None)
        kwargs.pop("logits_to_keep", None)
        hidden = backbone(*args, use_cache=False, **kwargs).last_hidden_state
        out = F.fused_linear_sequence_logps(hidden[:, :-1], head.weight, labels[:, 1:], bias=head.bias,
                                            ignore_index=ignore_index, return_token_logps=True, **transform)
        count = (labels[:, 1:] != ignore_index).sum().clamp_min(1)
        return FusedLogpsOutput(log_probs=out.token_logps, logps=out.logps, loss=-out.token_logps.sum() / count)

    model.forward = forward

    def undo():
        if had_own:
            model.forward = original
        else:
            del model.forward

    return undo
