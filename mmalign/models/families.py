"""The one table of model families: what is special about each, keyed by ``config.model_type``.

An entry says which decoder inputs the family's own forward computes besides the merged embeddings, and how
they follow mmalign's layouts (:mod:`mmalign.models.layout`):

    (positions)    the RoPE positions its forward computes are always kept (multimodal RoPE: (3, B, T) from
                   the model's get_rope_index; PaliGemma's 1-based ids)
    masks          attention masks of its own (Gemma-3's bidirectional image blocks, PaliGemma's prefix)
    inputs         further decoder inputs, each with a layout Rule (Qwen3-VL's deepstack features,
                   Mllama's cross-attention states and masks)
    token_inputs   per-token outputs of the processor (``mm_token_type_ids``, ``token_type_ids``, ...) and
                   their value past the prompt (the processor covers the prompt; mmalign appends responses)
    logits         the transform of the LM head's output (:mod:`mmalign.models.logits`)
    shared_prompt  whether chosen and rejected may share one [prompt | chosen | rejected] sequence
    bdhs           None, or why the BDHS engine cannot serve the family

Everything is computed by the model's own code (its forward, ``get_rope_index``, its mask builders) on the
whole row and laid out afterwards; nothing here re-derives a family's positions or masks. A model type not in
the table runs when its decoder takes the merged embeddings alone (:data:`GENERIC`); anything more it is given
is refused, naming the input. Adding a family: an entry below, and a tiny model of it in
``tests/models/_zoo*.py`` (the coverage table in docs/models.md is generated from the tests' results).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import logits as L
from .layout import SAMPLE, TOKEN, VISUAL, Rule

REPEAT = "repeat"  # a per-token input continued with its last entry (Mllama's cross-attention mask)


@dataclass(frozen=True)
class Family:
    about: str
    logits: Callable | None = None
    masks: bool = False
    inputs: dict = field(default_factory=dict)
    token_inputs: dict = field(default_factory=lambda: {"token_type_ids": 0, "mm_token_type_ids": 0})
    shared_prompt: bool = True
    bdhs: str | None = None
    kind: str = "vlm"               # "vlm" or "causal" (a text-only LM)
    projector: tuple = ()           # modules inside the vision tower that are the projector (Qwen's merger)


def _causal(about: str = "causal LM; the decoder takes the embeddings alone", **kw) -> Family:
    return Family(about, kind="causal", **kw)


_MROPE = ("multimodal RoPE: (3, B, T) positions from the model's get_rope_index; a text token advances all three "
          "axes, the rejected response resumes at the prompt's next position")
_CONV = ("hybrid decoder with short convolutions: a convolution mixes neighbouring tokens whatever the attention "
         "mask says")

GENERIC = Family("not in the table: runs when its decoder takes the merged embeddings alone", shared_prompt=False)

FAMILIES: dict[str, Family] = {
    # ------------------------------------------------------------------------------- causal LMs
    **{name: _causal() for name in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3_moe", "gemma", "phi3",
                                    "olmo", "olmo2")},
    "gemma2": _causal("causal LM; logits soft-capped (final_logit_softcapping); sliding-window layers",
                      logits=L.softcap),
    "gemma3_text": _causal("causal LM; logits soft-capped; sliding-window layers", logits=L.softcap),
    "cohere": _causal("causal LM; logits times logit_scale", logits=L.times_logit_scale),
    "cohere2": _causal("causal LM; logits times logit_scale; sliding-window layers", logits=L.times_logit_scale),
    **{name: _causal("causal LM; logits divided by logits_scaling", logits=L.over_logits_scaling)
       for name in ("granite", "granitemoe", "granitemoeshared")},
    # ------------------------------------------------------------------------------------- VLMs
    "llava": Family("LLaVA-1.5 (CLIP tower) and Pixtral-tower LLaVA: image features merged into the embeddings"),
    "llava_next": Family("LLaVA-NeXT: AnyRes tiles merged into the embeddings (image_sizes)"),
    "llava_onevision": Family("LLaVA-OneVision: AnyRes tiles merged into the embeddings"),
    "mistral3": Family("Mistral-3: Pixtral tower, patch merger; embeddings alone"),
    "internvl": Family("InternVL: pixel-shuffled ViT features merged into the embeddings"),
    "aya_vision": Family("Aya Vision: Cohere-2 decoder, logits times logit_scale", logits=L.times_logit_scale),
    "ovis2": Family("Ovis2: visual tokens merged into the embeddings"),
    "smolvlm": Family("SmolVLM: image split into tiles; decoder at model.text_model"),
    "idefics3": Family("Idefics3: image split into tiles; decoder at model.text_model"),
    "qwen2_vl": Family(f"Qwen2-VL: {_MROPE}", projector=("merger",)),
    "qwen2_5_vl": Family(f"Qwen2.5-VL: {_MROPE}", projector=("merger",)),
    "glm4v": Family(f"GLM-4V: {_MROPE}", projector=("merger",)),
    "qwen3_vl": Family(
        f"Qwen3-VL: {_MROPE}; deepstack visual features added to the image positions' hidden states in the first "
        "layers (kept only for the kept image tokens under compaction)", projector=("merger", "deepstack_merger_list"),
        inputs={"visual_pos_masks": Rule(TOKEN, fill=False),
                "deepstack_visual_embeds": Rule(VISUAL, mask="visual_pos_masks")}),
    "gemma3": Family("Gemma-3: the tokens of one image attend to each other (full and sliding masks from its own "
                     "builders); its forward does not soft-cap the logits (its text-only sibling does)", logits=L.unchanged,
                     masks=True),
    "paligemma": Family("PaliGemma: prefix-LM mask (image and prompt bidirectional, response causal) from its own "
                        "builder", logits=L.softcap, masks=True, token_inputs={"token_type_ids": 1}),
    "molmo2": Family("Molmo2: attention mask of its own (image tokens)", masks=True),
    "lfm2_vl": Family("LFM2-VL: hybrid decoder with short convolution layers; chosen and rejected run as two "
                      "sequences (in one, a convolution would mix the rejected response with the chosen one)",
                      shared_prompt=False,
                      bdhs=f"LFM2-VL's decoder is a {_CONV}, so removing hidden image tokens is not the same as "
                           "masking them, and its convolution state cannot be batched by the engine"),
    "mllama": Family(
        "Mllama: no image tokens in the sequence; the image reaches the decoder through cross-attention states "
        "(computed once per pair) and a per-token cross-attention mask",
        inputs={"cross_attention_states": Rule(SAMPLE), "cross_attention_mask": Rule(TOKEN, axis=2),
                "full_text_row_masked_out_mask": Rule(TOKEN, axis=2)},
        token_inputs={"cross_attention_mask": REPEAT},
        bdhs="Mllama has no image tokens to hide: BDHS's image-key mask (Eq. 6) has only a cross-attention analogue, "
             "which the engine does not implement"),
}


def family(model_type: str | None) -> Family:
    return FAMILIES.get(model_type, GENERIC)
