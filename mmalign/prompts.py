"""Prompts and models for the pipelines that run a Hugging Face model over a dataset (``mmalign bdhs``,
``mmalign train``): prompt formatting (the processor's chat template, a user template, or LLaVA-1.5's),
image decoding and processing, and loading a local VLM or causal LM with its processor."""
from __future__ import annotations

import torch

from . import data

LLAVA_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


class PromptEncoder:
    """Record -> :class:`PairInput`: prompt formatting, image decoding and the processor."""

    def __init__(self, processor, *, template: str | None = None, images: str | None = None, device="cpu", dtype=None):
        self.processor, self.images, self.device, self.dtype = processor, images, device, dtype
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.vision = hasattr(processor, "image_processor")
        self.template = template

    def text(self, prompt: str) -> str:
        if self.template is not None:
            return self.template.format(prompt=prompt)
        # a VLM processor usually carries the chat template itself (llava-1.5-hf does), a tokenizer otherwise
        if getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None):
            content = [{"type": "image"}, {"type": "text", "text": prompt}] if self.vision else prompt
            return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                      add_generation_prompt=True, tokenize=False)
        return LLAVA_TEMPLATE.format(prompt=prompt) if self.vision else f"USER: {prompt} ASSISTANT:"

    def __call__(self, rec: data.PairRecord):
        """A :class:`mmalign.bdhs.PairInput`: prompt ids (image tokens expanded) and the image inputs."""
        from .bdhs.engine import PairInput

        text = self.text(rec.prompt)
        if not self.vision:
            ids = self.tokenizer(text, return_tensors="pt")["input_ids"][0]
            return PairInput(rec.id, ids, rec.chosen)
        image = data.open_image(rec.image, self.images)
        enc = self.processor(images=image, text=text, return_tensors="pt")
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in enc.items() if k not in ("input_ids", "attention_mask") and isinstance(v, torch.Tensor)}
        return PairInput(rec.id, enc["input_ids"][0], rec.chosen, inputs)


def load_model(path: str, device: str, dtype: torch.dtype):
    """A local VLM (``*ForConditionalGeneration``) or causal LM, and its processor or tokenizer."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "vision_config"):
        auto = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
        model = auto.from_pretrained(path, **_dtype_kwarg(dtype))
        processor = AutoProcessor.from_pretrained(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **_dtype_kwarg(dtype))
        processor = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), processor


def _dtype_kwarg(dtype) -> dict:
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


