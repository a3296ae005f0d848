"""What every tiny-model builder of ``tests/models/_zoo_*.py`` returns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class Sample:
    name: str
    model: "PreTrainedModel"    # tiny random model, seed 0, float64, eval, sdpa where supported
    prompt_ids: torch.Tensor    # (P,) int64: one prompt with ONE image, placeholders expanded as the processor does
    image_inputs: dict          # the processor's other outputs for that prompt (batch of 1), float tensors float64;
                                # per-token entries cover the prompt only
    text_ids: tuple[int, int]   # [lo, hi): ordinary token ids safe for response text
    eos_id: int                 # the eos id set in model.generation_config (pad_token_id set too)
