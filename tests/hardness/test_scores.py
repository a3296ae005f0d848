"""Eq. 5-7 and the Table 2 ablation: the vectorized pass equals a literal per-pair transcription."""
import math

import pytest
import torch

from mmalign.hardness.scores import (alpha_d, delta_scores_reference, pair_softmax,
                                     subsentence_probabilities_reference)


def _ragged(rng, sizes):
    scores, pair, chosen = [], [], []
    for j, (p, q) in enumerate(sizes):
        scores.append(torch.randn(p + q, generator=rng, dtype=torch.float64) * 10)
        pair += [j] * (p + q)
        chosen += [True] * p + [False] * q
    return torch.cat(scores), torch.tensor(pair), torch.tensor(chosen)


@pytest.mark.parametrize("sizes", [[(1, 1)], [(3, 2), (1, 4), (5, 1)], [(2, 0), (0, 3), (7, 6)], [(40, 33)] * 5])
def test_pair_softmax_matches_eq5_6_per_pair(rng, sizes):
    scores, pair, chosen = _ragged(rng, sizes)
    got = pair_softmax(scores, pair, chosen, len(sizes))
    start = 0
    for j, (p, q) in enumerate(sizes):
        c = scores[start:start + p + q]
        p_w, p_l, delta = subsentence_probabilities_reference(c[:p], c[p:])
        torch.testing.assert_close(got.probs[start:start + p + q], torch.cat([p_w, p_l]))
        torch.testing.assert_close(got.delta[j], delta)
        torch.testing.assert_close(got.delta_scores[j], delta_scores_reference(c[:p], c[p:]))
        assert math.isclose(got.probs[start:start + p + q].sum().item(), 1.0, rel_tol=1e-12)
        start += p + q


def test_pair_softmax_is_stable_for_large_scores():
    # CLIP logits are up to ~100·cos: exp would overflow without the per-pair maximum.
    scores = torch.tensor([900.0, 899.0, 10.0, 901.0], dtype=torch.float64)
    got = pair_softmax(scores, torch.tensor([0, 0, 1, 1]), torch.tensor([True, False, True, False]), 2)
    assert torch.isfinite(got.probs).all() and torch.isfinite(got.delta).all()
    torch.testing.assert_close(got.delta[1], torch.tensor(-1.0, dtype=torch.float64))


def test_delta_bounds_and_signs(rng):
    scores, pair, chosen = _ragged(rng, [(2, 3)] * 8)
    got = pair_softmax(scores, pair, chosen, 8)
    assert (got.delta.abs() <= 1).all()
    only_chosen = pair_softmax(torch.tensor([1.0, 2.0]), torch.tensor([0, 0]), torch.tensor([True, True]), 1)
    assert only_chosen.delta.item() == pytest.approx(1.0)


def test_alpha_d_is_eq7():
    assert alpha_d(0.3, 0.0482190464911681).item() == pytest.approx(
        (1 / (1 + math.exp(-0.3))) / (1 / (1 + math.exp(-0.0482190464911681))), rel=1e-15)
    torch.testing.assert_close(alpha_d(torch.tensor([0.1, -0.2]), 0.1),
                               torch.sigmoid(torch.tensor([0.1, -0.2], dtype=torch.float64)) / torch.sigmoid(
                                   torch.tensor(0.1, dtype=torch.float64)))


def test_pair_softmax_checks_shapes():
    with pytest.raises(ValueError, match="scores, pair, chosen"):
        pair_softmax(torch.zeros(3), torch.zeros(2, dtype=torch.int64), torch.zeros(3, dtype=torch.bool), 1)
