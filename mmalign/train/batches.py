"""Training examples and the policy's sequence log-probs for a batch of preference pairs.

Chosen and rejected share the prompt and the image: one model call embeds [prompt | chosen | rejected]
of every pair (the vision tower and projector see each image once, not once per response) and a gather
lays out the 2N sequences. They go through the decoder together, and the log-probs come from the final
hidden states through ``fused_linear_sequence_logps`` (no full logits; only response positions are
computed). Under DeepSpeed ZeRO-3 the LM head's weight is partitioned and only its module call gathers
it, so that path runs the head as a module on the response positions and then the fused log-prob kernel.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .. import data
from .. import functional as F
from ..models import DecoderCall, ModelAdapter, PromptEncoder, adapter_for

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


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on ``device``. On CUDA through pinned memory and a non-blocking copy: a copy from pageable
    memory would wait for all the work queued on the stream (the policy's forward, when the reference pass
    builds its batch), leaving the GPU idle while the host catches up."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _stacked(inputs: list[dict]) -> dict | None:
    """Per-pair image inputs concatenated along dim 0 (one vision-tower call for the batch), or None where they do
    not stack (different keys, a non-tensor value, different trailing shapes: e.g. AnyRes tile counts that
    differ)."""
    first = inputs[0]
    if not first or any(set(x) != set(first) for x in inputs):
        return None
    out = {}
    for key, v in first.items():
        values = [x[key] for x in inputs]
        if not all(isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[1:] == v.shape[1:] for x in values):
            return None
        out[key] = torch.cat(values)
    return out


def capture_rows(adapter: ModelAdapter, rows: list[list[int]], inputs: list[dict], prompt_lens: list[int],
                 device) -> DecoderCall:
    """The model's own forward, up to its decoder, on ``rows`` of token ids (right-padded): one call for the batch
    (the vision tower sees each image once), or one per row where the image inputs do not stack."""
    width = max(len(r) for r in rows)
    pad = adapter.pad_id()
    host = torch.tensor([r + [pad] * (width - len(r)) for r in rows] +
                        [[1] * len(r) + [0] * (width - len(r)) for r in rows])
    ids, valid = to_device(host, device).split(len(rows))
    valid = valid.bool()
    inputs = [adapter.extend_inputs(x, p, width) for x, p in zip(inputs, prompt_lens)]
    if not any(inputs):
        return adapter.capture(ids, None, valid)
    batched = _stacked(inputs)
    if batched is not None:
        return adapter.capture(ids, batched, valid)
    return DecoderCall.cat([adapter.capture(ids[i:i + 1], x, valid[i:i + 1]) for i, x in enumerate(inputs)])


def _pair_rows(adapter: ModelAdapter, examples: list[PairExample], device) -> DecoderCall:
    """For each pair, the decoder inputs of [prompt | chosen | rejected] (right-padded), the rejected response's
    positions resuming where the prompt ends (text advances every RoPE axis by one)."""
    rows = [ex.prompt_ids.tolist() + list(ex.chosen_ids) + list(ex.rejected_ids) for ex in examples]
    call = capture_rows(adapter, rows, [ex.image_inputs for ex in examples],
                        [len(ex.prompt_ids) for ex in examples], device)
    lengths = to_device(torch.tensor([[len(ex.prompt_ids) + len(ex.chosen_ids), len(ex.chosen_ids)]
                                      for ex in examples]), device)
    return call.resume(lengths[:, 0], lengths[:, 1])


def _pair_of_sequence(n: int, device) -> torch.Tensor:
    """(2n,): the pair of each of the 2n sequences chosen_0, rejected_0, chosen_1, ..."""
    return torch.arange(n, device=device).repeat_interleave(2)


def _two_sequences(adapter: ModelAdapter, examples: list[PairExample], device):
    """(decoder inputs of the 2N sequences [prompt | chosen], [prompt | rejected], labels (2N, T)): chosen_i at 2i,
    rejected_i at 2i+1, cut from the pairs' rows (each image through the vision tower once). Where the family's
    own masks count a sliding window in columns and a row exceeds the window, the 2N sequences are captured
    themselves instead (the image then runs twice)."""
    columns, labels, seqs = [], [], []
    for ex in examples:
        p, c = len(ex.prompt_ids), len(ex.chosen_ids)
        for start, resp in ((p, ex.chosen_ids), (p + c, ex.rejected_ids)):  # the response's columns in the row
            columns.append(list(range(p)) + list(range(start, start + len(resp))))
            labels.append([IGNORE] * p + list(resp))
            seqs.append(ex.prompt_ids.tolist() + list(resp))
    width = max(len(c) for c in columns)
    host = torch.tensor([[c + [-1] * (width - len(c)) for c in columns],
                         [t + [IGNORE] * (width - len(t)) for t in labels]])
    columns, labels = to_device(host, device).unbind(0)  # one copy to the device
    row_width = max(len(ex.prompt_ids) + len(ex.chosen_ids) + len(ex.rejected_ids) for ex in examples)
    if adapter.family.masks and not adapter.window_fits(row_width):  # decided before any capture: one, not two
        twice = [x for ex in examples for x in (ex.image_inputs, ex.image_inputs)]
        lens = [len(ex.prompt_ids) for ex in examples for _ in (0, 1)]
        return capture_rows(adapter, seqs, twice, lens, device), labels
    rows = _pair_rows(adapter, examples, device)
    return rows.select(_pair_of_sequence(len(examples), device), columns), labels


def shares_prompt(model, width: int | None = None) -> bool:
    """Whether :func:`pair_logps` can run chosen and rejected of a pair as one sequence that shares the prompt: a
    family in the table whose decoder is attention only and takes a 4D mask (sdpa or eager), rows of ``width``
    within its sliding window."""
    adapter = adapter_for(model)
    return adapter.shared_prompt_reason() is None and (width is None or adapter.window_fits(width))


def _shared_targets(examples: list[PairExample], device):
    """For rows [prompt | chosen | rejected] (right-padded to W): the (N, W, W) mask that keeps the rejected response
    blind to the chosen one, and for the 2N sequences chosen_0, rejected_0, ... the row positions whose hidden
    states predict each response token, with those tokens as labels (2N, L), padded with IGNORE."""
    rows = [(len(ex.prompt_ids), len(ex.chosen_ids), len(ex.rejected_ids)) for ex in examples]
    width = max(p + c + r for p, c, r in rows)
    L = max(max(c, r) for _, c, r in rows)
    at = torch.zeros(2 * len(rows), L, dtype=torch.long)
    labels = torch.full((2 * len(rows), L), IGNORE, dtype=torch.long)
    for i, ((p, c, r), ex) in enumerate(zip(rows, examples)):
        # token j of a response is predicted by the row before it; the first by the prompt's last row
        at[2 * i, :c] = torch.arange(p - 1, p + c - 1)
        at[2 * i + 1, :r] = torch.tensor(([p - 1] + list(range(p + c, p + c + r - 1)))[:r], dtype=torch.long)
        labels[2 * i, :c] = torch.tensor(ex.chosen_ids, dtype=torch.long)
        labels[2 * i + 1, :r] = torch.tensor(ex.rejected_ids, dtype=torch.long)
    host = torch.cat([torch.tensor(rows, dtype=torch.long), at.reshape(len(rows), -1), labels.reshape(len(rows), -1)], 1)
    lengths, at, labels = to_device(host, device).split([3, 2 * L, 2 * L], 1)  # one copy to the device
    p, pc = lengths[:, :1, None], (lengths[:, 0] + lengths[:, 1])[:, None, None]
    q = torch.arange(width, device=device)[None, :, None]  # query rows
    k = torch.arange(width, device=device)[None, None, :]  # key columns
    blind = ~((q >= pc) & (k >= p) & (k < pc))  # rejected does not see chosen
    return blind, at.reshape(-1, L), labels.reshape(-1, L)


def _shared_hidden(adapter: ModelAdapter, examples: list[PairExample], device):
    """(hidden (2N, L, H), labels (2N, L)): the decoder runs once per pair over [prompt | chosen | rejected]."""
    rows = _pair_rows(adapter, examples, device)
    blind, at, labels = _shared_targets(examples, device)
    rows = rows.restrict(blind, dtype=rows.embeds.dtype, additive=adapter.attention == "eager")
    hidden = adapter.run(rows).last_hidden_state
    return hidden[_pair_of_sequence(len(examples), device)[:, None], at], labels


def pair_logps(model, examples: list[PairExample], *, zero3: bool = False, share_prompt: bool | None = None):
    """Sequence log-probs (sum over response tokens) of chosen and rejected: two (N,) tensors.

    ``share_prompt`` (default: :func:`shares_prompt`): chosen and rejected of a pair go through the decoder as
    one sequence [prompt | chosen | rejected] in which rejected does not see chosen and resumes the prompt's
    positions, so the prompt (the image tokens: most of a VLM's sequence) is computed once per pair, not
    twice; the same log-probs as two sequences. Else the 2N sequences [prompt | chosen], [prompt | rejected].
    Every family runs through :mod:`mmalign.models`: its positions, masks and extra decoder inputs as its own
    forward computes them, its logit transform."""
    adapter = adapter_for(model)
    device = _device(adapter)
    width = max(len(ex.prompt_ids) + len(ex.chosen_ids) + len(ex.rejected_ids) for ex in examples)
    if share_prompt if share_prompt is not None else shares_prompt(model, width):
        hidden, labels = _shared_hidden(adapter, examples, device)
    else:
        call, labels = _two_sequences(adapter, examples, device)
        hidden = adapter.run(call).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
    head, transform = adapter.head, adapter.transform  # Gemma-2's soft-capping and the like
    if not zero3:
        logps = F.fused_linear_sequence_logps(hidden, head.weight, labels, bias=head.bias, **transform.kwargs())
    else:
        rows = (labels != IGNORE).reshape(-1).nonzero().squeeze(1)
        logits = transform(head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)))
        tok = F.token_logps(logits[None], labels.reshape(-1).index_select(0, rows)[None])[0]
        logps = torch.zeros(labels.shape[0], dtype=tok.dtype, device=tok.device).index_add(
            0, rows // labels.shape[1], tok)
    return logps[0::2], logps[1::2]


def _device(adapter: ModelAdapter) -> torch.device:
    return adapter.decoder.get_input_embeddings().weight.device
