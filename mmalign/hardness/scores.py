"""DAMO's data-aware hardness numbers (docs/math.md §4 steps 3-4, Eq. 5-7, and Table 2's ablation).

For one pair with CLIP scores ``C_w`` (p chosen sub-sentences) and ``C_l`` (q rejected ones):

    P      = softmax([C_w ; C_l])            over all p + q scores of the pair      (Eq. 5)
    δ      = Σ P_w - Σ P_l                                                          (Eq. 6)
    α_D    = σ(δ) / σ(δ̄),  δ̄ the mean δ over the dataset                             (Eq. 7)
    δ_scores = Σ C_w / Σ C_l                 the "CLIP scores" ablation of Table 2

``*_reference`` functions transcribe these lines for one pair; :func:`pair_softmax` computes them for
a whole batch of pairs of different sizes in one vectorized pass over segment ids (no Python loop).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


def subsentence_probabilities_reference(c_w: torch.Tensor, c_l: torch.Tensor):
    """Eq. 5-6 for one pair: returns (P_w (p,), P_l (q,), δ)."""
    p = torch.softmax(torch.cat([c_w, c_l]), dim=0)
    p_w, p_l = p[: len(c_w)], p[len(c_w):]
    return p_w, p_l, p_w.sum() - p_l.sum()


def delta_scores_reference(c_w: torch.Tensor, c_l: torch.Tensor) -> torch.Tensor:
    """Table 2 "CLIP scores": δ = Σ C_w / Σ C_l."""
    return c_w.sum() / c_l.sum()


def alpha_d(delta, delta_mean):
    """Eq. 7: α_D = σ(δ) / σ(δ̄). Works on floats and tensors."""
    delta = torch.as_tensor(delta, dtype=torch.float64)
    return torch.sigmoid(delta) / torch.sigmoid(torch.as_tensor(delta_mean, dtype=torch.float64))


class PairScores(NamedTuple):
    probs: torch.Tensor         # (M,) P of every sub-sentence, Eq. 5
    delta: torch.Tensor         # (N,) Eq. 6
    delta_scores: torch.Tensor  # (N,) Table 2 ablation


def pair_softmax(scores: torch.Tensor, pair: torch.Tensor, chosen: torch.Tensor, num_pairs: int) -> PairScores:
    """Eq. 5-6 and the Table 2 ablation for a ragged batch of pairs in one pass.

    scores (M,) float: the CLIP score of every sub-sentence of every pair; pair (M,) int64: which pair
    (0..num_pairs-1) each belongs to; chosen (M,) bool: True for a chosen sub-sentence. A pair with no
    sub-sentence at all gets δ = 0."""
    if not (scores.shape == pair.shape == chosen.shape) or scores.dim() != 1:
        raise ValueError(f"scores, pair, chosen: expected equal 1-D shapes, got {tuple(scores.shape)}, "
                         f"{tuple(pair.shape)}, {tuple(chosen.shape)}")
    scores = scores.double()
    zeros = scores.new_zeros(num_pairs)
    peak = zeros.scatter_reduce(0, pair, scores, reduce="amax", include_self=False)
    e = torch.exp(scores - peak[pair])
    probs = e / zeros.index_add(0, pair, e)[pair]
    sign = torch.where(chosen, 1.0, -1.0).to(scores)
    delta = zeros.index_add(0, pair, probs * sign)
    sum_w = zeros.index_add(0, pair, torch.where(chosen, scores, 0.0))
    sum_l = zeros.index_add(0, pair, torch.where(chosen, 0.0, scores))
    return PairScores(probs, delta, sum_w / sum_l)
