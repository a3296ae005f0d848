"""Training examples and the policy's sequence log-probs for a batch of preference pairs.

Chosen and rejected share the prompt and the image: the vision tower and projector run once per pair
(the merged prompt embeddings are reused for both responses), then the 2N sequences go through the
decoder together and the log-probs come from the final hidden states through
``fused_linear_sequence_logps`` (no full logits; only response positions are computed). Under
DeepSpeed ZeRO-3 the LM head's weight is partitioned and only its module call gathers it, so that
path runs the head as a module on the response positions and then the fused log-prob kernel.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import data
from .. import functional as F
from ..bdhs.vlm import decoder_and_head, merged_embeddings
from ..prompts import PromptEncoder

IGNORE = -100


@dataclass
class PairExample:
    index: int
    id: str
    prompt_ids: torch.Tensor       # (P,) image tokens expanded
    image_inputs: dict
    chosen_ids: list
    rejected_ids: list
    alpha_d: float | None = None
    ref_chosen: float | None = None
    ref_rejected: float | None = None
    chosen: str = ""               # the texts, for generating new rejected responses online


def encode_pair(rec: data.PairRecord, encoder: PromptEncoder, max_length: int) -> PairExample:
    """Tokenize one record; responses end with EOS and are cut so that prompt + response fit
    ``max_length``. A prompt that alone does not fit is an error naming the record."""
    pair = encoder(rec)
    tok = encoder.tokenizer
    room = max_length - len(pair.prompt_ids)
    if room < 1:
        raise data.RecordError(rec.index, rec.line, rec.id,
                               f"the prompt takes {len(pair.prompt_ids)} tokens, max_length is {max_length}")
    ids = [response_ids(t, tok, room) for t in (rec.chosen, rec.rejected)]
    extra = rec.extra

    def num(key):
        v = extra.get(key)
        return None if v is None else float(v)

    return PairExample(rec.index, rec.id, pair.prompt_ids, pair.image_inputs, ids[0], ids[1], num("alpha_d"),
                       num("ref_chosen_logp"), num("ref_rejected_logp"), rec.chosen)


def response_ids(text: str, tokenizer, room: int) -> list:
    """A response's tokens, EOS-terminated, cut to ``room`` tokens."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return (tokenizer(text, add_special_tokens=False)["input_ids"] + eos)[:room]


def with_responses(ex: PairExample, tokenizer, max_length: int, *, chosen: str | None = None,
                   rejected: str | None = None) -> PairExample:
    """The same pair with other responses (generated online: BDHS, Mixed-DPO); reference log-probs dropped."""
    room = max_length - len(ex.prompt_ids)
    return dataclasses.replace(
        ex, chosen_ids=ex.chosen_ids if chosen is None else response_ids(chosen, tokenizer, room),
        rejected_ids=ex.rejected_ids if rejected is None else response_ids(rejected, tokenizer, room),
        chosen=ex.chosen if chosen is None else chosen, ref_chosen=None, ref_rejected=None)


def _sequences(model, examples: list[PairExample]):
    """(inputs_embeds (2N, T, H), attention_mask (2N, T), labels (2N, T)): chosen_i at 2i, rejected_i at 2i+1."""
    decoder, _ = decoder_and_head(model)
    embed = decoder.get_input_embeddings()
    device = embed.weight.device
    seqs, labels = [], []
    for ex in examples:
        ids = ex.prompt_ids.to(device)[None]
        prompt = merged_embeddings(model, ids, ex.image_inputs)[0]   # the vision tower runs once per pair
        for resp in (ex.chosen_ids, ex.rejected_ids):
            r = torch.tensor(resp, dtype=torch.long, device=device)
            seqs.append(torch.cat([prompt, embed(r)]))
            labels.append(torch.cat([torch.full((len(ex.prompt_ids),), IGNORE, device=device), r]))
    width = max(s.shape[0] for s in seqs)
    embeds = torch.stack([torch.nn.functional.pad(s, (0, 0, 0, width - s.shape[0])) for s in seqs])
    mask = torch.stack([(torch.arange(width, device=device) < s.shape[0]).long() for s in seqs])
    lab = torch.stack([torch.nn.functional.pad(t, (0, width - t.shape[0]), value=IGNORE) for t in labels])
    return embeds, mask, lab


def pair_logps(model, examples: list[PairExample], *, zero3: bool = False):
    """Sequence log-probs (sum over response tokens) of chosen and rejected: two (N,) tensors."""
    decoder, head = decoder_and_head(model)
    embeds, mask, labels = _sequences(model, examples)
    hidden = decoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, :-1]
    labels = labels[:, 1:]
    if not zero3:
        logps = F.fused_linear_sequence_logps(hidden, head.weight, labels, bias=head.bias)
    else:
        rows = (labels != IGNORE).reshape(-1).nonzero().squeeze(1)
        logits = head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows))
        tok = F.token_logps(logits[None], labels.reshape(-1).index_select(0, rows)[None])[0]
        logps = torch.zeros(labels.shape[0], dtype=tok.dtype, device=tok.device).index_add(
            0, rows // labels.shape[1], tok)
    return logps[0::2], logps[1::2]
