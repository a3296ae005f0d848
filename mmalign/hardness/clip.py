"""CLIP scorers (docs/math.md §4 step 2): ``C = logit_scale · cos(image_embedding, text_embedding)``, CLIP's
``logits_per_image``, for every (image, sub-sentence) of a batch of pairs.

Each image is encoded once (chosen and rejected share it) and the texts of all pairs of a batch are
encoded together in chunks of ``text_batch_size``; texts longer than the model's context are
truncated. On CUDA the encoders run under autocast (bf16) unless ``amp=False``; the cosine and the
scale are computed in float32.

Two backends behind one interface (:class:`ClipScorer`):
  * open_clip: any model name it knows (``ViT-L-14-336``, ...) with ``pretrained`` a tag (``openai``),
    a local checkpoint path, or None (random weights, for tests only). A model config ``.json`` file
    is accepted as the model name (it is registered with ``open_clip.add_model_config``).
  * Hugging Face: a ``CLIPModel`` directory (e.g. openai/clip-vit-large-patch14-336, LLaVA-1.5's
    vision tower with its text tower), given as a path holding ``config.json`` or as ``hf:<name>``.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

DEFAULT_MODEL = "ViT-L-14-336"
DEFAULT_PRETRAINED = "openai"


class ClipScorer:
    """Subclasses set ``self.device`` and implement ``_encode_images(list[PIL]) -> (n, E)`` and
    ``_encode_texts(list[str]) -> (m, E)`` plus ``logit_scale() -> float tensor``."""

    device: torch.device
    amp: bool = True
    text_batch_size: int = 256
    description: str = ""

    def _autocast(self):
        if self.device.type == "cuda" and self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def score(self, images: list, texts: list[str], image_of_text: torch.Tensor) -> torch.Tensor:
        """images: n PIL images; texts: m strings; image_of_text (m,) int64 in [0, n). Returns C (m,) float32."""
        if len(texts) == 0:
            return torch.zeros(0)
        with self._autocast():
            img = self._encode_images(images).float()
            txt = torch.cat([self._encode_texts(texts[i:i + self.text_batch_size]).float()
                             for i in range(0, len(texts), self.text_batch_size)])
        img = torch.nn.functional.normalize(img, dim=-1)
        txt = torch.nn.functional.normalize(txt, dim=-1)
        cos = (img[image_of_text.to(img.device)] * txt).sum(-1)
        return (self.logit_scale().float() * cos).cpu()


class OpenClipScorer(ClipScorer):
    def __init__(self, model, preprocess, tokenizer, *, device="cpu", amp=True, text_batch_size=256, description=""):
        self.model, self.preprocess, self.tokenizer = model.eval().to(device), preprocess, tokenizer
        self.device, self.amp, self.text_batch_size = torch.device(device), amp, text_batch_size
        self.description = description

    @classmethod
    def load(cls, model_name: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED, **kwargs):
        try:
            import open_clip
        except ImportError as e:
            raise ImportError("CLIP scoring through open_clip needs `pip install open_clip_torch`") from e
        if model_name.endswith(".json"):
            if not os.path.isfile(model_name):
                raise FileNotFoundError(f"clip_model: config file {model_name} does not exist")
            open_clip.add_model_config(model_name)
            model_name = Path(model_name).stem
        if model_name not in open_clip.list_models():
            raise ValueError(f"clip_model: open_clip knows no model {model_name!r} (see open_clip.list_models(), "
                             "or give a model config .json, or a Hugging Face CLIP directory)")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        except Exception as e:  # offline downloads fail deep inside huggingface_hub / urllib
            raise RuntimeError(
                f"could not load CLIP {model_name!r} with pretrained={pretrained!r}: {e}. Give a local checkpoint "
                "with --clip-pretrained PATH, a Hugging Face CLIP directory with --clip-model, or "
                "--clip-pretrained none for random weights (tests only: the scores mean nothing)") from e
        tokenizer = open_clip.get_tokenizer(model_name)
        return cls(model, preprocess, tokenizer, description=f"open_clip:{model_name}:{pretrained}", **kwargs)

    def _encode_images(self, images):
        x = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        return self.model.encode_image(x)

    def _encode_texts(self, texts):
        return self.model.encode_text(self.tokenizer(texts).to(self.device))

    def logit_scale(self):
        return self.model.logit_scale.exp()


def _features(out):
    """transformers < 5 returns the projected features; 5.x returns them as ``pooler_output``."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFClipScorer(ClipScorer):
    def __init__(self, model, image_processor, tokenizer, *, device="cpu", amp=True, text_batch_size=256,
                 description=""):
        self.model, self.image_processor, self.tokenizer = model.eval().to(device), image_processor, tokenizer
        self.device, self.amp, self.text_batch_size = torch.device(device), amp, text_batch_size
        self.max_length = model.config.text_config.max_position_embeddings
        self.description = description

    @classmethod
    def load(cls, path: str, **kwargs):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        name = path[3:] if path.startswith("hf:") else path
        try:
            model = CLIPModel.from_pretrained(name)
            processor = AutoImageProcessor.from_pretrained(name)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except Exception as e:
            raise RuntimeError(f"could not load a Hugging Face CLIPModel from {name!r}: {e}") from e
        return cls(model, processor, tokenizer, description=f"hf:{name}", **kwargs)

    def _encode_images(self, images):
        px = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return _features(self.model.get_image_features(pixel_values=px))

    def _encode_texts(self, texts):
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        return _features(self.model.get_text_features(input_ids=enc["input_ids"],
                                                      attention_mask=enc.get("attention_mask")))

    def logit_scale(self):
        return self.model.logit_scale.exp()


def _is_hf_clip(path: str) -> bool:
    if path.startswith("hf:"):
        return True
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    return json.loads(cfg.read_text()).get("model_type") == "clip"


def load_scorer(clip_model: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED, *,
                device: str = "cpu", amp: bool = True, text_batch_size: int = 256, seed: int = 0) -> ClipScorer:
    """A scorer from a command-line style spec (see the module docstring). ``pretrained`` None or
    "none" means random weights initialised from ``seed``."""
    if text_batch_size < 1:
        raise ValueError(f"text_batch_size: expected >= 1, got {text_batch_size}")
    kwargs = dict(device=device, amp=amp, text_batch_size=text_batch_size)
    if _is_hf_clip(clip_model):
        return HFClipScorer.load(clip_model, **kwargs)
    if isinstance(pretrained, str) and pretrained.lower() in ("", "none", "random"):
        pretrained = None
    if pretrained is None:
        torch.manual_seed(seed)
    return OpenClipScorer.load(clip_model, pretrained, **kwargs)
