"""The straightforward way to do what the engine does, kept as the reference the engine is tested and
benchmarked against: every sentence generated on its own with Hugging Face ``generate()`` over its full,
uncompacted prefix, the image keys hidden by ``attn_implementation="mmalign_masked"`` (the mask beside
the call, so positions are not renumbered), no shared prefill, no batching across sentences."""
from __future__ import annotations

import torch

from ..attention import hf
from .engine import BDHSEngine, PairInput


class _StopAtFullStop:
    """Stop a generate() row where the engine stops a sentence: at a token holding a full stop."""

    def __init__(self, engine: BDHSEngine, start: int):
        self.engine, self.start = engine, start

    def __call__(self, input_ids, scores, **kwargs):
        done = input_ids.shape[1] > self.start and self.engine.ends_sentence(int(input_ids[0, -1]))
        return torch.tensor([done], device=input_ids.device)


@torch.no_grad()
def sentence_by_sentence(engine: BDHSEngine, masked_model, pair: PairInput, try_index: int) -> list[list[int]]:
    """Generated tokens of every sentence of one try (``masked_model``: the engine's model with
    ``attn_implementation="mmalign_masked"``). Greedy decoding gives exactly the engine's tokens."""
    d = engine.draw(pair, try_index)
    cfg = engine.config
    out = []
    for k, (start, head_end) in enumerate(d.spans):
        if d.plan.swapped[k]:
            prefix = d.ids[0, :d.prompt_len + start].tolist() + engine._ids(d.plan.heads[k])
        else:
            prefix = d.ids[0, :d.prompt_len + head_end].tolist()
        keep = torch.ones(1, len(prefix), dtype=torch.bool, device=d.keep.device)
        n = min(len(prefix), d.keep.shape[1])
        keep[:, :n] = d.keep[:, :n]
        from transformers import StoppingCriteriaList

        scope = None
        if cfg.scope == "text" and engine.image_token is not None:  # only text queries lose the hidden keys
            scope = torch.tensor([prefix], device=keep.device) != engine.image_token
        with hf.hidden_keys(keep, scope):
            gen = masked_model.generate(
                input_ids=torch.tensor([prefix], device=d.ids.device), **d.image_inputs,
                do_sample=False, max_new_tokens=cfg.max_new_tokens, eos_token_id=sorted(engine.eos) or None,
                pad_token_id=engine.tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([_StopAtFullStop(engine, len(prefix))]))
        out.append(gen[0, len(prefix):].tolist())
    return out
