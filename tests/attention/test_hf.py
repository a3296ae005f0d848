"""attn_implementation="mmalign_masked" in tiny random Llama / LLaVA / LLaVA-NeXT models built from configs:
no mask equals sdpa, the masked full sequence equals the compacted sequence with original position ids
(float64, exact up to rounding), KV-cache decoding equals prefill, batched left-padded generation
equals generating each sample alone."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("mmalign.attention.hf")
try:
    hf.register()
except ImportError as e:  # pragma: no cover - old transformers on some GPU boxes
    pytest.skip(str(e), allow_module_level=True)

from mmalign.attention import compact_image_tokens, sample_image_keep  # noqa: E402

IMAGE = 63
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=1)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
              patch_size=8)


def _pair(cls, config, dtype):
    """The same random weights with sdpa and with mmalign_masked attention."""
    torch.manual_seed(0)
    ref = cls._from_config(config, attn_implementation="sdpa").to(dtype).eval()
    masked = cls._from_config(config, attn_implementation="mmalign_masked").to(dtype).eval()
    masked.load_state_dict(ref.state_dict())
    return ref, masked


def _llama(dtype=torch.float64):
    return _pair(transformers.LlamaForCausalLM, transformers.LlamaConfig(**TEXT), dtype)


def _llava(dtype=torch.float64):
    cfg = transformers.LlavaConfig(vision_config=VISION, text_config=TEXT, image_token_id=IMAGE,
                                   vision_feature_layer=-1)
    return _pair(transformers.LlavaForConditionalGeneration, cfg, dtype)


def _llava_next(dtype=torch.float64):
    cfg = transformers.LlavaNextConfig(vision_config=VISION, text_config=TEXT, image_token_id=IMAGE,
                                       image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]], vision_feature_layer=-1)
    return _pair(transformers.LlavaNextForConditionalGeneration, cfg, dtype)


def _prompt(rng, n_image, before=3, after=6):
    text = lambda n: torch.randint(2, IMAGE, (n,), generator=rng)  # noqa: E731
    return torch.cat([text(before), torch.full((n_image,), IMAGE), text(after)])


def _image_inputs(model, rng, dtype):
    if isinstance(model, transformers.LlavaNextForConditionalGeneration):
        px = torch.randn(2, 3, 3, 32, 32, generator=rng, dtype=dtype)
        sizes = torch.tensor([[32, 64], [64, 32]])
        counts = [t.shape[0] for t in model.model.get_image_features(pixel_values=px, image_sizes=sizes).pooler_output]
        return dict(pixel_values=px, image_sizes=sizes), counts
    return dict(pixel_values=torch.randn(2, 3, 32, 32, generator=rng, dtype=dtype)), [16, 16]


def _batch(prompts):
    """Left-pad to a batch: input_ids, attention_mask."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    return ids, mask


def test_no_mask_equals_sdpa(rng):
    dtype = torch.float32
    ref, masked = _llama(dtype)
    ids, mask = _batch([torch.randint(2, 60, (n,), generator=rng) for n in (20, 13)])
    with torch.no_grad():
        torch.testing.assert_close(masked(ids, attention_mask=mask).logits[mask.bool()],
                                   ref(ids, attention_mask=mask).logits[mask.bool()], rtol=1e-4, atol=1e-4)


def test_attention_features_it_lacks_are_refused(rng):
    """Attention soft-capping (Gemma-2) and a sliding window shorter than the keys (Mistral) raise, naming the
    feature, instead of attending without them; a window longer than the keys changes nothing and runs."""
    gemma = transformers.Gemma2ForCausalLM._from_config(transformers.Gemma2Config(**TEXT, head_dim=8),
                                                         attn_implementation="mmalign_masked").eval()
    ids = torch.randint(2, 60, (1, 12), generator=rng)
    with pytest.raises(ValueError, match=r"Gemma2Attention soft-caps its attention scores \(softcap=50.0\)"):
        gemma(ids)
    ref, masked = _pair(transformers.MistralForCausalLM, transformers.MistralConfig(**TEXT, sliding_window=8),
                        torch.float64)
    with pytest.raises(ValueError, match="sliding window of 8 keys and this call has 12"):
        masked(ids)
    with torch.no_grad():
        torch.testing.assert_close(masked(ids[:, :8]).logits, ref(ids[:, :8]).logits)


@pytest.mark.parametrize("build", [_llama, _llava, _llava_next], ids=["llama", "llava", "llava-next"])
def test_masked_full_sequence_equals_compacted_sequence(rng, build):
    ref, masked = build(torch.float64)
    extra, counts = ({}, [24, 24]) if build is _llama else _image_inputs(ref, rng, torch.float64)
    ids, attn = _batch([_prompt(rng, n, after=5 + 3 * i) for i, n in enumerate(counts)])
    keep = sample_image_keep(ids == IMAGE, 0.7, generator=torch.Generator().manual_seed(1))
    keep[0, (ids[0] == IMAGE).nonzero()[0]] = False  # some hidden for sure
    seen = {}
    lm = masked.model.language_model if build is not _llama else masked.model
    hook = lm.register_forward_pre_hook(lambda mod, args, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad(), hf.hidden_keys(keep):
        full = masked(input_ids=ids, attention_mask=attn, **extra).logits
    hook.remove()
    embeds = seen.get("inputs_embeds")
    if embeds is None:
        embeds = ref.model.embed_tokens(ids)
    positions = seen.get("position_ids")  # what the masked run used (forward: arange, padding included)
    positions = torch.arange(ids.shape[1]).expand_as(ids) if positions is None else positions.expand_as(ids)
    c = compact_image_tokens(embeds, keep, attention_mask=attn, position_ids=positions)
    head = ref.lm_head
    ref_lm = ref.model.language_model if build is not _llama else ref.model
    with torch.no_grad():
        hidden = ref_lm(inputs_embeds=c.inputs_embeds, attention_mask=c.attention_mask,
                        position_ids=c.position_ids).last_hidden_state
        compact = head(hidden)
    for b in range(2):
        valid = c.index[b] >= 0
        torch.testing.assert_close(full[b, c.index[b][valid]], compact[b, valid], rtol=1e-10, atol=1e-10)


def test_kv_cache_decode_equals_prefill_and_kwargs_equal_context(rng):
    ref, masked = _llama(torch.float32)
    ids = torch.randint(2, 60, (2, 30), generator=rng)
    keep = torch.rand(2, 30, generator=rng) > 0.5
    keep[:, 0] = True
    new = torch.randint(2, 60, (2, 3), generator=rng)
    with torch.no_grad():
        with hf.hidden_keys(keep):
            out = masked(ids, use_cache=True)
            cache, steps = out.past_key_values, []
            for t in range(3):
                step = masked(new[:, t:t + 1], past_key_values=cache, use_cache=True)
                cache = step.past_key_values
                steps.append(step.logits[:, -1])
            whole = masked(torch.cat([ids, new], 1)).logits
        via_kwargs = masked(ids, mmalign_key_keep=keep).logits
    torch.testing.assert_close(torch.stack(steps, 1), whole[:, 30:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(via_kwargs, out.logits, rtol=0, atol=0)


def test_batched_left_padded_generation_equals_one_by_one(rng):
    ref, masked = _llava(torch.float64)
    extra, counts = _image_inputs(ref, rng, torch.float64)
    prompts = [_prompt(rng, 16, after=4), _prompt(rng, 16, after=9)]
    keeps = [sample_image_keep(p[None] == IMAGE, 0.8, generator=torch.Generator().manual_seed(i))[0]
             for i, p in enumerate(prompts)]
    ids, attn = _batch(prompts)
    keep, _ = _batch(keeps)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad(), hf.hidden_keys(keep.bool()):
        together = masked.generate(input_ids=ids, attention_mask=attn, **extra, **kw)[:, ids.shape[1]:]
    for i, (p, k) in enumerate(zip(prompts, keeps)):
        with torch.no_grad(), hf.hidden_keys(k[None]):
            alone = masked.generate(input_ids=p[None], pixel_values=extra["pixel_values"][i:i + 1], **kw)
        assert torch.equal(together[i], alone[0, len(p):])


def test_holes_in_the_2d_mask_would_shift_positions(rng):
    """Why the mask must not go through attention_mask: generate() renumbers positions from it."""
    ref, masked = _llama(torch.float64)
    ids = torch.randint(2, 60, (1, 24), generator=rng)
    keep = torch.ones(1, 24, dtype=torch.bool)
    keep[0, 5:15] = False
    kw = dict(max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        with hf.hidden_keys(keep):
            right = masked.generate(ids, **kw).scores[0]
        holes = ref.generate(ids, attention_mask=keep.long(), **kw).scores[0]
        explicit = ref(ids, attention_mask=keep.long(), position_ids=torch.arange(24)[None]).logits[:, -1]
    torch.testing.assert_close(right, explicit.to(right.dtype))  # generate() returns float32 scores
    assert (right - holes).abs().max() > 1e-4


def test_layers_share_one_mask_preparation(rng, monkeypatch):
    """The layers of one forward pass the same mask tensors: the masks and the kernel's kept-key index are
    built once per forward, rebuilt for a new mask or after an in-place change, with unchanged results."""
    from mmalign.attention import masked

    calls = []
    monkeypatch.setattr(masked, "kept_key_index", lambda k, f=masked.kept_key_index: calls.append(1) or f(k))
    ref, model = _llama(torch.float32)
    assert model.config.num_hidden_layers == 2
    ids = torch.randint(2, 60, (2, 20), generator=rng)
    keep = torch.rand(2, 20, generator=rng) > 0.5
    keep[:, 0] = True
    with torch.no_grad():
        first = model(ids, mmalign_key_keep=keep).logits
        if not calls:
            pytest.skip("masked_attention ran its reference backend here (no Triton)")
        assert len(calls) == 1
        assert torch.equal(model(ids, mmalign_key_keep=keep).logits, first) and len(calls) == 1
        keep[1, 5:10] = ~keep[1, 5:10]  # in place: the version changes, the preparation is redone
        changed = model(ids, mmalign_key_keep=keep).logits
        assert len(calls) == 2
        fresh = model(ids, mmalign_key_keep=keep.clone()).logits
    assert len(calls) == 3
    torch.testing.assert_close(changed, fresh, rtol=0, atol=0)
    assert not torch.equal(changed[1], first[1]) and torch.equal(changed[0], first[0])


def test_masks_made_under_inference_mode(rng):
    """Inference tensors have no version counter: their masks are prepared on every call, with the same
    results as under no_grad."""
    ref, model = _llama(torch.float32)
    ids = torch.randint(2, 60, (2, 20), generator=rng)
    keep = torch.rand(2, 20, generator=rng) > 0.5
    keep[:, 0] = True
    with torch.no_grad():
        expected = model(ids, mmalign_key_keep=keep).logits
    with torch.inference_mode():
        inf_keep = keep.clone()
        first = model(ids, mmalign_key_keep=inf_keep).logits
        inf_keep[1, 5:10] = ~inf_keep[1, 5:10]  # in place, undetectable by a version counter
        changed = model(ids, mmalign_key_keep=inf_keep).logits
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(changed, model(ids, mmalign_key_keep=inf_keep.clone()).logits, rtol=0, atol=0)
