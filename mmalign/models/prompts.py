"""Prompts and models for the pipelines that run a Hugging Face model over a dataset (``mmalign train``, the
reference pass, ``mmalign bdhs``, ``mmalign eval``): prompt formatting (the processor's chat template, a user
template, or LLaVA-1.5's), image decoding and processing (the family's own processor: Qwen2.5-VL's dynamic
resolution, SmolVLM's tiles, LLaVA-OneVision's AnyRes, ...), and loading a local VLM or causal LM with its
processor."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import data

LLAVA_TEMPLATE = "USER: <image>\n{prompt} ASSISTANT:"


@dataclass
class EncodedPrompt:
    """One prompt ready for a model: ``prompt_ids`` (P,) is the full chat-formatted prompt with its image tokens
    expanded; ``image_inputs`` the processor's other outputs for this one sample (batch of 1; per-token entries
    such as ``mm_token_type_ids`` cover the prompt only). ``chosen``: the reference response, where there is one."""

    id: str
    prompt_ids: torch.Tensor
    chosen: str = ""
    image_inputs: dict = field(default_factory=dict)


def chat_prompt(processor, prompt: str, *, image: bool = False) -> str | None:
    """``prompt`` as the user's turn of ``processor``'s chat template (a VLM processor's, or a tokenizer's), ready for
    the assistant's answer, with an image part first when ``image``; None when neither carries a chat template."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if not (getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)):
        return None
    content = [{"type": "image"}, {"type": "text", "text": prompt}] if image else prompt
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


class PromptEncoder:
    """Record -> :class:`EncodedPrompt`: prompt formatting, image decoding and the processor."""

    def __init__(self, processor, *, template: str | None = None, images: str | None = None, device="cpu",
                 dtype=None):
        self.processor, self.images, self.device, self.dtype = processor, images, device, dtype
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.vision = hasattr(processor, "image_processor")
        self.template = template

    def text(self, prompt: str) -> str:
        if self.template is not None:
            return self.template.format(prompt=prompt)
        # a VLM processor usually carries the chat template itself (llava-1.5-hf does), a tokenizer otherwise
        text = chat_prompt(self.processor, prompt, image=self.vision)
        if text is not None:
            return text
        return LLAVA_TEMPLATE.format(prompt=prompt) if self.vision else f"USER: {prompt} ASSISTANT:"

    def encode(self, id: str, prompt: str, image=None, chosen: str = "") -> EncodedPrompt:
        """``prompt`` (with ``image``: a path under the image root, bytes, or a PIL image) as model inputs."""
        text = self.text(prompt)
        if not self.vision:
            ids = self.tokenizer(text, return_tensors="pt")["input_ids"][0]
            return EncodedPrompt(id, ids, chosen)
        image = data.open_image(image, self.images)
        enc = self.processor(images=image, text=text, return_tensors="pt")
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in enc.items() if k not in ("input_ids", "attention_mask") and isinstance(v, torch.Tensor)}
        return EncodedPrompt(id, enc["input_ids"][0], chosen, inputs)

    def __call__(self, rec: data.PairRecord) -> EncodedPrompt:
        return self.encode(rec.id, rec.prompt, rec.image, rec.chosen)


def load_model(path: str, device: str, dtype: torch.dtype, **kwargs):
    """A local VLM (``AutoModelForImageTextToText``) or causal LM, and its processor or tokenizer. ``kwargs`` go to
    ``from_pretrained`` (a quantization config with its device map: the model is then placed by it)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "vision_config"):
        auto = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
        model = auto.from_pretrained(path, **dtype_kwarg(dtype), **kwargs)
        processor = AutoProcessor.from_pretrained(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **dtype_kwarg(dtype), **kwargs)
        processor = AutoTokenizer.from_pretrained(path)
    return (model if "device_map" in kwargs else model.to(device)).eval(), processor


def dtype_kwarg(dtype) -> dict:
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}
