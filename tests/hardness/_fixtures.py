"""Small synthetic preference data for the pipeline tests: PNG images of coloured shapes, records in the
canonical and the RLAIF-V / POVID / VLFeedback layouts, and tiny random CLIP models (open_clip from a
config file, Hugging Face CLIPModel from a config with a locally trained tokenizer). No downloads."""
from __future__ import annotations

import json
from pathlib import Path

from mmalign import synthetic

COLOURS, SHAPES = synthetic.COLOURS, synthetic.SHAPES


def shape_png(colour: str, shape: str, size: int = 48) -> bytes:
    return synthetic.png(colour, shape, 1, size)


def pairs(n: int) -> list[dict]:
    """n canonical records: chosen describes the image, rejected gets the colour or the shape wrong."""
    colours, out = list(COLOURS), []
    for i in range(n):
        colour, shape = colours[i % len(colours)], SHAPES[i % len(SHAPES)]
        wrong = colours[(i + 1) % len(colours)]
        out.append({
            "id": f"pair-{i}", "image": f"{colour}_{shape}.png", "prompt": "Describe the image.",
            "chosen": f"The image shows a {colour} {shape}. The background is white, and the {shape} is centered.",
            "rejected": f"The image shows a {wrong} {shape}; there are {i % 3 + 2} of them.",
        })
    return out


def write_images(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for colour in COLOURS:
        for shape in SHAPES:
            (root / f"{colour}_{shape}.png").write_bytes(shape_png(colour, shape))
    return root


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def open_clip_config(dir: Path) -> str:
    """A tiny open_clip model config file (random weights, ~3M parameters, 32-pixel images)."""
    return synthetic.tiny_open_clip_config(dir)


def word_tokenizer(texts: list[str], vocab_size: int = 200, bos: str | None = None):
    """A word-level tokenizer trained here (a PreTrainedTokenizerFast with pad/unk/eos)."""
    return synthetic.word_tokenizer(texts, vocab_size=vocab_size, bos=bos, image_token=None)


def hf_clip_dir(dir: Path) -> str:
    """A tiny Hugging Face CLIPModel + image processor + tokenizer saved to ``dir``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    texts = [r["chosen"] + " " + r["rejected"] for r in pairs(12)]
    tokenizer = word_tokenizer(texts)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=len(tokenizer), max_position_embeddings=24, pad_token_id=0,
                         bos_token_id=None, eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(dir)
    tokenizer.save_pretrained(dir)
    return str(dir)
