"""Every VLM variant the model layer is tested on: tiny random models built from configs (float64, SDPA), each with
one processed prompt (``Sample``). The builders live in ``_zoo_a`` (LLaVA family, Mistral-3, Aya Vision, InternVL),
``_zoo_b`` (multimodal RoPE, Gemma-3, PaliGemma, Molmo2) and ``_zoo_c`` (SmolVLM, Idefics3, LFM2-VL, Mllama,
Ovis2)."""
from __future__ import annotations

import importlib

BUILDERS = {}
for _name in ("_zoo_a", "_zoo_b", "_zoo_c"):
    BUILDERS.update(importlib.import_module(f"{__package__}.{_name}").BUILDERS)

VARIANTS = sorted(BUILDERS)


def build(name: str):
    """A fresh :class:`Sample` of variant ``name`` (tests change weights and gradients, so nothing is shared)."""
    return BUILDERS[name]()
