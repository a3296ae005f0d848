"""Tiny random vision-language models (SmolVLM, Idefics3, LFM2-VL, Mllama, Ovis2) with one processed prompt each.

Every builder makes a word-level tokenizer holding the family's special tokens, runs the family's own image processor
on a small deterministic noise image and expands the image placeholder the way the family's processor does (the
processor itself for Idefics3, LFM2-VL, Mllama and Ovis2; SmolVLM's processor needs ``num2words``, so its prompt
string is built with the processor module's own ``get_image_prompt_string``). Models are built from configs with
random weights (``torch.manual_seed(0)``, float64, eval, SDPA attention). No downloads.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

from ._sample import Sample  # the type every builder returns

# Every tokenizer: the family's special tokens (ids 0..n-1), then ordinary words and fillers up to VOCAB ids
# (Mllama's <|image|> comes after, at id VOCAB, outside its LM head, as in Llama-3.2-Vision).
VOCAB = 160
_WORDS = ("User Assistant user assistant system You are a helpful : the image shows red green blue circle square "
          "background is white and it . , ? Describe What").split()
_ASK = "Describe the image ."


def _tokenizer(specials: list[str], after: tuple[str, ...] = (), **roles):
    """A word-level fast tokenizer: ``specials`` then words/fillers up to ``VOCAB`` ids, then ``after``. Every special
    is an added special token (never split); ``"\\n"`` is an added ordinary token, so newlines keep an id.
    ``roles``: bos_token / eos_token / pad_token / unk_token (strings among ``specials``)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(specials)}
    for w in ("\n", *_WORDS):
        vocab.setdefault(w, len(vocab))
    i = 0
    while len(vocab) < VOCAB:
        vocab.setdefault(f"w{i}", len(vocab))
        i += 1
    for t in after:
        vocab[t] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=roles.get("unk_token", "<unk>")))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = [t for t in (*specials, *after) if t not in roles.values() and t != "\n"]
    out = PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens=extra, **roles)
    out.add_tokens([AddedToken("\n", normalized=False, special=False)])
    assert len(out) == VOCAB + len(after), len(out)
    return out


def _image(height: int, width: int):
    """A deterministic RGB noise image of ``height`` x ``width`` pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _text_config(tok, **extra) -> dict:
    """The tiny decoder: 2 layers, 32 wide, 4 heads of 8, 2 KV heads, ``VOCAB`` tokens; special ids from ``tok``."""
    ids = {f"{r}_id": getattr(tok, f"{r}_id") for r in ("bos_token", "eos_token", "pad_token")}
    cfg = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=512, tie_word_embeddings=False, **ids)
    cfg.update(extra)
    return cfg


def _build(model_cls, cfg) -> "PreTrainedModel":
    torch.manual_seed(0)
    return model_cls._from_config(cfg, attn_implementation="sdpa").double().eval()


def _finish(name: str, model, tok, ids, inputs: dict, eos_token: str) -> Sample:
    """Drop input_ids/attention_mask (and what the model does not take), float tensors to float64, set eos/pad."""
    ids = torch.as_tensor(ids).reshape(-1).long()
    inputs = {k: (torch.as_tensor(v).double() if torch.as_tensor(v).is_floating_point() else torch.as_tensor(v))
              for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    eos = tok.convert_tokens_to_ids(eos_token)
    n_special = min(tok.convert_tokens_to_ids(w) for w in _WORDS)
    for cfg in (model.generation_config, model.config.get_text_config(decoder=True)):
        cfg.eos_token_id = eos
        cfg.pad_token_id = tok.pad_token_id
    return Sample(name, model, ids, inputs, (n_special, VOCAB), eos)


# ------------------------------------------------------------------------------------------------ SmolVLM, Idefics3
# SigLIP-like tower (patch-attention-masked), pixel-shuffle connector (scale 2), Llama decoder at model.text_model.
# Prompt (Idefics3/SmolVLM chat template): <bos>User:<image>Describe the image .<end_of_utterance>\nAssistant:

_IDEFICS_ROWCOL = [f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)]


def smolvlm() -> Sample:
    """SmolVLM: 16x32 image split into 1x2 crops of 16 px + the global image (pixel_values (1, 3, 3, 16, 16)),
    4 px patches -> 16 patches -> 4 tokens per crop after the pixel shuffle: 12 <image> tokens, wrapped as
    <fake><row_1_col_1><image>*4<fake><row_1_col_2><image>*4\\n\\n<fake><global-img><image>*4<fake>."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_smolvlm import SmolVLMImageProcessor
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    tok = _tokenizer(["<unk>", "<|im_start|>", "<end_of_utterance>", "<|im_end|>", "<fake_token_around_image>",
                      "<image>", "<global-img>", *_IDEFICS_ROWCOL],
                     bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|im_end|>",
                     unk_token="<unk>")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16,
                  patch_size=4)
    cfg = SmolVLMConfig(vision_config=vision, text_config=_text_config(tok, model_type="llama"), scale_factor=2,
                        image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
    model = _build(SmolVLMForConditionalGeneration, cfg)
    image_seq_len = (16 // 4) ** 2 // 2**2
    ip = SmolVLMImageProcessor(do_image_splitting=True, size={"longest_edge": 32}, max_image_size={"longest_edge": 16})
    enc = ip(_image(16, 32), return_tensors="pt", return_row_col_info=True)
    # what SmolVLMProcessor.replace_image_token does (its __init__ needs num2words)
    placeholder = get_image_prompt_string(enc.pop("rows")[0][0], enc.pop("cols")[0][0], image_seq_len,
                                          fake_token_around_image="<fake_token_around_image>",
                                          image_token="<image>", global_image_token="<global-img>")
    text = f"<|im_start|>User:{placeholder}{_ASK}<end_of_utterance>\nAssistant:"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return _finish("smolvlm", model, tok, ids, dict(enc), "<end_of_utterance>")


def idefics3() -> Sample:
    """Idefics3: a 12x16 image, not split (resized to the 16 px square: pixel_values (1, 1, 3, 16, 16)), 2 px
    patches -> 64 patches -> 16 tokens after the pixel shuffle, wrapped as <fake><global-img><image>*16<fake>
    (Idefics3Processor)."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_idefics3 import Idefics3ImageProcessor

    tok = _tokenizer(["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                      "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *_IDEFICS_ROWCOL],
                     bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<|finetune_right_pad_id|>",
                     unk_token="<unk>")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16,
                  patch_size=2)
    cfg = Idefics3Config(vision_config=vision, text_config=_text_config(tok, model_type="llama"), scale_factor=2,
                         image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
    model = _build(Idefics3ForConditionalGeneration, cfg)
    ip = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 16}, max_image_size={"longest_edge": 16})
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=(16 // 2) ** 2 // 2**2)
    text = f"<|begin_of_text|>User:<image>{_ASK}<end_of_utterance>\nAssistant:"
    enc = proc(images=[[_image(12, 16)]], text=[text], return_tensors="pt", add_special_tokens=False)
    return _finish("idefics3", model, tok, enc["input_ids"][0], dict(enc), "<end_of_utterance>")


# ------------------------------------------------------------------------------------------------------------ LFM2-VL


def lfm2_vl() -> Sample:
    """LFM2-VL: SigLIP2 (NaFlex) tower with 4 px patches, pixel-unshuffle projector (factor 2), LFM2 hybrid decoder
    (layer 0 short convolution, layer 1 full attention). A 32x64 image -> 2 tiles of 16 px (4 tokens each) and a
    16x32 thumbnail (8 tokens): pixel_values (3, 32, 48) patch rows padded to 32, pixel_attention_mask (3, 32),
    spatial_shapes [[4, 4], [4, 4], [4, 8]]; 16 <image> tokens, wrapped as
    <|image_start|><|img_row_1_col_1|><image>*4<|img_row_1_col_2|><image>*4<|img_thumbnail|><image>*8<|image_end|>."""
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration, Lfm2VlProcessor
    from transformers.models.lfm2_vl.image_processing_lfm2_vl import Lfm2VlImageProcessor

    tok = _tokenizer(["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>",
                      "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>",
                      *[f"<|img_row_{r}_col_{c}|>" for r in (1, 2) for c in (1, 2)]],
                     bos_token="<|startoftext|>", eos_token="<|im_end|>", pad_token="<|pad|>", unk_token="<unk>")
    text_cfg = _text_config(tok, model_type="lfm2", layer_types=["conv", "full_attention"], conv_L_cache=3,
                            block_auto_adjust_ff_dim=False, tie_word_embeddings=True)
    text_cfg.pop("head_dim")
    vision = dict(model_type="siglip2_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, patch_size=4, num_patches=16, vision_use_head=False)
    cfg = Lfm2VlConfig(vision_config=vision, text_config=text_cfg, image_token_id=tok.convert_tokens_to_ids("<image>"),
                       projector_hidden_size=64, downsample_factor=2, tie_word_embeddings=True)
    model = _build(Lfm2VlForConditionalGeneration, cfg)
    ip = Lfm2VlImageProcessor(encoder_patch_size=4, downsample_factor=2, tile_size=16, min_image_tokens=2,
                              max_image_tokens=8, min_tiles=2, max_tiles=4, size={"height": 16, "width": 16})
    proc = Lfm2VlProcessor(image_processor=ip, tokenizer=tok)
    text = f"<|startoftext|><|im_start|>user\n<image>{_ASK}<|im_end|>\n<|im_start|>assistant\n"
    enc = proc(images=[[_image(32, 64)]], text=[text], return_tensors="pt")
    return _finish("lfm2_vl", model, tok, enc["input_ids"][0], dict(enc), "<|im_end|>")


# ------------------------------------------------------------------------------------------------------------- Mllama


def mllama() -> Sample:
    """Mllama (Llama-3.2-Vision): decoder layer 0 self-attention, layer 1 cross-attention (its tanh gates set to 0.5,
    they init at 0, which would cut the image off). Vision: 8 px tiles, 4 px patches (4 + CLS = 5 tokens per tile),
    max 2 tiles, aspect ratios [[1, 1], [1, 2], [2, 1]]; a 8x16 image -> 2 tiles, aspect_ratio_ids [[2]],
    pixel_values (1, 1, 2, 3, 8, 8), cross_attention_mask (1, P, 1, 2) int64: 1 from the <|image|> token on.
    One <|image|> token (id VOCAB = vocab_size, in the embedding's 8 extra rows, not in the LM head)."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor

    tok = _tokenizer(["<|finetune_right_pad_id|>", "<|begin_of_text|>", "<|end_of_text|>", "<unk>",
                      "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"],
                     after=("<|image|>",), bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                     pad_token="<|finetune_right_pad_id|>", unk_token="<unk>")
    text_cfg = _text_config(tok, cross_attention_layers=[1])
    text_cfg.pop("head_dim")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_global_layers=1, attention_heads=4,
                  image_size=8, patch_size=4, max_num_tiles=2, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
                  intermediate_layers_indices=[0], vision_output_dim=64)
    cfg = MllamaConfig(vision_config=vision, text_config=text_cfg,
                       image_token_index=tok.convert_tokens_to_ids("<|image|>"))
    model = _build(MllamaForConditionalGeneration, cfg)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(0.5)
                layer.cross_attn_mlp_gate.fill_(0.5)
    proc = MllamaProcessor(image_processor=MllamaImageProcessor(size={"height": 8, "width": 8}, max_image_tiles=2),
                           tokenizer=tok)
    text = (f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>{_ASK}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    enc = proc(images=[[_image(8, 16)]], text=[text], return_tensors="pt", add_special_tokens=False)
    return _finish("mllama", model, tok, enc["input_ids"][0], dict(enc), "<|eot_id|>")


# -------------------------------------------------------------------------------------------------------------- Ovis2


def ovis2() -> Sample:
    """Ovis2: AIMv2-like tower (16 px tiles, 4 px patches, hidden_stride 2 -> 4 tokens per tile), visual-vocabulary
    head (softmax over 32 visual words, 5 of them the indicator tokens) and embedding table, Qwen2 decoder.
    A 32x16 image is cropped to the global image + a grid [1, 2] of tiles (pixel_values (3, 3, 16, 16)):
    <IMG_START><IMG_ATOM>*4<IMG_GRID><IMG_ATOM>*4<IMG_COL><IMG_ATOM>*4<IMG_END> (Ovis2Processor). The <IMG_*>
    indicator tokens' embeddings are replaced by the visual table's last 5 rows."""
    from transformers import Ovis2Config, Ovis2ForConditionalGeneration, Ovis2Processor
    from transformers.models.ovis2.image_processing_ovis2 import Ovis2ImageProcessor

    indicators = ["<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>"]
    tok = _tokenizer(["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>", "<IMG_ATOM>", *indicators],
                     eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>")
    text_cfg = _text_config(tok, model_type="qwen2", tie_word_embeddings=True)
    text_cfg.pop("head_dim")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16,
                  patch_size=4, hidden_stride=2, vocab_size=32, num_visual_indicator_tokens=5)
    cfg = Ovis2Config(vision_config=vision, text_config=text_cfg, vocab_size=VOCAB, hidden_size=32,
                      image_token_id=tok.convert_tokens_to_ids("<IMG_ATOM>"),
                      visual_indicator_token_ids=[tok.convert_tokens_to_ids(t) for t in indicators])
    model = _build(Ovis2ForConditionalGeneration, cfg)
    ip = Ovis2ImageProcessor(size={"height": 16, "width": 16}, crop_to_patches=True, min_patches=1, max_patches=2)
    proc = Ovis2Processor(image_processor=ip, tokenizer=tok, image_seq_length=4)
    text = (f"<|im_start|>system\nYou are a helpful assistant .<|im_end|>\n<|im_start|>user\n<image>\n{_ASK}"
            "<|im_end|>\n<|im_start|>assistant\n")
    enc = proc(images=[[_image(32, 16)]], text=[text], return_tensors="pt")
    return _finish("ovis2", model, tok, enc["input_ids"][0], dict(enc), "<|im_end|>")


BUILDERS: dict[str, Callable[[], Sample]] = {
    "smolvlm": smolvlm,
    "idefics3": idefics3,
    "lfm2_vl": lfm2_vl,
    "mllama": mllama,
    "ovis2": ovis2,
}
