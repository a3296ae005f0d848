"""A Hugging Face model's logits as mmalign computes them from the decoder's last hidden state: the LM
head, then the transform that some model families apply to it in their own forward. Log-probs taken from
the head alone would silently differ for these families (Gemma-2 soft-caps every logit at +-30):

    model_type                                  logits
    gemma2, gemma3_text, paligemma              softcap * tanh(z / softcap), softcap = final_logit_softcapping
    cohere, cohere2                             z * logit_scale
    granite, granitemoe, granitemoeshared       z / logits_scaling

``TRANSFORMS`` is the one table to extend (each entry transcribes its family's forward in transformers).
A model type outside it whose (text) config sets one of these attributes to a value that changes the logits
is refused with an error that names it: the attribute says there is a transform, not which one (Granite
divides by ``logits_scaling`` where other families multiply)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .ops.fused_linear_sequence_logps import transform_logits


@dataclass(frozen=True)
class LogitTransform:
    """logits = softcap * tanh(scale * z / softcap) of the head's output z (each step only when set)."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """Eager and differentiable, for logits that exist anyway (generation, ZeRO-3's gathered head)."""
        return transform_logits(z, self.scale, self.softcap)

    def kwargs(self) -> dict:
        """The arguments of :func:`mmalign.functional.fused_linear_sequence_logps` that apply it."""
        return dict(logit_scale=self.scale, logit_softcap=self.softcap)


def _softcap(text_config) -> LogitTransform:
    cap = getattr(text_config, "final_logit_softcapping", None)
    return LogitTransform(softcap=None if cap is None else float(cap))


def _times_logit_scale(text_config) -> LogitTransform:
    return LogitTransform(scale=float(text_config.logit_scale))


def _over_logits_scaling(text_config) -> LogitTransform:
    return LogitTransform(scale=1.0 / float(text_config.logits_scaling))


TRANSFORMS: dict[str, Callable[[object], LogitTransform]] = {
    "gemma2": _softcap, "gemma3_text": _softcap, "paligemma": _softcap,
    "cohere": _times_logit_scale, "cohere2": _times_logit_scale,
    "granite": _over_logits_scaling, "granitemoe": _over_logits_scaling, "granitemoeshared": _over_logits_scaling,
}
# config attributes that announce a transform, and the value at which it changes nothing
SIGNALS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def logit_transform(model) -> LogitTransform:
    """The transform ``model``'s forward applies to its LM head's output (identity for most families);
    raises ValueError for a model type outside ``TRANSFORMS`` whose config announces one."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kind = getattr(config, "model_type", None)
    if kind in TRANSFORMS:
        return TRANSFORMS[kind](text)
    for name, neutral in SIGNALS.items():
        value = getattr(text, name, None)
        if value is not None and value != neutral:
            raise ValueError(f"model type {kind!r}: its config sets {name}={value!r}, a transform of the logits "
                             f"that mmalign does not know for this family; add it to mmalign.lm_logits.TRANSFORMS")
    return LogitTransform()
