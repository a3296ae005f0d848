"""compact_image_tokens and sample_image_keep on constructed cases (the model-level equivalence with the
masked kernel is in test_hf.py)."""
import pytest
import torch

from mmalign.attention import compact_image_tokens, sample_image_keep


def test_compaction_keeps_order_positions_and_pads(rng):
    emb = torch.randn(2, 6, 3, generator=rng)
    keep = torch.tensor([[1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    attn = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    c = compact_image_tokens(emb, keep, attention_mask=attn)
    assert c.index.tolist() == [[0, 2, 3, 5], [2, 3, 4, 5]]
    assert c.position_ids.tolist() == [[0, 2, 3, 5], [0, 1, 2, 3]]  # left-padded row: cumsum(mask) - 1
    assert c.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert torch.equal(c.inputs_embeds[0], emb[0, [0, 2, 3, 5]])
    keep[1, 4:] = False
    c = compact_image_tokens(emb, keep, attention_mask=attn)
    assert c.index.tolist() == [[0, 2, 3, 5], [-1, -1, 2, 3]]
    assert c.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]] and (c.inputs_embeds[1, :2] == 0).all()
    r = compact_image_tokens(emb, keep, attention_mask=attn, padding_side="right")
    assert r.index.tolist() == [[0, 2, 3, 5], [2, 3, -1, -1]]
    p = compact_image_tokens(emb, keep, position_ids=torch.arange(10, 16).expand(2, 6))
    assert p.position_ids[0].tolist() == [10, 12, 13, 15]


def test_compaction_errors():
    emb = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match=r"keep: expected a bool tensor of shape \(2, 4\)"):
        compact_image_tokens(emb, torch.ones(2, 4))
    with pytest.raises(ValueError, match="inputs_embeds: expected"):
        compact_image_tokens(emb[0], torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="padding_side"):
        compact_image_tokens(emb, torch.ones(2, 4, dtype=torch.bool), padding_side="middle")
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        compact_image_tokens(emb, torch.ones(2, 4, dtype=torch.bool), attention_mask=torch.ones(2, 3))


def test_sample_image_keep_is_eq6():
    image = torch.zeros(4, 5000, dtype=torch.bool)
    image[:, 100:4100] = True
    keep = sample_image_keep(image, 0.99, generator=torch.Generator().manual_seed(0))
    assert keep[~image].all()  # text is always visible
    rate = keep[image].float().mean().item()
    assert 0.0075 < rate < 0.0125  # ~1% of image tokens stay visible (16000 draws: sd 0.0008)
    again = sample_image_keep(image, 0.99, generator=torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)
    assert sample_image_keep(image, 1.0)[image].sum() == 0 and sample_image_keep(image, 0.0).all()
    with pytest.raises(ValueError, match="rho_th"):
        sample_image_keep(image, 1.5)
