"""The straightforward way to do what the engine does, kept as the reference the engine is tested and
benchmarked against: every sentence generated on its own with Hugging Face ``generate()`` over its full,
uncompacted prefix, the image keys hidden by ``attn_implementation="mmalign_masked"`` (the mask beside the call,
so positions are not renumbered), no shared prefill, no batching across sentences. It reads nothing of the engine:
only one try's draws (a :class:`~mmalign.bdhs.engine.Try`: the keep mask, the plan, the token ids) and the
tokenizer, so a test can give it draws of its own."""
from __future__ import annotations

import torch

from ..attention import hf


class _StopAtFullStop:
    """Stop a generate() row at a token holding a full stop (where a guided completion ends)."""

    def __init__(self, stops: set, start: int):
        self.stops, self.start = stops, start

    def __call__(self, input_ids, scores, **kwargs):
        done = input_ids.shape[1] > self.start and int(input_ids[0, -1]) in self.stops
        return torch.tensor([done], device=input_ids.device)


@torch.no_grad()
def sentence_by_sentence(masked_model, tokenizer, d, *, max_new_tokens: int, scope: str = "all",
                         image_token: int | None = None) -> list[list[int]]:
    """The generated tokens of every guided sentence of one try ``d``, each on its own: its prefix is the prompt,
    the ground truth before the sentence and its head (a swapped head after the sentence's start); greedy, stopping
    at the end of sequence, at a token holding a full stop or after ``max_new_tokens``. ``masked_model``: the model
    with ``attn_implementation="mmalign_masked"``; ``scope="text"``: only text queries lose the hidden keys."""
    from transformers import StoppingCriteriaList

    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    stops = {i for i, token in enumerate(vocab) if token and "." in token}
    eos = masked_model.generation_config.eos_token_id
    out = []
    for k, (start, head_end) in enumerate(d.spans):
        if d.plan.swapped[k]:
            prefix = d.ids[0, :d.prompt_len + start].tolist() + tokenizer(d.plan.heads[k],
                                                                           add_special_tokens=False)["input_ids"]
        else:
            prefix = d.ids[0, :d.prompt_len + head_end].tolist()
        keep = torch.ones(1, len(prefix), dtype=torch.bool, device=d.keep.device)
        n = min(len(prefix), d.keep.shape[1])
        keep[:, :n] = d.keep[:, :n]
        ids = torch.tensor([prefix], device=d.ids.device)
        queries = ids != image_token if scope == "text" and image_token is not None else None
        with hf.hidden_keys(keep, queries):
            gen = masked_model.generate(input_ids=ids, **d.image_inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                        eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                        stopping_criteria=StoppingCriteriaList([_StopAtFullStop(stops, len(prefix))]))
        out.append(gen[0, len(prefix):].tolist())
    return out
