"""Synthetic preference data and tiny random models, for the end-to-end demo and the tests (no downloads).

Images are coloured shapes on white; the chosen caption is right; the rejected one is wrong in all three
attributes (colour, shape and count: an *easy* pair) or in one of them (a *hard* pair). Models are
built from configs with random weights: a word-level tokenizer trained on the captions, a tiny LLaVA
with its processor, a tiny sentence-transformers model, and a tiny open_clip config.
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import torch

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
COUNTS = {1: "one", 2: "two", 3: "three"}


def draw(colour: str, shape: str, count: int = 1, size: int = 48):
    """A PIL image: ``count`` shapes of one colour side by side on white."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (250, 250, 250))
    d = ImageDraw.Draw(img)
    cell = size // count
    for i in range(count):
        x0, y0 = i * cell + cell // 6, size // 2 - cell // 3 if count > 1 else size // 6
        x1, y1 = (i + 1) * cell - cell // 6, size // 2 + cell // 3 if count > 1 else size - size // 6
        fill = COLOURS[colour]
        if shape == "circle":
            d.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            d.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            d.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img


def png(colour: str, shape: str, count: int = 1, size: int = 48) -> bytes:
    buf = io.BytesIO()
    draw(colour, shape, count, size).save(buf, format="PNG")
    return buf.getvalue()


def caption(colour: str, shape: str, count: int) -> str:
    noun = shape if count == 1 else shape + "s"
    return f"The image shows {COUNTS[count]} {colour} {noun}. The background is white."


def make_pairs(n: int, images: Path, seed: int = 0) -> list[dict]:
    """``n`` canonical records (half easy, half hard) and their PNGs written under ``images``."""
    rng = random.Random(seed)
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour, shape, count = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(COUNTS))
        hard = i % 2 == 1
        wrong = {"colour": rng.choice([c for c in COLOURS if c != colour]),
                 "shape": rng.choice([s for s in SHAPES if s != shape]),
                 "count": rng.choice([c for c in COUNTS if c != count])}
        if hard:
            keep = {"colour": colour, "shape": shape, "count": count}
            which = rng.choice(list(wrong))
            keep[which] = wrong[which]
            wrong = keep
        name = f"{colour}_{shape}_{count}.png"
        if not (images / name).exists():
            (images / name).write_bytes(png(colour, shape, count))
        rows.append({"id": f"pair-{i}", "image": name, "prompt": "Describe the image.",
                     "chosen": caption(colour, shape, count),
                     "rejected": caption(wrong["colour"], wrong["shape"], wrong["count"]),
                     "difficulty": "hard" if hard else "easy"})
    return rows


def vocabulary() -> list[str]:
    words = [caption(c, s, n) for c in COLOURS for s in SHAPES for n in COUNTS]
    return words + ["USER : Describe the image . ASSISTANT :", "yes no , ; and it there is are a of this picture",
                    "Is there a circle square triangle in the image ? Yes . No ."]


def word_tokenizer(texts: list[str] | None = None, vocab_size: int = 400, bos: str | None = "<s>",
                   image_token: str | None = "<image>"):
    """A word-level ``PreTrainedTokenizerFast`` trained here, with pad/unk/eos (and bos, image) tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts if texts is not None else vocabulary()
    texts = texts + [t.upper() for t in texts] + [t.title() for t in texts]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<pad>", "<unk>", "<eos>"] + ([bos] if bos else [])
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=special))
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                  **({"bos_token": bos} if bos else {}))
    if image_token:
        out.add_special_tokens({"additional_special_tokens": [image_token]})
    return out


def tiny_llava(tokenizer, *, hidden: int = 32, layers: int = 2, dtype=torch.float32, attn: str = "sdpa", seed: int = 0):
    """A LLaVA-1.5-shaped model with random weights: CLIP-like vision tower (32 px, 8 px patches: 16 image
    tokens), a Llama decoder, the tokenizer's ``<image>`` as image token."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation=attn).to(dtype).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# LLaVA-1.5's prompt format as a chat template over TRL's conversational messages (text and image parts)
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER : {% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                 "{% else %}ASSISTANT : {% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}ASSISTANT :{% endif %}")


def llava_processor(tokenizer, image_size: int = 32, patch_size: int = 8, chat_template: str | None = None):
    """A ``LlavaProcessor``: CLIP image processor at ``image_size`` pixels and the tokenizer's ``<image>``."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer, patch_size=patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token="<image>")
    if chat_template is not None:
        processor.chat_template = chat_template
    return processor


def save_tiny_llava(dir, tokenizer, **kwargs) -> str:
    """:func:`tiny_llava` and its processor (CLIP image processor + the tokenizer) saved to ``dir``."""
    tiny_llava(tokenizer, **kwargs).save_pretrained(dir)
    llava_processor(tokenizer).save_pretrained(dir)
    return str(dir)


def save_tiny_sentence_model(dir, texts: list[str] | None = None) -> str:
    """A random sentence-transformers model (a 1-layer BERT + mean pooling) saved to ``dir``, with its own
    tokenizer (one that saved a processor would make sentence-transformers look for an image processor)."""
    from transformers import BertConfig, BertModel

    tok = word_tokenizer(texts, image_token=None)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(dir)
    tok.save_pretrained(dir)
    return str(dir)


def tiny_open_clip_config(dir) -> str:
    """An open_clip model config file for a ~3M-parameter CLIP (32 px images), random weights."""
    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
    path = Path(dir) / "TinyCLIP-mmalign.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def write_eval_set(dir, n: int, seed: int = 1) -> dict:
    """A held-out hallucination benchmark of ``n`` new shape images, in the public formats ``mmalign eval`` reads:
    ``pope.jsonl`` (POPE questions: for each image "Is there a {shape} in the image?" for its shape, yes, and for
    another shape, no) and COCO-style ``instances.json`` / ``captions.json`` whose categories are the shapes and
    the colours (CHAIR over them: ``chair_vocabulary="instances"``). Returns the paths (and ``images``)."""
    dir = Path(dir)
    rng = random.Random(seed)
    images = dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = list(SHAPES) + list(COLOURS)
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(names)]
    cid = {c["name"]: c["id"] for c in categories}
    pope, inst_images, annotations, captions = [], [], [], []
    for i in range(n):
        colour, shape, count = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(COUNTS))
        name = f"eval-{i}-{colour}_{shape}_{count}.png"
        (images / name).write_bytes(png(colour, shape, count))
        other = rng.choice([s for s in SHAPES if s != shape])
        pope += [{"question_id": 2 * i, "image": name, "text": f"Is there a {shape} in the image?", "label": "yes"},
                 {"question_id": 2 * i + 1, "image": name, "text": f"Is there a {other} in the image?", "label": "no"}]
        inst_images.append({"id": i, "file_name": name, "width": 48, "height": 48})
        annotations += [{"id": 2 * i, "image_id": i, "category_id": cid[shape]},
                        {"id": 2 * i + 1, "image_id": i, "category_id": cid[colour]}]
        captions.append({"id": i, "image_id": i, "caption": caption(colour, shape, count)})
    paths = {"images": str(images), "pope": str(dir / "pope_random.jsonl"), "instances": str(dir / "instances.json"),
             "captions": str(dir / "captions.json")}
    Path(paths["pope"]).write_text("".join(json.dumps(q) + "\n" for q in pope))
    Path(paths["instances"]).write_text(json.dumps({"images": inst_images, "categories": categories,
                                                    "annotations": annotations}))
    Path(paths["captions"]).write_text(json.dumps({"images": inst_images, "annotations": captions}))
    return paths
