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
from ..bdhs.vlm import decoder_and_head, image_token_id, merged_embeddings
from ..lm_logits import logit_transform
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


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on ``device``. On CUDA through pinned memory and a non-blocking copy: a copy from pageable
    memory would wait for all the work queued on the stream (the policy's forward, when the reference pass
    builds its batch), leaving the GPU idle while the host catches up."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _batched_image_inputs(examples: list[PairExample]) -> dict | None:
    """The pairs' image inputs concatenated along dim 0 (one vision-tower call for the batch), or None where
    they do not stack (different keys, a non-tensor value, different trailing shapes: e.g. AnyRes tile
    counts that differ)."""
    first = examples[0].image_inputs
    if not first or any(set(ex.image_inputs) != set(first) for ex in examples):
        return None
    out = {}
    for key, v in first.items():
        values = [ex.image_inputs[key] for ex in examples]
        if not all(isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[1:] == v.shape[1:] for x in values):
            return None
        out[key] = torch.cat(values)
    return out


def _pair_rows(model, examples: list[PairExample], device) -> torch.Tensor:
    """(N, L, H): for each pair, the embeddings of [prompt | chosen | rejected] (right-padded), image features
    in place of the image tokens. One model call for the batch (vision tower, projector, one embedding call),
    or one per pair where the image inputs do not stack."""
    image = image_token_id(model)
    pad = 1 if image == 0 else 0  # any id but the image token's: padding must not count as image positions
    rows = [ex.prompt_ids.tolist() + list(ex.chosen_ids) + list(ex.rejected_ids) for ex in examples]
    width = max(len(r) for r in rows)
    ids = to_device(torch.tensor([r + [pad] * (width - len(r)) for r in rows]), device)
    if not any(ex.image_inputs for ex in examples):
        return merged_embeddings(model, ids)
    batched = _batched_image_inputs(examples)
    if batched is not None:
        return merged_embeddings(model, ids, batched)
    return torch.cat([merged_embeddings(model, ids[i:i + 1], ex.image_inputs) for i, ex in enumerate(examples)])


def _pair_of_sequence(n: int, device) -> torch.Tensor:
    """(2n, 1): the pair of each of the 2n sequences chosen_0, rejected_0, chosen_1, ..."""
    return torch.arange(n, device=device).repeat_interleave(2)[:, None]


def _sequences(model, examples: list[PairExample]):
    """(inputs_embeds (2N, T, H), attention_mask (2N, T), labels (2N, T)): chosen_i at 2i, rejected_i at 2i+1.

    Batched, so the launches do not grow with N: one model call embeds [prompt | chosen | rejected] of every
    pair (each image through the vision tower once; per pair where the image inputs do not stack), then one
    gather lays out the 2N sequences [prompt | chosen] and [prompt | rejected]. Padding embeddings are zeros."""
    decoder, _ = decoder_and_head(model)
    device = decoder.get_input_embeddings().weight.device
    rows = _pair_rows(model, examples, device)
    lengths, columns, labels = [], [], []
    for ex in examples:
        p, c = len(ex.prompt_ids), len(ex.chosen_ids)
        for start, resp in ((p, ex.chosen_ids), (p + c, ex.rejected_ids)):  # the response's columns in the row
            lengths.append(p + len(resp))
            columns.append(list(range(p)) + list(range(start, start + len(resp))))
            labels.append([IGNORE] * p + list(resp))
    width = max(lengths)
    host = torch.tensor([[c + [0] * (width - len(c)) for c in columns], [t + [IGNORE] * (width - len(t)) for t in labels],
                         [[1] * n + [0] * (width - n) for n in lengths]])
    columns, labels, valid = to_device(host, device).unbind(0)  # one copy to the device
    valid = valid.bool()
    embeds = rows[_pair_of_sequence(len(examples), device), columns].masked_fill(~valid[..., None], 0)
    return embeds, valid.long(), labels


# decoders whose positions are plain 1D RoPE ids and whose every layer attends causally to the whole sequence:
# the ones a custom 4D mask with explicit position ids describes exactly
SHARED_PROMPT_DECODERS = ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2")


def shares_prompt(model) -> bool:
    """Whether :func:`pair_logps` can run chosen and rejected of a pair as one sequence that shares the prompt:
    a decoder in SHARED_PROMPT_DECODERS, no sliding window, eager or SDPA attention (a 4D mask)."""
    decoder, _ = decoder_and_head(model)
    cfg = decoder.config
    return (cfg.model_type in SHARED_PROMPT_DECODERS and not getattr(cfg, "sliding_window", None)
            and getattr(cfg, "_attn_implementation", None) in ("sdpa", "eager"))


def _shared_layout(examples: list[PairExample], dtype, device):
    """For rows [prompt | chosen | rejected] (right-padded to W): the additive 4D mask (N, 1, W, W) in ``dtype``
    (causal, rejected blind to chosen, padding rows see themselves only), position ids (N, W) (rejected resumes
    where the prompt ends), and for the 2N sequences chosen_0, rejected_0, ... the row positions whose hidden
    states predict each response token, with those tokens as labels (2N, L), padded with IGNORE. Mask and
    positions are built on the device from the segment lengths; only those and the (2N, L) labels are copied."""
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
    p, pc, n = (lengths[:, :1, None], (lengths[:, 0] + lengths[:, 1])[:, None, None], lengths.sum(1)[:, None, None])
    q = torch.arange(width, device=device)[None, :, None]  # query rows
    k = torch.arange(width, device=device)[None, None, :]  # key columns
    allowed = (k <= q) & (q < n) & ~((q >= pc) & (k >= p) & (k < pc))  # causal, rejected blind to chosen
    allowed |= (q == k) & (q >= n)  # padding rows see themselves (no empty softmax)
    positions = torch.where(q[..., 0] < pc[..., 0], q[..., 0], q[..., 0] - (pc[..., 0] - p[..., 0]))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None], positions.masked_fill(q[..., 0] >= n[..., 0], 0), at.reshape(-1, L), labels.reshape(-1, L)


def _shared_hidden(model, examples: list[PairExample]):
    """(hidden (2N, L, H), labels (2N, L)): the decoder runs once per pair over [prompt | chosen | rejected]."""
    decoder, _ = decoder_and_head(model)
    device = decoder.get_input_embeddings().weight.device
    rows = _pair_rows(model, examples, device)
    mask, positions, at, labels = _shared_layout(examples, rows.dtype, device)
    hidden = decoder(inputs_embeds=rows, attention_mask=mask, position_ids=positions).last_hidden_state
    return hidden[_pair_of_sequence(len(examples), device), at], labels


def pair_logps(model, examples: list[PairExample], *, zero3: bool = False, share_prompt: bool | None = None):
    """Sequence log-probs (sum over response tokens) of chosen and rejected: two (N,) tensors.

    ``share_prompt`` (default: :func:`shares_prompt`): chosen and rejected of a pair go through the decoder as
    one sequence [prompt | chosen | rejected] in which rejected does not see chosen and resumes the prompt's
    positions, so the prompt (the image tokens: most of a VLM's sequence) is computed once per pair, not
    twice; the same log-probs as two sequences. Else the 2N sequences [prompt | chosen], [prompt | rejected]."""
    decoder, head = decoder_and_head(model)
    transform = logit_transform(model)  # Gemma-2's soft-capping and the like (mmalign.lm_logits)
    if share_prompt if share_prompt is not None else shares_prompt(model):
        hidden, labels = _shared_hidden(model, examples)
    else:
        embeds, mask, labels = _sequences(model, examples)
        hidden = decoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, :-1]
        labels = labels[:, 1:]
    if not zero3:
        logps = F.fused_linear_sequence_logps(hidden, head.weight, labels, bias=head.bias, **transform.kwargs())
    else:
        rows = (labels != IGNORE).reshape(-1).nonzero().squeeze(1)
        logits = transform(head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)))
        tok = F.token_logps(logits[None], labels.reshape(-1).index_select(0, rows)[None])[0]
        logps = torch.zeros(labels.shape[0], dtype=tok.dtype, device=tok.device).index_add(
            0, rows // labels.shape[1], tok)
    return logps[0::2], logps[1::2]
