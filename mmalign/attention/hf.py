"""Hugging Face integration: ``attn_implementation="mmalign_masked"``.

    from mmalign.attention import hf
    hf.register()                                            # once (importing this module does it)
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="mmalign_masked")
    keep = sample_image_keep(input_ids == image_token_id, rho_th=0.99)
    with hf.hidden_keys(keep):                               # (B, T) bool over the prompt
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=px)

The image-key mask travels beside the model call (the context manager, or the ``mmalign_key_keep`` /
``mmalign_query_scope`` keyword arguments of the model's forward), never through the 2-D
``attention_mask``: Hugging Face derives position ids from that mask, and holes in it would shift the
RoPE positions of every later token (docs/math.md §7). ``attention_mask`` keeps its usual meaning
(padding). Keys beyond the mask's length (tokens generated afterwards) are visible; queries beyond it
are text (scoped). Non-causal attention (a VLM's vision tower, when it runs with the same
implementation) ignores the mask. With no mask the result equals ``"sdpa"``.

Works with ``LlamaForCausalLM``, ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``
and any model that calls ``ALL_ATTENTION_FUNCTIONS`` (transformers >= 4.53, which has the mask interface),
with a ``DynamicCache``. Attention features the kernel lacks raise ValueError when a model asks for them:
score soft-capping (Gemma-2), a sliding window shorter than the keys (Mistral, Gemma-2/3 local layers),
attention sinks (gpt-oss).
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

from .masked import LastCall, masked_attention

NAME = "mmalign_masked"
_MASK: contextvars.ContextVar = contextvars.ContextVar("mmalign_hidden_keys", default=(None, None))


@contextlib.contextmanager
def hidden_keys(key_keep: torch.Tensor | None, query_scope: torch.Tensor | None = None):
    """Within the block, ``mmalign_masked`` attention hides key j of sample b where
    ``key_keep[b, j]`` is False (from scoped queries only, when ``query_scope`` is given)."""
    token = _MASK.set((key_keep, query_scope))
    try:
        yield
    finally:
        _MASK.reset(token)


def _extend(mask: torch.Tensor | None, length: int, device) -> torch.Tensor | None:
    """Pad (B, T0) with True up to ``length`` (later tokens are visible / are text), or cut it."""
    if mask is None:
        return None
    mask = mask.to(device=device, dtype=torch.bool)
    if mask.shape[1] >= length:
        return mask[:, :length]
    return torch.nn.functional.pad(mask, (0, length - mask.shape[1]), value=True)


# the layers of one forward pass the same tensors, so they get the same key_keep object, whose kernel-side
# preparation masked_attention then reuses too
_MASKS = LastCall()


def _layer_masks(keep, scope, attention_mask, Tk: int, Tq: int, device):
    """(key_keep (B, Tk), query_scope (B, Tq)) for one layer's call, bool or None."""
    return _MASKS.get((keep, scope, attention_mask), (Tk, Tq, device),
                      lambda: _build_masks(keep, scope, attention_mask, Tk, Tq, device))


def _build_masks(keep, scope, attention_mask, Tk: int, Tq: int, device):
    key_keep = _extend(keep, Tk, device)
    if attention_mask is not None:
        pad = attention_mask[:, -Tk:].to(torch.bool)
        key_keep = pad if key_keep is None else key_keep & pad
    query_scope = _extend(scope, Tk, device)
    if query_scope is not None:
        query_scope = query_scope[:, Tk - Tq:]
        if key_keep is None:
            query_scope = None
    return key_keep, query_scope


def _refuse_unsupported(module, Tk: int, kwargs) -> None:
    """Attention features some families ask for through the interface's keyword arguments, which this kernel
    does not implement: an error naming them, never attention computed without them."""
    family = type(module).__name__
    if kwargs.get("softcap") is not None:
        raise ValueError(f"mmalign_masked: {family} soft-caps its attention scores (softcap={kwargs['softcap']}), "
                         "which this kernel does not do; use another attn_implementation for this model")
    window = kwargs.get("sliding_window")
    if window is not None and Tk > window:
        raise ValueError(f"mmalign_masked: {family} attends within a sliding window of {window} keys and this call "
                         f"has {Tk}, which this kernel does not do; keep sequences within the window or use "
                         "another attn_implementation")
    if kwargs.get("s_aux") is not None:
        raise ValueError(f"mmalign_masked: {family} has attention sinks (s_aux), which this kernel does not do")


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The function registered under ``"mmalign_masked"`` (transformers' attention-interface signature):
    query (B, Hq, Tq, D), key/value (B, Hkv, Tk, D), attention_mask None or (B, Tk) bool padding."""
    if dropout and module.training:
        raise ValueError("mmalign_masked attention has no dropout: set attention_dropout=0 or eval()")
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    keep, scope = _MASK.get()
    keep = kwargs.get("mmalign_key_keep", keep)
    scope = kwargs.get("mmalign_query_scope", scope)
    if not causal:  # an encoder (the vision tower of a VLM): the image-key mask is the decoder's business
        keep = scope = None
    B, _, Tq, _ = query.shape
    if keep is not None and keep.shape[0] != B:
        raise ValueError(f"mmalign_key_keep / hidden_keys: expected a mask for a batch of {B}, got {tuple(keep.shape)}")
    Tk = key.shape[2]
    _refuse_unsupported(module, Tk, kwargs)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"mmalign_masked expects a 2-D padding mask from its mask function, got shape "
                         f"{tuple(attention_mask.shape)} (is mmalign.attention.hf.register() called?)")
    key_keep, query_scope = _layer_masks(keep, scope, attention_mask, Tk, Tq, query.device)
    out = masked_attention(query, key, value, key_keep=key_keep, query_scope=query_scope, causal=causal,
                           scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"mmalign_masked"`` with transformers' attention and mask interfaces (idempotent)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    except ImportError as e:
        raise ImportError("mmalign_masked needs transformers >= 4.53 (AttentionInterface and "
                          "AttentionMaskInterface)") from e
    AttentionInterface.register(NAME, attention_forward)
    # the padding mask as a (B, Tk) bool tensor, or None when nothing is padded (flash-attention style)
    AttentionMaskInterface.register(NAME, flash_attention_mask)

