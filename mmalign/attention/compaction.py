"""Exact compaction (docs/math.md §7): a hidden image token is read by no query at any layer, so hiding it is
the same as removing it from the sequence, provided every remaining token keeps its original position
id. This turns masked attention into ordinary attention over a shorter sequence (the fast path of the
BDHS engine), and :func:`sample_image_keep` draws the mask of Eq. 6.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


def sample_image_keep(image_mask: torch.Tensor, rho_th: float = 0.99, *, generator: torch.Generator | None = None):
    """Eq. 6: every image position stays visible iff ρ ≥ ρ_th with ρ ~ U(0, 1); text positions always do.

    image_mask (B, T) bool marks image tokens. Returns key_keep (B, T) bool (True = visible)."""
    if not 0.0 <= rho_th <= 1.0:
        raise ValueError(f"rho_th: expected a value in [0, 1], got {rho_th}")
    if image_mask.dtype != torch.bool or image_mask.dim() != 2:
        raise ValueError(f"image_mask: expected a (B, T) bool tensor, got {image_mask.dtype} {tuple(image_mask.shape)}")
    rho = torch.rand(image_mask.shape, generator=generator, device=generator.device if generator else "cpu")
    return ~image_mask | (rho.to(image_mask.device) >= rho_th)


class Compacted(NamedTuple):
    inputs_embeds: torch.Tensor   # (B, T', H) kept tokens, left-padded (or right-padded)
    position_ids: torch.Tensor    # (B, T') original position ids of the kept tokens (0 on padding)
    attention_mask: torch.Tensor  # (B, T') 1 on kept tokens, 0 on padding
    index: torch.Tensor           # (B, T') original position of each kept token, -1 on padding


def compact_image_tokens(inputs_embeds: torch.Tensor, keep: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                         position_ids: torch.Tensor | None = None, padding_side: str = "left") -> Compacted:
    """Remove the tokens with ``keep[b, t] = False`` (hidden image tokens, and padding where
    ``attention_mask`` is 0), keeping each remaining token's original position id.

    inputs_embeds (B, T, H); keep (B, T) bool (e.g. :func:`sample_image_keep`); attention_mask (B, T)
    0/1, default all ones; position_ids (B, T), default ``cumsum(attention_mask) - 1`` (what Hugging
    Face derives for left-padded batches). The result is padded to the longest row on ``padding_side``
    ("left" for generation)."""
    if inputs_embeds.dim() != 3:
        raise ValueError(f"inputs_embeds: expected (B, T, H), got {tuple(inputs_embeds.shape)}")
    B, T, _ = inputs_embeds.shape
    if keep.dtype != torch.bool or tuple(keep.shape) != (B, T):
        raise ValueError(f"keep: expected a bool tensor of shape {(B, T)}, got {keep.dtype} {tuple(keep.shape)}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
    device = inputs_embeds.device
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=device)
    elif tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask: expected shape {(B, T)}, got {tuple(attention_mask.shape)}")
    if position_ids is None:
        position_ids = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
    elif tuple(position_ids.shape) != (B, T):
        raise ValueError(f"position_ids: expected shape {(B, T)}, got {tuple(position_ids.shape)}")
    stay = keep.to(device) & attention_mask.bool()
    counts = stay.sum(1)
    width = int(counts.max()) if B else 0  # the one host synchronization: the compacted length
    rank = stay.long().cumsum(1) - 1                       # place among the kept tokens of the row
    offset = (width - counts)[:, None] if padding_side == "left" else torch.zeros_like(counts)[:, None]
    dest = torch.where(stay, rank + offset, width)         # hidden tokens go to a scratch column
    index = torch.full((B, width + 1), -1, dtype=torch.long, device=device)
    index.scatter_(1, dest, torch.arange(T, device=device).expand(B, T))
    index = index[:, :width]
    valid = index >= 0
    safe = index.clamp_min(0)
    embeds = torch.gather(inputs_embeds, 1, safe[..., None].expand(B, width, inputs_embeds.shape[2]))
    embeds = embeds.masked_fill(~valid[..., None], 0)
    pos = torch.gather(position_ids.to(device), 1, safe).masked_fill(~valid, 0)
    return Compacted(embeds, pos, valid.long(), index)
