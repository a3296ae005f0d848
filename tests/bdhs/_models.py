"""Tiny random LLaVA / Llama models built from configs, with a word-level tokenizer trained here."""
from __future__ import annotations

import torch

from mmalign import synthetic

from ..hardness import _fixtures as fx

WORDS = ("the a an image shows red green blue yellow circle square triangle background is white and it "
         "centered there are of them yes no this picture has two three four on left right top . , ?")


def tokenizer():
    return synthetic.word_tokenizer([WORDS, "USER ASSISTANT : Describe"], vocab_size=400)


def llava(tok, dtype=torch.float64, attn="sdpa", seed=0):
    return synthetic.tiny_llava(tok, dtype=dtype, attn=attn, seed=seed)


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
    return synthetic.save_tiny_llava(dir, tok, dtype=dtype)


def save_sentence_model(dir) -> str:
    """A tiny random sentence-transformers model (BERT from config + mean pooling) saved to ``dir``."""
    return synthetic.save_tiny_sentence_model(dir, [WORDS])


def causal_lm(kind: str, vocab_size: int, dtype=torch.float64, **config):
    """A tiny random causal LM of any transformers model type (2 layers, 32 wide, seed 0), built from its config
    with ``config`` added (token ids, a logit transform, MoE sizes); ValueError for a type transformers lacks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(kind, vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, **config)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).to(dtype)
