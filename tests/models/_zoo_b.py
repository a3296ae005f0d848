"""Tiny random vision-language models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V, Gemma-3, PaliGemma, Molmo2),
built from configs with random weights (seed 0, float64, eval), each with one chat-like prompt holding one image.

Every builder returns a :class:`Sample`. The prompt's image placeholders are expanded the way the family's processor
expands them (start/end/column tokens included), and ``image_inputs`` holds what the processor returns besides
``input_ids`` / ``attention_mask``. Token ids are laid out by hand (there is no tokenizer): ordinary text tokens fill
``[lo, hi)`` of ``text_ids`` and every special token lies outside it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

from ._sample import Sample  # the type every builder returns

F64 = torch.float64
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8)
# word ids shared by the hand-made prompts (all inside every family's text_ids range)
NL, USER, ASSISTANT, MODEL, W1, W2, W3 = 10, 20, 21, 22, 30, 31, 32


def _build(config, attn: str = "sdpa") -> "PreTrainedModel":
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation=attn)
    return model.double().eval()


def _gen(model, eos: int, pad: int) -> None:
    for cfg in (model.generation_config, model.config, model.config.get_text_config()):
        cfg.eos_token_id = eos
        cfg.pad_token_id = pad
    model.generation_config.bos_token_id = None
    model.generation_config.do_sample = False


def _pixels(*shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(*shape, generator=g, dtype=F64)


# --------------------------------------------------------------------------------------------------------------------
# Qwen family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): ChatML prompt,
#   <|im_start|>user\n<|vision_start|><|image_pad|>*N<|vision_end|>w w w<|im_end|>\n<|im_start|>assistant\n
# image grid (t, h, w) = (1, 4, 6) patches -> 2 x 3 = 6 merged image tokens; M-RoPE positions with h != w.
# --------------------------------------------------------------------------------------------------------------------
QWEN_VOCAB = 160
Q_IM_START, Q_IM_END, Q_V_START, Q_V_END, Q_IMAGE, Q_VIDEO, Q_EOT = 150, 151, 152, 153, 154, 155, 156
QWEN_GRID = (1, 4, 6)
QWEN_IDS = dict(image_token_id=Q_IMAGE, video_token_id=Q_VIDEO, vision_start_token_id=Q_V_START,
                vision_end_token_id=Q_V_END)


def _qwen_prompt(n_image: int) -> torch.Tensor:
    ids = [Q_IM_START, USER, NL, Q_V_START] + [Q_IMAGE] * n_image + [Q_V_END, W1, W2, W3, Q_IM_END, NL,
                                                                   Q_IM_START, ASSISTANT, NL]
    return torch.tensor(ids, dtype=torch.long)


def _qwen_sample(name: str, model, patch: int, temporal: int = 2, merge: int = 2) -> Sample:
    t, h, w = QWEN_GRID
    ids = _qwen_prompt(t * h * w // merge**2)
    inputs = dict(pixel_values=_pixels(t * h * w, 3 * temporal * patch * patch),
                  image_grid_thw=torch.tensor([list(QWEN_GRID)]),
                  mm_token_type_ids=(ids == Q_IMAGE).long()[None])
    _gen(model, Q_IM_END, Q_EOT)
    return Sample(name, model, ids, inputs, (NL, Q_IM_START), Q_IM_END)


def qwen2_vl() -> Sample:
    from transformers import AutoConfig

    text = dict(TEXT, vocab_size=QWEN_VOCAB, pad_token_id=Q_EOT, bos_token_id=Q_EOT, eos_token_id=Q_IM_END,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]})
    vision = dict(depth=1, embed_dim=32, hidden_size=32, mlp_ratio=2, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    cfg = AutoConfig.for_model("qwen2_vl", text_config=text, vision_config=vision, **QWEN_IDS)
    return _qwen_sample("qwen2_vl", _build(cfg), patch=14)


def qwen2_5_vl() -> Sample:
    from transformers import AutoConfig

    text = dict(TEXT, vocab_size=QWEN_VOCAB, pad_token_id=Q_EOT, bos_token_id=Q_EOT, eos_token_id=Q_IM_END,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 1, 1]})
    # window_size 56 px = 2 x 2 merged units: the 2 x 3 merged grid splits into two windows (vision layer 0),
    # layer 1 attends over the whole image (fullatt_block_indexes)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    cfg = AutoConfig.for_model("qwen2_5_vl", text_config=text, vision_config=vision, **QWEN_IDS)
    return _qwen_sample("qwen2_5_vl", _build(cfg), patch=14)


def qwen3_vl() -> Sample:
    from transformers import AutoConfig

    text = dict(TEXT, vocab_size=QWEN_VOCAB, pad_token_id=Q_EOT, rope_parameters={
        "rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    # deepstack features from vision layer 0 are added to the output of decoder layer 0 (layer 1 gets none)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0])
    cfg = AutoConfig.for_model("qwen3_vl", text_config=text, vision_config=vision, **QWEN_IDS)
    return _qwen_sample("qwen3_vl", _build(cfg), patch=16)


# --------------------------------------------------------------------------------------------------------------------
# GLM-4.1V: [gMASK]<sop><|user|>\n<|begin_of_image|><|image|>*N<|end_of_image|>w w w<|assistant|>\n
# --------------------------------------------------------------------------------------------------------------------
G_EOT, G_GMASK, G_SOP, G_USER, G_ASSISTANT, G_BOI, G_EOI, G_IMAGE, G_VIDEO, G_BOV, G_EOV = range(149, 160)


def glm4v() -> Sample:
    from transformers import AutoConfig

    # real checkpoints rotate half of head_dim (partial_rotary_factor 0.5, mrope_section [8, 12, 12] of 32
    # frequencies); with head_dim 8 that would leave 2 frequencies, so here the whole head rotates: 4 = 2 + 1 + 1
    text = dict(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=G_EOT, eos_token_id=G_EOT,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, out_hidden_size=32, num_heads=2, patch_size=14,
                  image_size=56, spatial_merge_size=2, temporal_patch_size=2)
    cfg = AutoConfig.for_model("glm4v", text_config=text, vision_config=vision, image_token_id=G_IMAGE,
                               video_token_id=G_VIDEO, image_start_token_id=G_BOI, image_end_token_id=G_EOI,
                               video_start_token_id=G_BOV, video_end_token_id=G_EOV)
    model = _build(cfg)
    t, h, w = QWEN_GRID
    n = t * h * w // 4
    ids = torch.tensor([G_GMASK, G_SOP, G_USER, NL, G_BOI] + [G_IMAGE] * n + [G_EOI, W1, W2, W3, G_ASSISTANT, NL])
    inputs = dict(pixel_values=_pixels(t * h * w, 3 * 2 * 14 * 14), image_grid_thw=torch.tensor([list(QWEN_GRID)]),
                  mm_token_type_ids=(ids == G_IMAGE).long()[None])
    _gen(model, G_EOT, G_EOT)
    return Sample("glm4v", model, ids, inputs, (NL, G_EOT), G_EOT)


# --------------------------------------------------------------------------------------------------------------------
# Gemma-3: <bos><start_of_turn>user\n\n\n<start_of_image><image>*4<end_of_image>\n\nw w w<end_of_turn>\n
#          <start_of_turn>model\n          (processor: token_type_ids = 1 on <image> tokens only)
# --------------------------------------------------------------------------------------------------------------------
GM_PAD, GM_EOS, GM_BOS = 0, 1, 2
GM_SOT, GM_EOT, GM_BOI, GM_EOI, GM_IMAGE = 150, 151, 152, 153, 154
NLNL = 11  # "\n\n" is one token in Gemma's vocabulary


def gemma3() -> Sample:
    from transformers import AutoConfig

    text = dict(TEXT, vocab_size=160, pad_token_id=GM_PAD, eos_token_id=GM_EOS, bos_token_id=GM_BOS,
                query_pre_attn_scalar=8, sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=56,
                  patch_size=14)
    # 4 x 4 patches, average-pooled to 2 x 2 = mm_tokens_per_image
    cfg = AutoConfig.for_model("gemma3", text_config=text, vision_config=vision, image_token_index=GM_IMAGE,
                               mm_tokens_per_image=4, boi_token_index=GM_BOI, eoi_token_index=GM_EOI)
    model = _build(cfg)
    ids = torch.tensor([GM_BOS, GM_SOT, USER, NL, NLNL, GM_BOI] + [GM_IMAGE] * 4 + [GM_EOI, NLNL, W1, W2, W3, GM_EOT,
                                                                                 NL, GM_SOT, MODEL, NL])
    inputs = dict(pixel_values=_pixels(1, 3, 56, 56), token_type_ids=(ids == GM_IMAGE).long()[None])
    _gen(model, GM_EOT, GM_PAD)
    return Sample("gemma3", model, ids, inputs, (NL, GM_SOT), GM_EOT)


# --------------------------------------------------------------------------------------------------------------------
# PaliGemma: <image>*4<bos>w w w\n   (processor: token_type_ids = 0 over the whole prompt = the bidirectional prefix;
# a response/suffix gets 1, as `generate` appends and as the processor gives a `suffix`)
# --------------------------------------------------------------------------------------------------------------------
PG_PAD, PG_EOS, PG_BOS, PG_IMAGE = 0, 1, 2, 154


def paligemma(gemma2: bool = False) -> Sample:
    """PaliGemma (Gemma text model); ``gemma2=True`` gives PaliGemma-2 (Gemma-2: logit softcapping, sliding layers)."""
    from transformers import AutoConfig

    text = dict(TEXT, vocab_size=160, pad_token_id=PG_PAD, eos_token_id=PG_EOS, bos_token_id=PG_BOS,
                model_type="gemma2" if gemma2 else "gemma")
    if gemma2:
        text.update(query_pre_attn_scalar=8, sliding_window=64, final_logit_softcapping=30.0,
                    attn_logit_softcapping=50.0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, projection_dim=32)
    cfg = AutoConfig.for_model("paligemma", text_config=text, vision_config=vision, image_token_index=PG_IMAGE,
                               projection_dim=32, hidden_size=32, vocab_size=160)
    model = _build(cfg, attn="eager" if gemma2 else "sdpa")  # Gemma-2 has no sdpa path (attention softcapping)
    ids = torch.tensor([PG_IMAGE] * 4 + [PG_BOS, W1, W2, W3, NL])
    inputs = dict(pixel_values=_pixels(1, 3, 28, 28), token_type_ids=torch.zeros(1, len(ids), dtype=torch.long))
    _gen(model, PG_EOS, PG_PAD)
    return Sample("paligemma2" if gemma2 else "paligemma", model, ids, inputs, (NL, 150), PG_EOS)


# --------------------------------------------------------------------------------------------------------------------
# Molmo2: <|endoftext|>(as bos)<|im_start|>user\n
#   <low_res_im_start>(<im_patch><im_patch><im_col>)*2<im_end><im_start>(<im_patch><im_patch><im_col>)*2<im_end>
#   w w w<|im_end|>\n<|im_start|>assistant\n
# crops of 56 px, 14 px patches (4 x 4 per crop), 2 x 2 pooling: low-res view 2 x 2 tokens + one high-res crop
# 2 x 2 tokens. mm_token_type_ids = 1 on every image token (patches, columns, starts, ends).
# Special tokens live in the extra vocabulary [vocab_size, vocab_size + additional_vocab_size): the embedding
# covers it, the LM head does not.
# --------------------------------------------------------------------------------------------------------------------
M_VOCAB, M_EXTRA = 160, 16
M_EOT, M_IM_START_CHAT, M_IM_END_CHAT = 150, 151, 152
M_START, M_END, M_PATCH, M_COL, M_LOW_START, M_LOW, M_FRAME_START, M_FRAME_END = (M_VOCAB + i for i in range(8))


def molmo2() -> Sample:
    from transformers import AutoConfig
    from transformers.models.molmo2.image_processing_molmo2 import arange_for_pooling

    crop, patch, pool = 56, 14, 2
    text = dict(TEXT, vocab_size=M_VOCAB, additional_vocab_size=M_EXTRA, pad_token_id=M_EOT, eos_token_id=M_EOT,
                bos_token_id=M_EOT, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, image_size=[crop, crop], patch_size=patch)
    adapter = dict(vision_feature_layer=[-1, 0], hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                   head_dim=16, intermediate_size=64, text_hidden_size=32)
    cfg = AutoConfig.for_model("molmo2", text_config=text, vision_config=vision, adapter_config=adapter,
                               image_start_token_id=M_START, low_res_image_start_token_id=M_LOW_START,
                               image_end_token_id=M_END, image_patch_id=M_PATCH, frame_start_token_id=M_FRAME_START,
                               frame_end_token_id=M_FRAME_END)
    model = _build(cfg)

    # what Molmo2ImageProcessor(size=56, patch_size=14, pooling_size=[2, 2], max_crops=1, overlap_margins=[0, 0])
    # returns for one image: the low-res view and one high-res crop, both 4 x 4 patches
    side = crop // patch
    grid = torch.arange(side * side, dtype=torch.int32).reshape(side, side)
    low, rh, rw = arange_for_pooling(grid, pool, pool)
    high, hh, hw = arange_for_pooling(grid, pool, pool)
    pooling = torch.cat([low, torch.where(high >= 0, high + side * side, -1)]).long()
    inputs = dict(pixel_values=_pixels(2, side * side, patch * patch * 3), image_token_pooling=pooling,
                  image_grids=torch.tensor([[rh, rw, hh, hw]]), image_num_crops=torch.tensor([2]))

    image = [M_LOW_START] + ([M_PATCH] * rw + [M_COL]) * rh + [M_END]
    image += [M_START] + ([M_PATCH] * hw + [M_COL]) * hh + [M_END]
    ids = torch.tensor([M_EOT, M_IM_START_CHAT, USER, NL] + image + [W1, W2, W3, M_IM_END_CHAT, NL, M_IM_START_CHAT,
                                                                  ASSISTANT, NL])
    image_tokens = torch.tensor([M_PATCH, M_COL, M_START, M_LOW_START, M_FRAME_START, M_END, M_FRAME_END, M_LOW])
    inputs["mm_token_type_ids"] = torch.isin(ids, image_tokens).long()[None]
    _gen(model, M_IM_END_CHAT, M_EOT)
    return Sample("molmo2", model, ids, inputs, (NL, M_EOT), M_IM_END_CHAT)


BUILDERS: dict[str, Callable[[], Sample]] = {
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
    "qwen3_vl": qwen3_vl,
    "glm4v": glm4v,
    "gemma3": gemma3,
    "paligemma": paligemma,
    "molmo2": molmo2,
}
