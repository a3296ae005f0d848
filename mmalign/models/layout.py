"""What a model's own forward hands its decoder, captured once per batch of rows, and laid out again.

mmalign runs the decoder itself on sequences the model's forward never saw whole: the trainer's chosen and
rejected sequences cut from one [prompt | chosen | rejected] row (the image encoded once per pair), the same
row with the rejected response blind to the chosen one (the prompt computed once), and the BDHS engine's
compacted prompt (hidden image tokens removed). Rather than re-deriving what each family's decoder needs, the
model's own forward runs once on the row and :class:`DecoderCall` keeps what it passed to the decoder (merged
embeddings, RoPE positions of one or three axes, the family's own attention masks, per-token and per-image
inputs). Every layout is then a selection of that call's columns, the same for all of its inputs:

    select(rows, columns)        sequence b' takes row ``rows[b']`` at columns ``columns[b']`` (-1: padding):
                                 the two-sequence layout, the compaction of §7; a 4D mask is gathered on
                                 both axes, per-image features follow their image tokens
    resume(start, shift)         positions from column ``start`` on move back by ``shift`` (the rejected
                                 response continues the prompt: text advances every RoPE axis by one)
    restrict(allowed)            and a (B, T, T) bool mask into the attention masks (rejected blind to chosen)

A selection keeps each token's original position and, for masks built from positions or token types (Gemma-3's
bidirectional image blocks, PaliGemma's prefix), what the model's own forward gave it on the whole row. Index
arithmetic in a mask (a sliding window) is the one thing a selection does not carry: callers check that rows
fit the window (:meth:`mmalign.models.ModelAdapter.window_fits`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

TOKEN, SAMPLE, VISUAL = "token", "sample", "visual"


@dataclass(frozen=True)
class Rule:
    """How an extra decoder input follows a layout: ``token`` (one entry per token along ``axis``, batch on
    axis 0), ``sample`` (axis 0 holds the same number of entries for each sequence, in order), ``visual`` (rows of features, one per True entry of
    the token input ``mask``, in row-major order; a list of such tensors, one per layer, is taken as a whole)."""

    kind: str
    axis: int = 1
    mask: str | None = None
    fill: int | float | bool = 0


@dataclass
class DecoderCall:
    """The decoder's inputs for B sequences of T columns.

    embeds (B, T, H); positions (A, B, T) int64, A = 1 (RoPE) or 3 (M-RoPE: temporal, height, width; 4 where the
    family prepends text positions); valid (B, T) bool (False on padding); masks: None where the decoder builds
    causal masks from the padding itself, else the family's own masks as its forward built them: a (B, 1, T, T)
    tensor (bool, True = attend, or additive float) or a dict of them by layer type (an entry None: causal);
    extras: other decoder inputs, each laid out by ``rules[name]``."""

    embeds: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    masks: object = None
    extras: dict = field(default_factory=dict)
    rules: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.embeds.shape[:2])

    def kwargs(self, *, padding_mask: bool = True) -> dict:
        """Keyword arguments for the decoder's forward (``inputs_embeds``, ``position_ids``, ``attention_mask``
        and the extras)."""
        pos = self.positions[0] if self.positions.shape[0] == 1 else self.positions
        mask = self.masks if self.masks is not None else (self.valid.long() if padding_mask else None)
        return dict(inputs_embeds=self.embeds, position_ids=pos, attention_mask=mask, **self.extras)

    @staticmethod
    def cat(calls: list["DecoderCall"]) -> "DecoderCall":
        """The calls' sequences one after another (same T; the same inputs and rules)."""
        first = calls[0]
        if len(calls) == 1:
            return first
        masks = None
        if isinstance(first.masks, dict):
            masks = {k: None if first.masks[k] is None else torch.cat([c.masks[k] for c in calls])
                     for k in first.masks}
        elif first.masks is not None:
            masks = torch.cat([c.masks for c in calls])
        extras = {}
        for name, value in first.extras.items():
            parts = [c.extras[name] for c in calls]
            extras[name] = ([torch.cat(layer) for layer in zip(*parts)] if isinstance(value, (list, tuple))
                            else torch.cat(parts))
        return dataclasses.replace(first, embeds=torch.cat([c.embeds for c in calls]),
                                   positions=torch.cat([c.positions for c in calls], 1),
                                   valid=torch.cat([c.valid for c in calls]), masks=masks, extras=extras)

    # ------------------------------------------------------------------------------------------- layouts
    def select(self, rows: torch.Tensor, columns: torch.Tensor) -> "DecoderCall":
        """Sequence b' = row ``rows[b']`` at columns ``columns[b']`` (increasing; -1 pads the end or the start)."""
        ok = columns >= 0
        safe = columns.clamp_min(0)
        r = rows[:, None]
        valid = self.valid[r, safe] & ok
        embeds = self.embeds[r, safe].masked_fill(~ok[..., None], 0)
        positions = self.positions[:, r, safe].masked_fill(~ok, 0)
        masks = _map_masks(self.masks, lambda m: _gather_mask(m, rows, safe, valid))
        extras = {name: _select_extra(self, name, rows, safe, ok) for name in self.extras}
        return dataclasses.replace(self, embeds=embeds, positions=positions, valid=valid, masks=masks, extras=extras)

    def resume(self, start: torch.Tensor, shift: torch.Tensor) -> "DecoderCall":
        """Positions at columns >= ``start[b]`` minus ``shift[b]`` (both (B,)), on every axis."""
        t = torch.arange(self.positions.shape[-1], device=self.positions.device)
        delta = torch.where(t[None] >= start[:, None], shift[:, None], 0)
        return dataclasses.replace(self, positions=self.positions - delta[None])

    def restrict(self, allowed: torch.Tensor, *, dtype: torch.dtype, additive: bool) -> "DecoderCall":
        """The masks and-ed with ``allowed`` (B, T, T) bool. Where the decoder would build causal masks itself, a
        causal mask over the valid columns is made first: bool (SDPA) or ``additive`` in ``dtype`` (eager)."""
        B, T = self.shape
        t = torch.arange(T, device=allowed.device)
        causal = (t[None, :, None] >= t[None, None, :]) & self.valid[:, None, :]
        base = causal[:, None] if not additive else _additive(causal[:, None], dtype)
        masks = self.masks
        if masks is None:
            masks = base
        elif isinstance(masks, dict):
            masks = {k: base if v is None else v for k, v in masks.items()}
        valid = self.valid
        return dataclasses.replace(self, masks=_map_masks(masks, lambda m: _restrict(m, allowed, valid)))


def _map_masks(masks, fn):
    if masks is None:
        return None
    if isinstance(masks, dict):
        return {k: None if v is None else fn(v) for k, v in masks.items()}
    return fn(masks)


def _allowed(m: torch.Tensor) -> torch.Tensor:
    return m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _like(allowed: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    return allowed if template.dtype == torch.bool else _additive(allowed, template.dtype)


def _finish(allowed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, T, T) allowed over valid keys only; a padding query sees itself (no empty softmax row)."""
    T = allowed.shape[-1]
    eye = torch.eye(T, dtype=torch.bool, device=allowed.device)[None]
    return (allowed & valid[:, None, :] & valid[:, :, None]) | (eye & ~valid[:, :, None])


def _gather_mask(m: torch.Tensor, rows: torch.Tensor, safe: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    if m.shape[1] != 1:
        raise ValueError(f"attention mask: expected (B, 1, T, T), got {tuple(m.shape)}")
    a = _allowed(m)[rows[:, None, None], 0, safe[:, :, None], safe[:, None, :]]
    return _like(_finish(a, valid)[:, None], m)


def _restrict(m: torch.Tensor, allowed: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return _like(_finish(_allowed(m)[:, 0] & allowed, valid)[:, None], m)


def _take(t: torch.Tensor, axis: int, rows: torch.Tensor, safe: torch.Tensor, ok: torch.Tensor, fill):
    """t[rows[b'], ..., safe[b', t'], ...] along ``axis`` (batch on axis 0), ``fill`` where not ok."""
    moved = t.movedim(axis, 1)
    out = moved[rows[:, None], safe]
    okb = ok.reshape(ok.shape + (1,) * (out.dim() - 2))
    return out.masked_fill(~okb, fill).movedim(1, axis)


def _select_extra(call: DecoderCall, name: str, rows, safe, ok):
    rule, value = call.rules[name], call.extras[name]
    if rule.kind == TOKEN:
        return _take(value, rule.axis, rows, safe, ok, rule.fill)
    if rule.kind == SAMPLE:  # axis 0 holds B sequences' entries, the same number each (Mllama: tiles per sample)
        per = value.reshape(call.shape[0], -1, *value.shape[1:])
        return per.index_select(0, rows).reshape(-1, *value.shape[1:])
    if rule.kind == VISUAL:
        mask = call.extras[rule.mask].bool()
        index = (mask.reshape(-1).long().cumsum(0) - 1).view(mask.shape)  # feature row of each visual token
        chosen = mask[rows[:, None], safe] & ok
        picked = index[rows[:, None], safe][chosen]
        return [v.index_select(0, picked) for v in value] if isinstance(value, (list, tuple)) else \
            value.index_select(0, picked)
    raise ValueError(f"{name}: unknown layout rule {rule.kind!r}")
