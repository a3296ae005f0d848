"""Small synthetic preference data for the pipeline tests: PNG images of coloured shapes, records in the
canonical and the RLAIF-V / POVID / VLFeedback layouts, and tiny random CLIP models (open_clip from a
config file, Hugging Face CLIPModel from a config with a locally trained tokenizer). No downloads."""
from __future__ import annotations

import io
import json
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")


def shape_png(colour: str, shape: str, size: int = 48) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    box = (size // 6, size // 6, size - size // 6, size - size // 6)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(size // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


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
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    path = dir / "TinyCLIP-mmalign-test.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def word_tokenizer(texts: list[str], vocab_size: int = 200, bos: str | None = None):
    """A word-level tokenizer trained here (a PreTrainedTokenizerFast with pad/unk/eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<pad>", "<unk>", "<eos>"] + ([bos] if bos else [])
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=special))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                   **({"bos_token": bos} if bos else {}))


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
