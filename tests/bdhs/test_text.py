"""The text side of BDHS on constructed cases: sentences, yes/no swap, cuts, full stops, Eq. 8 noise."""
import math
import random

import pytest
import torch

from mmalign.bdhs import text as T
from mmalign.bdhs.noise import add_noise, alpha_bar


def test_sentences_join_back_to_the_text():
    text = "Yes, there is a dog. It is brown!\nDr. Who has 3.5 cats.  The end"
    parts = T.sentences(text)
    assert "".join(parts) == text
    assert [p.strip() for p in parts] == ["Yes, there is a dog.", "It is brown!", "Dr. Who has 3.5 cats.", "The end"]
    assert T.sentences("") == [] and T.sentences("one") == ["one"]


@pytest.mark.parametrize("sentence, swapped", [("Yes, it is.", "No, it is."), ("no way.", "yes way."),
                                               ("  No.", "  Yes."), ("yesterday it rained.", None),
                                               ("Is it? Yes.", None)])
def test_yes_no_swap_keeps_case(sentence, swapped):
    always, never = random.Random(0), random.Random(0)
    assert T.swap_yes_no(sentence, always, p=1.0) == (swapped or sentence)
    assert T.swap_yes_no(sentence, never, p=0.0) == sentence


def test_yes_no_swap_probability():
    rng = random.Random(1)
    swaps = sum(T.swap_yes_no("Yes.", rng) == "No." for _ in range(4000))
    assert abs(swaps / 4000 - 0.5) < 0.03


def test_cuts_are_word_boundaries_after_the_first_word():
    rng = random.Random(2)
    sentence = " The red circle sits on a white mat."
    heads = set()
    for _ in range(300):
        head, tail = T.cut(sentence, rng)
        assert head + tail == sentence and head.strip().startswith("The")
        assert tail == "" or tail[0].isspace()
        heads.add(head)
    assert len(heads) == 7  # after each of the 7 first words
    assert T.cut("Word.", rng) == ("Word.", "")


def test_stop_at_full_stop_and_plans_are_reproducible():
    assert T.stop_at_full_stop(" a cat. And more.") == (" a cat.", True)
    assert T.stop_at_full_stop(" no stop") == (" no stop", False)
    text = "Yes, a dog. A cat sits."
    a = T.plan(text, T.rng_for(0, "pair-1", 2))
    assert a == T.plan(text, T.rng_for(0, "pair-1", 2))  # the same (seed, keys): the same plan
    # the keys decide the plan: 60 tries of one pair (18 possible plans: swap or not, 3 cuts each sentence) give
    # many, with both outcomes of the yes/no swap; a generator that ignored its keys would give one
    plans = [T.plan(text, T.rng_for(0, "pair-1", k)) for k in range(60)]
    assert plans[2] == a and len({repr(p) for p in plans}) >= 6
    assert 0 < sum(p.swapped[0] for p in plans) < 60 and not any(p.swapped[1] for p in plans)
    assert T.plan(text, T.rng_for(1, "pair-1", 2)) != a or T.plan(text, T.rng_for(2, "pair-1", 2)) != a  # the seed
    for p in plans:
        assert p.sentences == [s for s in T.sentences(text)]
        for head, sent, swapped in zip(p.heads, p.sentences, p.swapped):
            assert swapped or sent.startswith(head)


def test_noise_is_eq8_9():
    beta = [1 / (1 + math.exp(-(-6 + 12 * k / 1000))) * (0.5e-2 - 1e-5) + 1e-5 for k in range(1, 501)]
    assert alpha_bar(500) == pytest.approx(math.prod(1 - b for b in beta), rel=1e-12)
    x = torch.randn(2, 3, 8, 8)
    noisy = add_noise(x, 500, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noisy, math.sqrt(alpha_bar(500)) * x + math.sqrt(1 - alpha_bar(500)) * eps)
    assert torch.equal(add_noise(x, 0), x)
    with pytest.raises(ValueError, match="noise_steps"):
        alpha_bar(-1)
