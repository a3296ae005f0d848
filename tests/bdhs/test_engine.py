"""The BDHS engine on a tiny random LLaVA: the shared-prefix batched decoding gives exactly the tokens of
generating every sentence alone with its full prefix through Hugging Face generate() and the masked
attention (so compaction == masked kernel too), in every mode, on draws the test makes itself (cut points,
yes/no swaps, the image-key mask, the noise) and gives to both; determinism whatever the batch; the
similarity gate and tries; the POVID baseline."""
import random
import re

import pytest
import torch

from mmalign.attention import hf
from mmalign.bdhs import BDHSConfig, BDHSEngine, PairInput
from mmalign.bdhs import text as T
from mmalign.bdhs.baseline import sentence_by_sentence
from mmalign.bdhs.engine import Try
from mmalign.bdhs.noise import add_noise

from . import _models as M

CHOSEN = ["The image shows a red circle . Yes , the background is white and it is centered .",
          "No , there are two green squares on the left . The background is white .",
          "This picture has a blue triangle ."]


@pytest.fixture(scope="module")
def setup():
    hf.register()
    tok = M.tokenizer()
    model = M.llava(tok, torch.float64)
    masked = M.llava(tok, torch.float64, attn="mmalign_masked")
    masked.load_state_dict(model.state_dict())
    pairs = [PairInput(f"pair-{i}", M.prompt_ids(tok, "Describe the image ."), c,
                       {"pixel_values": M.pixels(col, shape)})
             for i, (c, col, shape) in enumerate(zip(CHOSEN, ("red", "green", "blue"), ("circle", "square", "triangle")))]
    return tok, model, masked, pairs


def _sim(value):
    return lambda a, b: torch.full((len(a),), float(value))


SWAP = {"Yes": "No", "No": "Yes", "yes": "no", "no": "yes"}


def _draws(tok, pair, image_token, *, rho_th, seed, swap, noise_steps=None) -> Try:
    """One try's draws made here, not by the engine's draw(): each sentence of y+ cut after half its words (a
    leading yes/no swapped when ``swap``), image tokens kept iff U(0, 1) >= rho_th (Eq. 6), the pixels noised
    with ``noise_steps`` (Eq. 8-9), the token ids of prompt and y+ with each head's span."""
    g = torch.Generator().manual_seed(seed)
    sentences = [s.strip() for s in re.findall(r"[^.]*\.", pair.chosen)]
    heads, swapped, response, spans = [], [], [], []
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    for sentence in sentences:
        words = sentence.split()
        flip = swap and words[0] in SWAP
        head = " ".join(([SWAP[words[0]]] + words[1:] if flip else words)[:max(1, len(words) // 2)])
        heads.append(head)
        swapped.append(flip)
        start = len(response)
        response += ids(sentence)
        spans.append((start, start if flip else start + len(ids(head))))
    full = torch.tensor(pair.prompt_ids.tolist() + response)[None]
    keep = (full != image_token) | (torch.rand(full.shape, generator=g) >= rho_th)
    inputs = dict(pair.image_inputs)
    if noise_steps is not None:
        inputs["pixel_values"] = add_noise(inputs["pixel_values"], noise_steps, generator=g)
    return Try(random.Random(seed), inputs, T.Plan(sentences, heads, swapped), full, keep, len(pair.prompt_ids),
               response, spans)


def _alone(engine, masked, tok, pairs, *, rho_th=0.6, seed=3, swap=True, noise_steps=None):
    """Draws of the test's own for every pair, given to the engine (in place of its draw()) and to the baseline:
    every sentence generated on its own, full prefix, no compaction, masked attention + HF generate."""
    draws = {p.id: _draws(tok, p, engine.image_token, rho_th=rho_th, seed=seed + i, swap=swap, noise_steps=noise_steps)
             for i, p in enumerate(pairs)}
    engine.draw = lambda pair, try_index, unguided=False: draws[pair.id]
    return [(draws[p.id], sentence_by_sentence(masked, tok, draws[p.id], max_new_tokens=engine.config.max_new_tokens,
                                               scope=engine.config.scope, image_token=engine.image_token))
            for p in pairs]


@pytest.mark.parametrize("mode, scope", [("attn", "all"), ("both", "all"), ("none", "all"), ("attn", "text")])
def test_shared_prefix_batch_equals_each_sentence_alone(setup, mode, scope):
    tok, model, masked, pairs = setup
    engine = BDHSEngine(model, tok, _sim(0.0), BDHSConfig(mode=mode, rho_th=0.6, max_new_tokens=6, swap_p=0.5,
                                                          seed=3, scope=scope))
    baseline = _alone(engine, masked, tok, pairs, rho_th=0.0 if mode == "none" else 0.6,
                      noise_steps=500 if mode == "both" else None)
    rows = engine.complete_rows(pairs, try_index=1)
    swapped = 0
    for j, pair in enumerate(pairs):
        d, alone = baseline[j]
        mine = [r for r in rows if r.pair == j]
        assert len(mine) == len(alone) == len(d.plan.sentences)
        for r, ref in zip(mine, alone):
            assert r.generated == ref[:len(r.generated)]
            assert len(r.generated) == engine.config.max_new_tokens or engine._stops(r.generated[-1], r)
        if mode != "none":
            assert not d.keep.all()
        swapped += sum(d.plan.swapped)
    if mode == "attn":
        assert swapped >= 1  # the yes/no rows (fed their swapped head first) are covered
    if scope == "text":
        assert model.config._attn_implementation == "sdpa"  # restored after the masked-kernel run
        plain = BDHSEngine(model, tok, _sim(0.0), BDHSConfig(mode=mode, rho_th=0.6, max_new_tokens=6, swap_p=0.5, seed=3))
        assert [r.generated for r in plain.complete_rows(pairs, 1)] != [r.generated for r in rows]


def test_forced_swapped_heads_match_alone(setup):
    tok, model, masked, pairs = setup
    engine = BDHSEngine(model, tok, _sim(0.0), BDHSConfig(mode="attn", rho_th=0.6, max_new_tokens=5, swap_p=1.0))
    baseline = _alone(engine, masked, tok, pairs[:2], seed=7)
    rows = engine.complete_rows(pairs[:2], try_index=2)
    for j in range(2):
        d, alone = baseline[j]
        assert any(d.plan.swapped)
        for r, ref in zip([r for r in rows if r.pair == j], alone):
            assert r.generated == ref[:len(r.generated)]


def test_kernel_path_in_fp32_gives_the_same_generations(setup):
    tok, _, _, pairs = setup
    model, masked = M.llava(tok, torch.float32), M.llava(tok, torch.float32, attn="mmalign_masked")
    masked.load_state_dict(model.state_dict())
    pairs32 = [PairInput(p.id, p.prompt_ids, p.chosen, {"pixel_values": p.image_inputs["pixel_values"].float()})
               for p in pairs[:2]]
    engine = BDHSEngine(model, tok, _sim(0.0), BDHSConfig(mode="attn", rho_th=0.6, max_new_tokens=4, seed=1))
    baseline = _alone(engine, masked, tok, pairs32)  # masked attention runs the Triton kernel (interpreter on CPU)
    rows = engine.complete_rows(pairs32, try_index=1)
    for j, pair in enumerate(pairs32):
        _, alone = baseline[j]
        for r, ref in zip([r for r in rows if r.pair == j], alone):
            assert r.generated == ref[:len(r.generated)]


@pytest.mark.parametrize("sample", [False, True])
def test_deterministic_whatever_the_batch(setup, sample):
    tok, model, _, pairs = setup
    cfg = BDHSConfig(mode="both", rho_th=0.7, max_new_tokens=5, do_sample=sample, temperature=1.5, top_p=0.9,
                     seed=11, tries=2)
    together = BDHSEngine(model, tok, _sim(0.0), cfg).generate(pairs)
    apart = [BDHSEngine(model, tok, _sim(0.0), cfg).generate([p])[0] for p in reversed(pairs)][::-1]
    assert [r.rejected for r in together] == [r.rejected for r in apart]
    other = BDHSEngine(model, tok, _sim(0.0), BDHSConfig(**{**cfg.__dict__, "seed": 12})).generate(pairs)
    assert [r.rejected for r in other] != [r.rejected for r in together]


def test_similarity_gate_and_tries(setup):
    tok, model, _, pairs = setup
    calls = []

    def sim(a, b):  # too similar on the first two tries, then different
        calls.append(len(a))
        return torch.full((len(a),), 0.99 if len(calls) <= 2 else 0.5)

    res = BDHSEngine(model, tok, sim, BDHSConfig(max_new_tokens=3, tries=5)).generate(pairs)
    assert calls == [3, 3, 3] and all(r.tries == 3 and r.accepted and r.guided for r in res)
    res = BDHSEngine(model, tok, _sim(0.99), BDHSConfig(max_new_tokens=3, tries=3,
                                                       max_response_tokens=4)).generate(pairs)
    assert all(r.tries == 3 and r.accepted and not r.guided for r in res)  # the last try is unguided
    assert all(len(tok(r.rejected, add_special_tokens=False)["input_ids"]) <= 4 for r in res)
    res = BDHSEngine(model, tok, _sim(0.99), BDHSConfig(max_new_tokens=3, tries=1)).generate(pairs[:1])
    assert res[0].tries == 1 and not res[0].accepted and res[0].guided
    with pytest.raises(ValueError, match="mode"):
        BDHSConfig(mode="nope")
    with pytest.raises(ValueError, match="tries"):
        BDHSConfig(tries=0)


def test_guided_text_keeps_heads_and_stops_at_full_stops(setup):
    tok, model, _, pairs = setup
    engine = BDHSEngine(model, tok, _sim(0.0), BDHSConfig(mode="attn", max_new_tokens=40, swap_p=0.0))
    text = engine.complete(pairs[:1], 1)[0]
    d = engine.draw(pairs[0], 1)
    assert text.startswith(d.plan.heads[0])
    assert text.count(".") <= len(d.plan.sentences)


def test_povid_is_the_teacher_forced_argmax(setup):
    tok, model, _, pairs = setup
    engine = BDHSEngine(model, tok, _sim(0.0), BDHSConfig(mode="povid", tries=1))
    got = engine.generate(pairs[:1])[0]
    d = engine.draw(pairs[0], 1)  # same noisy pixels as the engine's try
    response = engine._ids(pairs[0].chosen)
    ids = torch.cat([pairs[0].prompt_ids, torch.tensor(response)])[None]
    with torch.no_grad():
        logits = model(input_ids=ids, **d.image_inputs).logits[0]
    P = len(pairs[0].prompt_ids)
    expected = logits[P - 1:P - 1 + len(response)].argmax(-1).tolist()
    assert got.rejected == tok.decode(expected, skip_special_tokens=True)


def _exact_against_baseline(engine, masked, pairs, **draws):
    baseline = _alone(engine, masked, engine.tokenizer, pairs, **draws)
    rows = engine.complete_rows(pairs, 1)
    for j, pair in enumerate(pairs):
        _, alone = baseline[j]
        mine = [r.generated for r in rows if r.pair == j]
        assert len(mine) == len(alone) and all(m == a[:len(m)] for m, a in zip(mine, alone))
    return rows


def test_llava_next_anyres(setup):
    """LLaVA-1.6: image features of several tiles, located through the image token like LLaVA-1.5."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    tok = setup[0]
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                          image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]], vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").double().eval()
    masked = LlavaNextForConditionalGeneration._from_config(cfg, attn_implementation="mmalign_masked").double().eval()
    masked.load_state_dict(model.state_dict())
    px, sizes = torch.randn(1, 3, 3, 32, 32, dtype=torch.float64), torch.tensor([[32, 64]])
    with torch.no_grad():
        n_image = model.model.get_image_features(pixel_values=px, image_sizes=sizes).pooler_output[0].shape[0]
    pairs = [PairInput("next-0", M.prompt_ids(tok, "Describe the image .", n_image), CHOSEN[0],
                       {"pixel_values": px, "image_sizes": sizes})]
    engine = BDHSEngine(model, tok, _sim(0.0), BDHSConfig(mode="both", rho_th=0.8, max_new_tokens=5))
    assert not engine.draw(pairs[0], 1).keep.all()
    _exact_against_baseline(engine, masked, pairs, rho_th=0.8, noise_steps=500)


def test_text_only_causal_lm(setup):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = setup[0]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").double().eval()
    masked = LlamaForCausalLM._from_config(cfg, attn_implementation="mmalign_masked").double().eval()
    masked.load_state_dict(model.state_dict())
    ids = torch.tensor(tok("USER : Describe the image . ASSISTANT :")["input_ids"])
    pairs = [PairInput(f"text-{i}", ids, c) for i, c in enumerate(CHOSEN)]
    engine = BDHSEngine(model, tok, _sim(0.0), BDHSConfig(mode="attn", max_new_tokens=5))
    assert engine.image_token is None and engine.draw(pairs[0], 1).keep.all()
    _exact_against_baseline(engine, masked, pairs)


def test_complete_rows_records_no_autograd_history(setup):
    """complete_rows is public (benchmarks, custom loops): it runs without grad whatever the caller's mode."""
    tok, model, masked, pairs = setup
    engine = BDHSEngine(model, tok, _sim(0.0), BDHSConfig(mode="attn", max_new_tokens=3))
    seen = []
    handle = engine.adapter.decoder.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    try:
        with torch.enable_grad():
            engine.complete_rows(pairs[:1], 1)
    finally:
        handle.remove()
    assert seen and not any(seen)


@pytest.mark.parametrize("kind,transform", [("gemma2", dict(final_logit_softcapping=0.05)),  # its logits are ~0.3
                                            ("cohere", dict(logit_scale=0.3))])
def test_next_token_logits_are_the_models_own(setup, kind, transform):
    """The engine samples from the model's logits, including its family's transform of the LM head's output
    (Gemma-2's soft-capping, Cohere's scale: mmalign.models.logits), not from the head's raw output."""
    tok = setup[0]
    model = M.causal_lm(kind, len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                        **transform).eval()
    engine = BDHSEngine(model, tok, _sim(0.0), BDHSConfig(mode="attn", max_new_tokens=5))
    ids = torch.tensor(tok("USER : Describe the image . ASSISTANT :")["input_ids"])[None]
    with torch.no_grad():
        own = model(input_ids=ids).logits[0].float()
        hidden = engine.adapter.decoder(input_ids=ids).last_hidden_state[0]
        raw = engine.adapter.head(hidden).float()
        ours = engine._logits(hidden)
    assert (raw - own).abs().max() > 0.1  # the transform matters here
    torch.testing.assert_close(ours, own)


def test_an_empty_candidate_is_never_embedded_nor_accepted_when_guided(setup):
    """A model that ends every response at once: the unguided last try is empty; the sentence model is never asked
    to embed an empty text (a BERT-style model crashes on zero tokens), and the guided tries are not accepted."""
    tok, model, _, pairs = setup
    engine = BDHSEngine(model, tok, None, BDHSConfig(mode="attn", tries=2, max_new_tokens=3, max_response_tokens=3))
    asked = []

    def similarity(a, b):
        asked.extend(a)
        return torch.full((len(a),), 0.99)  # guided candidates: too similar, so the unguided try runs

    engine.similarity = similarity
    eos = torch.full((len(tok),), -1e9)
    eos[tok.eos_token_id] = 0.0
    engine._logits = lambda hidden: eos.expand(*hidden.shape[:-1], -1)
    results = engine.generate(pairs[:2])
    assert asked and all(text.strip() for text in asked)
    assert [(r.rejected, r.tries, r.guided, r.similarity) for r in results] == [("", 2, False, 1.0)] * 2


def test_the_engines_draws_follow_eq6_and_cut_the_ground_truth(setup):
    """engine.draw() itself (the tests above give the engine draws of their own): image tokens stay visible iff
    rho >= rho_th (none at rho_th = 1, all at 0, about half at 0.5 of 16 x 30 draws), text always; the ids are the
    prompt then y+; every head not swapped is a prefix of its sentence, and its span holds its tokens."""
    tok, model, _, pairs = setup
    image = M.prompt_ids(tok, "x", 1)[1 + len(tok("USER :", add_special_tokens=False)["input_ids"])]
    kept = 0
    for rho_th, expect in ((1.0, 0), (0.0, None), (0.5, None)):
        engine = BDHSEngine(model, tok, _sim(0.0), BDHSConfig(mode="attn", rho_th=rho_th, swap_p=0.0))
        for t in range(1, 31):
            d = engine.draw(pairs[0], t)
            is_image = d.ids[0] == image
            assert d.keep[0][~is_image].all()
            n = int(d.keep[0][is_image].sum())
            if expect is not None:
                assert n == expect
            elif rho_th == 0.0:
                assert n == int(is_image.sum())
            else:
                kept += n
    assert 0.35 * 16 * 30 < kept < 0.65 * 16 * 30
    d = engine.draw(pairs[0], 1)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert d.ids[0].tolist() == pairs[0].prompt_ids.tolist() + ids(" ".join(d.plan.sentences))
    for sentence, head, (start, end) in zip(d.plan.sentences, d.plan.heads, d.spans):
        assert sentence.startswith(head) and d.response[start:end] == ids(head)
