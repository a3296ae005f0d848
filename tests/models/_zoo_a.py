"""Tiny random vision-language models (LLaVA family, Mistral-3, Aya Vision, InternVL) with one processed prompt each.

Every builder makes a word-level tokenizer with the family's special tokens, runs the family's own processor
(its image processor and its placeholder expansion) on a small synthetic image, and builds the model from configs
with random weights (``torch.manual_seed(0)``, float64, eval, SDPA attention). No downloads.

Sizes: ``VOCAB`` (160) tokens, the family's special tokens first (so ``text_ids`` = [number of specials, VOCAB)),
decoders of 2 layers, 32 wide (4 heads of 8, 2 KV heads), vision towers of 1 layer, 12 to 16 image tokens.
Every vision tower feeds its last layer (``vision_feature_layer=-1``; LLaVA-1.5 and LLaVA-NeXT checkpoints use -2,
which with one layer would skip it).
"""
from __future__ import annotations

from typing import Callable

import torch

from ._sample import Sample  # the type every builder returns

# ordinary words of every tokenizer here (after the family's special tokens, padded with fillers to VOCAB ids)
VOCAB = 160
_WORDS = ("USER ASSISTANT user assistant : the a an image shows red green blue yellow circle square triangle "
          "background is white and it centered there are of them yes no this picture has two three four on left "
          "right top bottom . , ? ! Describe What How many shapes colour shape count one").split()
_BEFORE, _AFTER = "Describe this picture :", "What shapes are there ?"  # the words around the image


def _tokenizer(specials: list[str], named: dict[str, str] | None = None, **roles):
    """A word-level fast tokenizer: ``specials`` (ids 0.., never split), then ordinary words up to ``VOCAB`` ids.
    ``roles`` are bos/eos/pad/unk tokens (strings among ``specials``); ``named`` model-specific special tokens
    (``tokenizer.<name>`` and ``tokenizer.<name>_id``, as InternVL's processor reads them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(specials)}
    for w in _WORDS:
        vocab.setdefault(w, len(vocab))
    for i in range(VOCAB - len(vocab)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=roles.get("unk_token", "<unk>")))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    named_tokens = set((named or {}).values())
    extra = [t for t in specials if t not in roles.values() and t not in named_tokens]
    out = PreTrainedTokenizerFast(tokenizer_object=tok, **roles,
                                  extra_special_tokens=dict(named) if named else extra)
    if named:
        out.add_special_tokens({"extra_special_tokens": extra}, replace_extra_special_tokens=False)
    assert len(out) == VOCAB, len(out)
    return out, len(specials)


def _image(height: int, width: int):
    """A deterministic RGB PIL image of ``height`` x ``width`` pixels: a red circle on white."""
    from mmalign import synthetic

    return synthetic.draw("red", "circle", 1, max(height, width)).crop((0, 0, width, height))


def _finish(name, model, processor, text, image, tok, n_special, eos_token) -> Sample:
    enc = processor(images=[image], text=[text], return_tensors="pt")
    ids = enc.pop("input_ids")[0].long()
    enc.pop("attention_mask", None)
    inputs = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in enc.items()}
    eos = tok.convert_tokens_to_ids(eos_token)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = tok.pad_token_id
    return Sample(name, model, ids, inputs, (n_special, VOCAB), eos)


def _text(**extra) -> dict:
    """The tiny decoder: 2 layers, 32 wide, 4 heads of 8, 2 KV heads, ``VOCAB`` tokens."""
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=512, **extra)


def _build(model_cls, cfg):
    torch.manual_seed(0)
    return model_cls._from_config(cfg, attn_implementation="sdpa").double().eval()


def _ids(tok, **roles) -> dict:
    return {k: tok.convert_tokens_to_ids(v) for k, v in roles.items()}


# ---------------------------------------------------------------------------------------------------- LLaVA-1.5


def llava() -> Sample:
    """LLaVA-1.5: CLIP vision tower (16 px, 4 px patches, CLS dropped: 16 <image> tokens), MLP projector, Llama."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok, n = _tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], bos_token="<s>", eos_token="</s>",
                        pad_token="<pad>", unk_token="<unk>")
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                             crop_size={"height": 16, "width": 16}),
                          tokenizer=tok, patch_size=4, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>")
    text = _text(**_ids(tok, bos_token_id="<s>", eos_token_id="</s>", pad_token_id="<pad>"))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=4)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = _build(LlavaForConditionalGeneration, cfg)
    prompt = f"<s> USER : {_BEFORE} <image>\n{_AFTER} ASSISTANT :"
    return _finish("llava", model, proc, prompt, _image(20, 24), tok, n, "</s>")


# ------------------------------------------------------------------------------------- Pixtral-12B / Mistral-3

# Tekken's first ids (Pixtral-12B, Mistral-Small-3.1): [IMG] is 10, [IMG_BREAK] 12, [IMG_END] 13
_TEKKEN = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
           "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]"]


def _pixtral_processor(tok, patch_size: int, spatial_merge_size: int, longest_edge: int):
    from transformers import PixtralImageProcessor, PixtralProcessor

    image_processor = PixtralImageProcessor(size={"longest_edge": longest_edge},
                                            patch_size={"height": patch_size, "width": patch_size})
    return PixtralProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                            spatial_merge_size=spatial_merge_size, image_token="[IMG]",
                            image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]")


def _tekken():
    return _tokenizer(_TEKKEN, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def llava_pixtral() -> Sample:
    """Pixtral-12B: ``LlavaForConditionalGeneration`` with a Pixtral vision tower (8 px patches, 2D RoPE, images
    of any size: 20x28 px resized to 24x32, 3x4 = 12 [IMG] tokens in rows closed by [IMG_BREAK] / [IMG_END]) and
    a Mistral decoder; ``vision_feature_select_strategy="full"``."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tok, n = _tekken()
    proc = _pixtral_processor(tok, patch_size=8, spatial_merge_size=1, longest_edge=32)
    text = _text(model_type="mistral", rope_theta=1e9, sliding_window=None,
                 **_ids(tok, bos_token_id="<s>", eos_token_id="</s>", pad_token_id="<pad>"))
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("[IMG]"),
                      vision_feature_layer=-1, vision_feature_select_strategy="full", projector_hidden_act="gelu")
    model = _build(LlavaForConditionalGeneration, cfg)
    prompt = f"<s>[INST] {_BEFORE}\n[IMG] {_AFTER}[/INST]"
    return _finish("llava_pixtral", model, proc, prompt, _image(20, 28), tok, n, "</s>")


def mistral3() -> Sample:
    """Mistral-Small-3.1: Pixtral vision tower (4 px patches), RMSNorm + 2x2 patch merger, Mistral decoder; a
    20x28 px image resized to 24x32: 3x4 = 12 [IMG] tokens in rows closed by [IMG_BREAK] / [IMG_END]."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tok, n = _tekken()
    proc = _pixtral_processor(tok, patch_size=4, spatial_merge_size=2, longest_edge=32)
    text = _text(model_type="mistral", rope_theta=1e9, sliding_window=None,
                 **_ids(tok, bos_token_id="<s>", eos_token_id="</s>", pad_token_id="<pad>"))
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=4)
    cfg = Mistral3Config(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("[IMG]"),
                         spatial_merge_size=2, vision_feature_layer=-1)
    model = _build(Mistral3ForConditionalGeneration, cfg)
    prompt = f"<s>[INST] {_BEFORE} [IMG] {_AFTER}[/INST]"
    return _finish("mistral3", model, proc, prompt, _image(20, 28), tok, n, "</s>")


# ------------------------------------------------------------------------------------- LLaVA-NeXT / OneVision


def llava_next() -> Sample:
    """LLaVA-NeXT (v1.6-mistral): AnyRes tiles of a CLIP tower (16 px, 8 px patches: 2x2 tokens a tile, CLS
    dropped), unpadding and ``image_newline``, Mistral decoder; a 20x28 px image: a base tile and 2 of the
    AnyRes grid (pixel_values padded to 5 tiles), 14 <image> tokens; ``image_sizes`` with the pixel values."""
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                              LlavaNextProcessor)

    tok, n = _tokenizer(["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "<image>"], bos_token="<s>",
                        eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    pinpoints = [[16, 32], [32, 16], [32, 32], [48, 16], [16, 48]]
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                              image_grid_pinpoints=pinpoints)
    proc = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              image_token="<image>")
    text = _text(model_type="mistral", sliding_window=None,
                 **_ids(tok, bos_token_id="<s>", eos_token_id="</s>", pad_token_id="<pad>"))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                          image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
                          vision_feature_select_strategy="default")
    model = _build(LlavaNextForConditionalGeneration, cfg)
    prompt = f"<s>[INST] {_BEFORE} <image>\n{_AFTER} [/INST]"
    return _finish("llava_next", model, proc, prompt, _image(20, 28), tok, n, "</s>")


_QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def llava_onevision() -> Sample:
    """LLaVA-OneVision: AnyRes tiles of a SigLIP tower (16 px, 8 px patches: 2x2 tokens a tile, no CLS),
    unpadding and ``image_newline``, Qwen2 decoder; a 12x20 px image: a base tile and 2 of the AnyRes grid, 14
    <image> tokens; ``image_sizes`` and ``batch_num_images`` with the pixel values."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor)

    tok, n = _tokenizer(_QWEN + ["<image>", "<video>", "<unk>"], eos_token="<|im_end|>", pad_token="<|endoftext|>",
                        unk_token="<unk>")
    pinpoints = [[16 * i, 16 * j] for i in (1, 2, 3) for j in (1, 2, 3)]
    image_processor = LlavaOnevisionImageProcessor(size={"height": 16, "width": 16}, image_grid_pinpoints=pinpoints)
    proc = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tok,
                                   video_processor=LlavaOnevisionVideoProcessor(), num_image_tokens=4,
                                   vision_feature_select_strategy="full", image_token="<image>", video_token="<video>")
    text = _text(model_type="qwen2", **_ids(tok, eos_token_id="<|im_end|>", pad_token_id="<|endoftext|>"))
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=8, vision_use_head=False)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text,
                               image_token_id=tok.convert_tokens_to_ids("<image>"),
                               video_token_id=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pinpoints,
                               vision_feature_layer=-1, vision_feature_select_strategy="full")
    model = _build(LlavaOnevisionForConditionalGeneration, cfg)
    prompt = f"<|im_start|> user\n{_BEFORE} <image>\n{_AFTER}<|im_end|>\n<|im_start|> assistant\n"
    return _finish("llava_onevision", model, proc, prompt, _image(12, 20), tok, n, "<|im_end|>")


# ------------------------------------------------------------------------------------------- Aya Vision, InternVL


def _got_ocr2(size: int):
    """The tiling image processor of Aya Vision and InternVL: ``size`` px tiles, a thumbnail when tiled."""
    from transformers import GotOcr2ImageProcessor

    return GotOcr2ImageProcessor(size={"height": size, "width": size}, crop_to_patches=True, min_patches=1,
                                 max_patches=12)


_AYA = ["<PAD>", "<UNK>", "<CLS>", "<SEP>", "<MASK_TOKEN>", "<BOS_TOKEN>", "<EOS_TOKEN>", "<|START_OF_TURN_TOKEN|>",
        "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>", "<image>",
        "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE", "TILE_GLOBAL",
        "TILE_1", "TILE_2", "TILE_3", "TILE_4"]


def _aya_vision(name: str, **text_extra) -> Sample:
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, AyaVisionProcessor

    tok, n = _tokenizer(_AYA, bos_token="<BOS_TOKEN>", eos_token="<|END_OF_TURN_TOKEN|>", pad_token="<PAD>",
                        unk_token="<UNK>")
    proc = AyaVisionProcessor(image_processor=_got_ocr2(16), tokenizer=tok, patch_size=4, img_size=16,
                              downsample_factor=2, image_token="<image>")
    text = _text(model_type="cohere2", layer_types=["sliding_attention", "full_attention"], **text_extra,
                 **_ids(tok, bos_token_id="<BOS_TOKEN>", eos_token_id="<|END_OF_TURN_TOKEN|>",
                        pad_token_id="<PAD>"))
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=4, vision_use_head=False)
    cfg = AyaVisionConfig(vision_config=vision, text_config=text,
                          image_token_id=tok.convert_tokens_to_ids("<|IMG_PATCH|>"), downsample_factor=2,
                          vision_feature_layer=-1, vision_feature_select_strategy="full")
    model = _build(AyaVisionForConditionalGeneration, cfg)
    prompt = (f"<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|>{_BEFORE} <image>{_AFTER}<|END_OF_TURN_TOKEN|>"
              "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>")
    return _finish(name, model, proc, prompt, _image(16, 32), tok, n, "<|END_OF_TURN_TOKEN|>")


def aya_vision() -> Sample:
    """Aya Vision: SigLIP tower (16 px tiles, 4 px patches), 2x2 pixel shuffle + SwiGLU projector, Cohere-2 decoder
    (one sliding-window layer with RoPE, one full-attention layer without) and its default ``logit_scale``
    (0.0625); a 16x32 px image: 2 tiles + a global thumbnail, 4 <|IMG_PATCH|> tokens each."""
    return _aya_vision("aya_vision")


def aya_vision_scale1() -> Sample:
    """:func:`aya_vision` with ``logit_scale=1.0``."""
    return _aya_vision("aya_vision_scale1", logit_scale=1.0)


def internvl() -> Sample:
    """InternVL-3: InternViT tower (16 px tiles, 4 px patches, CLS dropped), 0.5 pixel shuffle + MLP projector,
    Qwen2 decoder; a 16x32 px image: 2 tiles + a thumbnail, 4 <IMG_CONTEXT> tokens each inside <img> ... </img>."""
    from transformers import (InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor,
                              InternVLVideoProcessor)

    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok, n = _tokenizer(_QWEN + list(named.values()) + ["<unk>"], named=named, eos_token="<|im_end|>",
                        pad_token="<|endoftext|>", unk_token="<unk>")
    proc = InternVLProcessor(image_processor=_got_ocr2(16), tokenizer=tok, video_processor=InternVLVideoProcessor(),
                             image_seq_length=4)
    text = _text(model_type="qwen2", **_ids(tok, eos_token_id="<|im_end|>", pad_token_id="<|endoftext|>"))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=4)
    cfg = InternVLConfig(vision_config=vision, text_config=text,
                         image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4,
                         downsample_ratio=0.5, vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = _build(InternVLForConditionalGeneration, cfg)
    prompt = f"<|im_start|> user\n{_BEFORE} <IMG_CONTEXT>\n{_AFTER}<|im_end|>\n<|im_start|> assistant\n"
    return _finish("internvl", model, proc, prompt, _image(16, 32), tok, n, "<|im_end|>")


BUILDERS: dict[str, Callable[[], Sample]] = {
    "llava": llava,
    "llava_pixtral": llava_pixtral,
    "llava_next": llava_next,
    "llava_onevision": llava_onevision,
    "mistral3": mistral3,
    "aya_vision": aya_vision,
    "aya_vision_scale1": aya_vision_scale1,
    "internvl": internvl,
}
