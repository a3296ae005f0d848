"""Tiny random LLaVA / Llama models built from configs, with a word-level tokenizer trained here."""
from __future__ import annotations

import torch

from ..hardness import _fixtures as fx

WORDS = ("the a an image shows red green blue yellow circle square triangle background is white and it "
         "centered there are of them yes no this picture has two three four on left right top . , ?")


def tokenizer():
    tok = fx.word_tokenizer([WORDS, WORDS.upper(), WORDS.title(), "USER ASSISTANT : Describe"], vocab_size=400,
                            bos="<s>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def llava(tok, dtype=torch.float64, attn="sdpa", seed=0):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn).to(dtype).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def prompt_ids(tok, prompt: str, n_image: int = 16) -> torch.Tensor:
    ids = tok("USER :", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<image>")] * n_image
    ids += tok(prompt + " ASSISTANT :", add_special_tokens=False)["input_ids"]
    return torch.tensor([tok.bos_token_id] + ids)


def pixels(colour: str, shape: str, dtype=torch.float64) -> torch.Tensor:
    import io

    import numpy as np
    from PIL import Image

    img = Image.open(io.BytesIO(fx.shape_png(colour, shape, 32))).convert("RGB")
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).to(dtype) / 255
    return ((x - 0.5) / 0.25)[None]


def save_llava(dir, tok, dtype=torch.float32) -> str:
    """A tiny LLaVA with its processor (CLIP image processor + the word tokenizer) saved to ``dir``."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    llava(tok, dtype).save_pretrained(dir)
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                   tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, image_token="<image>").save_pretrained(dir)
    return str(dir)


def save_sentence_model(dir) -> str:
    """A tiny random sentence-transformers model (BERT from config + mean pooling) saved to ``dir``."""
    from transformers import BertConfig, BertModel

    tok = tokenizer()
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(dir)
    tok.save_pretrained(dir)
    return str(dir)
