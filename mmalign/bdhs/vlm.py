"""What the BDHS engine needs from a Hugging Face model, for causal LMs and ``*ForConditionalGeneration``
VLMs alike: the decoder stack, the LM head, the image-token id, and the input embeddings with the
image features already merged in (taken from the model's own forward, so any VLM whose decoder is a
submodule receiving ``inputs_embeds`` works: LLaVA-1.5, LLaVA-1.6 AnyRes, ...). A VLM whose forward passes
its decoder more than that (positions, masks, cross-attention states) is refused, naming the input."""
from __future__ import annotations

import torch


class _Captured(Exception):
    pass


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder returning ``last_hidden_state``, lm_head)."""
    head = getattr(model, "lm_head", None)
    inner = getattr(model, "model", None)
    decoder = getattr(inner, "language_model", None) or inner
    if head is None and hasattr(model, "language_model"):  # transformers < 4.52 LLaVA layout
        decoder, head = model.language_model.model, model.language_model.lm_head
    if decoder is None or head is None:
        raise ValueError(f"{type(model).__name__}: cannot find its decoder and lm_head")
    return decoder, head


def image_token_id(model) -> int | None:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(model.config, name, None)
        if value is not None:
            return int(value)
    return None


def merged_embeddings(model, input_ids: torch.Tensor, image_inputs: dict | None = None) -> torch.Tensor:
    """(B, T, H) embeddings of ``input_ids`` with the image features in place of the image tokens."""
    decoder, _ = decoder_and_head(model)
    if not image_inputs:
        return decoder.get_input_embeddings()(input_ids)
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"], seen["kwargs"] = kwargs.get("inputs_embeds"), kwargs
        raise _Captured

    # prepend: ahead of DeepSpeed ZeRO-3's own pre-forward hook, which would otherwise fetch the decoder for a
    # call that never runs (its parameter-fetch trace then failed in the next step's backward)
    hook = decoder.register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
    try:
        model(input_ids=input_ids, **image_inputs, use_cache=False)
    except _Captured:
        pass
    finally:
        hook.remove()
    if seen.get("embeds") is None:
        raise ValueError(f"{type(model).__name__}: its decoder was not called with inputs_embeds")
    _check_nothing_else(model, seen["kwargs"], seen["embeds"].shape[1])
    return seen["embeds"]


def _check_nothing_else(model, kwargs: dict, T: int) -> None:
    """mmalign runs the decoder on these embeddings itself, with its own positions and masks (the trainer's
    batched sequences, the BDHS engine's decoding). A VLM whose forward hands its decoder more than the
    embeddings and a padding mask (Qwen2-VL's multimodal RoPE positions, Gemma-3's bidirectional image mask,
    Mllama's cross-attention states) would be run without them: refused, naming the input."""
    arange = torch.arange(T)
    for name, value in kwargs.items():
        if name == "inputs_embeds" or value is None or isinstance(value, bool):
            continue
        if name == "attention_mask" and torch.is_tensor(value) and value.dim() == 2:
            continue  # padding, which mmalign builds itself
        if (name in ("position_ids", "cache_position") and torch.is_tensor(value) and value.shape[-1] == T
                and value.dim() <= 2 and bool((value.cpu() == arange).all())):
            continue  # the default positions
        what = f"shape {tuple(value.shape)}" if torch.is_tensor(value) else type(value).__name__
        raise ValueError(f"{type(model).__name__}: its forward passes {name} ({what}) to its decoder besides the "
                         "merged embeddings; mmalign runs the decoder with its own positions and masks and would "
                         "leave it out. Supported: VLMs whose decoder takes the merged embeddings alone (LLaVA-1.5, "
                         "LLaVA-NeXT, ...)")
