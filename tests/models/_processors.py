"""Real Hugging Face processors and tiny random models of five VLM families, built offline.

Each ``save_<family>(dir, words)`` trains a word-level tokenizer on ``words`` (plus the words of the
family's chat template) carrying the family's special tokens, builds the family's own processor (its image
processor, video processor where the processor requires one, and a small chat template in the family's
style) and a tiny random model (``torch.manual_seed(0)``, float32, 2 decoder layers, hidden 32, 1 vision
layer) whose config agrees with the processor (image token ids, image tokens per image, patch sizes), saves
both to ``dir`` and returns ``str(dir)``: ``AutoProcessor.from_pretrained(dir)`` and
``AutoModelForImageTextToText.from_pretrained(dir)`` load them. With a 48x48 image:

========================  =====================================================================
family                    image tokens in ``input_ids`` (48x48 image; 40x56 where it differs)
========================  =====================================================================
``qwen2_5_vl``            9 ``<|image_pad|>`` (grid 1x6x6, 8 px patches, 2x2 merge); 40x56: 8 (1x8x4)
``qwen3_vl``              9 ``<|image_pad|>`` (same grid); 40x56: 8
``gemma3``                4 ``<image_soft_token>`` (32 px, 8 px patches pooled 2x2)
``smolvlm``               20 ``<image>``: 2x2 tiles of 32 px + a global image, 4 tokens each
``llava_onevision``       88 ``<image>`` (AnyRes 2x2 grid of 32 px tiles + base, newlines); 40x56: 72
========================  =====================================================================

The models' generation configs suppress the image/video markup tokens. ``SmolVLMProcessor`` needs the
``num2words`` package (in the test extra).
"""
from __future__ import annotations

import torch

HIDDEN = 32
TEXT = dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def _tokenizer(words: list[str], template_words: str, specials: list[str], named: dict[str, str] | None = None,
               **roles):
    """A word-level ``PreTrainedTokenizerFast`` trained on ``words`` and ``template_words``. ``specials``
    become special (never split) tokens with the first ids; ``named`` model-specific ones (``image_token``,
    ``boi_token`` ...) are also attributes of the tokenizer (``tok.image_token``, ``tok.image_token_id``) and
    are saved in its config; ``roles`` are pad/unk/eos/bos tokens (all in ``specials``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(specials))
    texts = list(words) + [template_words]
    tok = Tokenizer(models.WordLevel(unk_token=roles.get("unk_token", "<unk>")))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=100_000, special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens=dict(named or {}), **roles)


def _ids(tok, *tokens: str) -> list[int]:
    ids = tok.convert_tokens_to_ids(list(tokens))
    assert tok.unk_token_id not in ids or "<unk>" in tokens, (tokens, ids)
    return ids


def _finish(model, processor, tok, dir, placeholders: list[str]) -> str:
    """Generation settings (eos, pad, bos; ``placeholders``, the image/video markup tokens, suppressed: a
    random model that generated an image token would break the next forward over prompt + completion with
    the same pixels), then the model and the processor saved to ``dir``."""
    model.generation_config.suppress_tokens = _ids(tok, *placeholders)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    if tok.bos_token_id is not None:
        model.generation_config.bos_token_id = tok.bos_token_id
    model.eval().save_pretrained(dir)
    processor.save_pretrained(dir)
    return str(dir)


# ---------------------------------------------------------------------------------------------- Qwen-VL
QWEN_SPECIALS = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
QWEN_NAMED = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
QWEN_ROLES = dict(pad_token="<|endoftext|>", unk_token="<unk>", eos_token="<|im_end|>")

# Qwen2.5-VL's template (default system prompt, vision_start/image_pad/vision_end per image), trimmed
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen3-VL's: the same turns, no default system prompt
QWEN3_VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# 8 px patches merged 2x2: 16 px per image token; 32x32 to 64x64 pixels, so a 48x48 image is a 6x6 grid
# of patches, 9 tokens, and a 40x56 one (w x h) 8x4 patches, 8 tokens
QWEN_VISION = dict(patch_size=8, merge_size=2, temporal_patch_size=2)
QWEN_PIXELS = dict(min_pixels=32 * 32, max_pixels=64 * 64)


def _qwen_parts(words, system: str = ""):
    """The Qwen tokenizer (ChatML turns, vision markup tokens) and ``Qwen2VLImageProcessor``."""
    from transformers import Qwen2VLImageProcessor

    tok = _tokenizer(words, "system user assistant " + system, QWEN_SPECIALS, QWEN_NAMED, **QWEN_ROLES)
    image_processor = Qwen2VLImageProcessor(**QWEN_VISION, **QWEN_PIXELS)
    return tok, image_processor


def qwen2_5_vl_parts(words: list[str], *, text: dict | None = None, vision: dict | None = None,
                     image: dict | None = None):
    """(processor, config) of :func:`save_qwen2_5_vl`: ``text`` and ``vision`` update the tiny configs, ``image``
    the image processor's patch and pixel settings (the trainers benchmark takes Qwen2.5-VL-3B's widths)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tok, image_processor = _qwen_parts(words, "You are a helpful assistant .")
    pixels = {**QWEN_VISION, **QWEN_PIXELS, **(image or {})}
    if image:
        image_processor = Qwen2VLImageProcessor(**pixels)
    video_processor = Qwen2VLVideoProcessor(**{k: pixels[k] for k in QWEN_VISION}, min_pixels=32 * 32,
                                            max_pixels=64 * 64 * 4)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                                    chat_template=QWEN2_5_VL_CHAT_TEMPLATE)
    image_id, video, start, end = _ids(tok, *[QWEN_NAMED[k] for k in ("image_token", "video_token",
                                                                     "vision_start_token", "vision_end_token")])
    text_cfg = dict(**TEXT, vocab_size=len(tok), rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                  "mrope_section": [2, 1, 1]},
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    text_cfg.update(text or {})
    vision_cfg = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text_cfg["hidden_size"],
                      patch_size=pixels["patch_size"], spatial_merge_size=pixels["merge_size"],
                      temporal_patch_size=pixels["temporal_patch_size"], window_size=32, fullatt_block_indexes=[0])
    vision_cfg.update(vision or {})
    cfg = Qwen2_5_VLConfig(text_config=text_cfg, vision_config=vision_cfg, image_token_id=image_id,
                           video_token_id=video, vision_start_token_id=start, vision_end_token_id=end)
    return processor, cfg


def save_qwen2_5_vl(dir, words: list[str]) -> str:
    """``Qwen2_5_VLProcessor`` (``Qwen2VLImageProcessor``: dynamic resolution, ``image_grid_thw``,
    ``mm_token_type_ids``) and a tiny ``Qwen2_5_VLForConditionalGeneration``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor, cfg = qwen2_5_vl_parts(words)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    return _finish(model, processor, processor.tokenizer, dir, list(QWEN_NAMED.values()))


def save_qwen3_vl(dir, words: list[str]) -> str:
    """``Qwen3VLProcessor`` (``Qwen2VLImageProcessor``) and a tiny ``Qwen3VLForConditionalGeneration``
    (DeepStack on its one vision layer, interleaved M-RoPE)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor

    tok, image_processor = _qwen_parts(words)
    video_processor = Qwen3VLVideoProcessor(**QWEN_VISION, size={"shortest_edge": 32 * 32,
                                                                 "longest_edge": 64 * 64 * 4})
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                                 chat_template=QWEN3_VL_CHAT_TEMPLATE)
    image, video, start, end = _ids(tok, *[QWEN_NAMED[k] for k in ("image_token", "video_token",
                                                                  "vision_start_token", "vision_end_token")])
    cfg = Qwen3VLConfig(
        text_config=dict(**TEXT, head_dim=HIDDEN // TEXT["num_attention_heads"], vocab_size=len(tok),
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                          "mrope_interleaved": True},
                         pad_token_id=tok.pad_token_id),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN,
                           patch_size=QWEN_VISION["patch_size"], spatial_merge_size=QWEN_VISION["merge_size"],
                           temporal_patch_size=QWEN_VISION["temporal_patch_size"], num_position_embeddings=64,
                           deepstack_visual_indexes=[0]),
        image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end)
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    return _finish(model, processor, tok, dir, list(QWEN_NAMED.values()))


# ---------------------------------------------------------------------------------------------- Gemma-3
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<start_of_image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
GEMMA3_IMAGE = dict(image_size=32, patch_size=8, mm_tokens_per_image=4)  # 4x4 patches pooled to 2x2


def save_gemma3(dir, words: list[str]) -> str:
    """``Gemma3Processor`` (``Gemma3ImageProcessor``, 32 px, 4 image tokens per image, ``token_type_ids``)
    and a tiny ``Gemma3ForConditionalGeneration`` (SigLIP tower)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = _tokenizer(words, "user model", ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                                           *named.values()], named,
                     pad_token="<pad>", eos_token="<end_of_turn>", bos_token="<bos>", unk_token="<unk>")
    side = GEMMA3_IMAGE["image_size"]
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": side, "width": side}), tokenizer=tok,
        image_seq_length=GEMMA3_IMAGE["mm_tokens_per_image"], chat_template=GEMMA3_CHAT_TEMPLATE)
    boi, eoi, image = _ids(tok, *named.values())
    head_dim = HIDDEN // TEXT["num_attention_heads"]
    cfg = Gemma3Config(
        text_config=dict(**TEXT, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=512,
                         layer_types=["sliding_attention", "full_attention"], vocab_size=len(tok),
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id),
        vision_config=dict(model_type="siglip_vision_model", **VISION, image_size=side,
                           patch_size=GEMMA3_IMAGE["patch_size"], vision_use_head=False),
        mm_tokens_per_image=GEMMA3_IMAGE["mm_tokens_per_image"], boi_token_index=boi, eoi_token_index=eoi,
        image_token_index=image)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # Gemma-3 initialises its projector to zeros: images would be all-zero embeddings
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.02)
    return _finish(model, processor, tok, dir, list(named.values()))


# ---------------------------------------------------------------------------------------------- SmolVLM
SMOLVLM_CHAT_TEMPLATE = (  # SmolVLM's own template, images and text only
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}"
    "{% if m['content'] is string %}{{ ': ' + m['content'] }}{% else %}"
    "{% if m['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% elif c['type'] == 'image' %}<image>"
    "{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
# images resized to a 64 px longest edge, split into 32 px tiles (2x2 for a 48x48 image) + a 32 px global
# image; 8 px patches (4x4 per tile) pixel-shuffled by 2: 4 <image> tokens per tile
SMOLVLM_IMAGE = dict(longest_edge=64, tile=32, patch_size=8, scale_factor=2)
SMOLVLM_GRID = 4  # <row_i_col_j> tokens for i, j <= this


def save_smolvlm(dir, words: list[str]) -> str:
    """``SmolVLMProcessor`` with image splitting on (tiles + a global image) and a tiny
    ``SmolVLMForConditionalGeneration`` (Idefics3-style vision tower, pixel-shuffle connector, Llama)."""
    from transformers import (SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessor,
                              SmolVLMProcessor, SmolVLMVideoProcessor)

    named = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
             "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>",
             "video_token": "<video>"}
    grid = [f"<row_{i}_col_{j}>" for i in range(1, SMOLVLM_GRID + 1) for j in range(1, SMOLVLM_GRID + 1)]
    tok = _tokenizer(words, "User Assistant System :",
                     ["<|endoftext|>", "<unk>", "<|im_start|>", *named.values(), *grid], named,
                     pad_token="<|endoftext|>", unk_token="<unk>", eos_token="<end_of_utterance>",
                     bos_token="<|im_start|>")
    s = SMOLVLM_IMAGE
    image_seq_len = (s["tile"] // s["patch_size"]) ** 2 // s["scale_factor"] ** 2
    image_processor = SmolVLMImageProcessor(size={"longest_edge": s["longest_edge"]}, do_image_splitting=True,
                                            max_image_size={"longest_edge": s["tile"]})
    video_processor = SmolVLMVideoProcessor(size={"longest_edge": s["tile"]},
                                            max_image_size={"longest_edge": s["tile"]})
    processor = SmolVLMProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                                 image_seq_len=image_seq_len, chat_template=SMOLVLM_CHAT_TEMPLATE)
    cfg = SmolVLMConfig(
        text_config=dict(model_type="llama", **TEXT, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id),
        vision_config=dict(**VISION, image_size=s["tile"], patch_size=s["patch_size"]),
        scale_factor=s["scale_factor"], image_token_id=_ids(tok, "<image>")[0], pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = SmolVLMForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    return _finish(model, processor, tok, dir, [*named.values(), *grid])


# ------------------------------------------------------------------------------------- LLaVA-OneVision
LLAVA_ONEVISION_CHAT_TEMPLATE = (  # LLaVA-OneVision's (Qwen2 turns, images first in a turn), trimmed
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# 32 px base image and AnyRes tiles of 32 px (grids up to 2x2), 8 px patches: 16 tokens a tile
LLAVA_ONEVISION_IMAGE = dict(image_size=32, patch_size=8, pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]])


def save_llava_onevision(dir, words: list[str]) -> str:
    """``LlavaOnevisionProcessor`` (AnyRes grid pinpoints, ``image_sizes``) and a tiny
    ``LlavaOnevisionForConditionalGeneration`` (SigLIP tower, Qwen2 decoder)."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor)

    named = {"image_token": "<image>", "video_token": "<video>"}
    tok = _tokenizer(words, "system user assistant",
                     ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", *named.values()], named,
                     pad_token="<|endoftext|>", unk_token="<unk>", eos_token="<|im_end|>")
    s = LLAVA_ONEVISION_IMAGE
    side = s["image_size"]
    image_processor = LlavaOnevisionImageProcessor(size={"height": side, "width": side},
                                                   image_grid_pinpoints=s["pinpoints"])
    video_processor = LlavaOnevisionVideoProcessor(size={"height": side, "width": side})
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
        num_image_tokens=(side // s["patch_size"]) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE)
    image, video = _ids(tok, *named.values())
    cfg = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **TEXT, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None),
        vision_config=dict(model_type="siglip_vision_model", **VISION, image_size=side, patch_size=s["patch_size"],
                           vision_use_head=False),
        image_token_index=image, video_token_index=video, vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=s["pinpoints"], vision_aspect_ratio="anyres_max_9")
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    return _finish(model, processor, tok, dir, list(named.values()))


SAVERS = {"qwen2_5_vl": save_qwen2_5_vl, "qwen3_vl": save_qwen3_vl, "gemma3": save_gemma3,
          "smolvlm": save_smolvlm, "llava_onevision": save_llava_onevision}
