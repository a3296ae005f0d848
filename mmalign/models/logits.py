"""A Hugging Face model's logits as mmalign computes them from the decoder's last hidden state: the LM head, then
the transform that some model families apply to it in their own forward. Log-probs taken from the head alone
would silently differ for these families (Gemma-2 soft-caps every logit at +-30):

    family (its entry in mmalign.models.FAMILIES)           logits
    gemma2, gemma3_text, paligemma                            softcap * tanh(z / softcap), softcap = final_logit_softcapping
    cohere, cohere2, aya_vision                               z * logit_scale
    granite, granitemoe, granitemoeshared                     z / logits_scaling
    gemma3 (the VLM)                                          z (its forward does not soft-cap)

A model type whose family entry names no transform, but whose (text) config sets one of these attributes to a
value that changes the logits, is refused with an error that names the attribute: the attribute says there is
a transform, not which one (Granite divides by ``logits_scaling`` where Cohere multiplies by ``logit_scale``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..ops.fused_linear_sequence_logps import transform_logits


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


def unchanged(text_config) -> LogitTransform:
    """A family whose forward applies no transform whatever its text config says (Gemma-3's VLM forward does not
    soft-cap, where its text-only sibling does)."""
    return LogitTransform()


def softcap(text_config) -> LogitTransform:
    """Gemma-2/3, PaliGemma: ``final_logit_softcapping`` (None: no cap)."""
    cap = getattr(text_config, "final_logit_softcapping", None)
    return LogitTransform(softcap=None if cap is None else float(cap))


def times_logit_scale(text_config) -> LogitTransform:
    """Cohere, Cohere-2, Aya Vision: ``logits * logit_scale``."""
    return LogitTransform(scale=float(text_config.logit_scale))


def over_logits_scaling(text_config) -> LogitTransform:
    """Granite: ``logits / logits_scaling``."""
    return LogitTransform(scale=1.0 / float(text_config.logits_scaling))


# config attributes that announce a transform, and the value at which it changes nothing
SIGNALS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def resolve(config, reader: Callable[[object], LogitTransform] | None) -> LogitTransform:
    """The transform of a model with this config: ``reader(text config)`` where its family names one; else the
    identity, unless the config announces a transform (ValueError naming the attribute)."""
    text = text_config(config)
    if reader is not None:
        return reader(text)
    for name, neutral in SIGNALS.items():
        value = getattr(text, name, None)
        if value is not None and value != neutral:
            kind = getattr(config, "model_type", None)
            raise ValueError(f"model type {kind!r}: its config sets {name}={value!r}, a transform of the logits "
                             "that mmalign does not know for this family; give its entry in "
                             "mmalign.models.FAMILIES a logits= reader (mmalign.models.logits)")
    return LogitTransform()
