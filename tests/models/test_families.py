"""Every VLM family through every model path of mmalign (docs/math.md §9), each against the model's own forward, float64:

* the trainer's pair log-probs (shared-prompt and two-sequence layouts) and their gradients equal the log-probs of
  the model's own forward on each [prompt | response] sequence;
* the Hugging Face patch (the TRL path) equals the model's own logits;
* the BDHS engine's greedy tokens equal ``generate()`` from the same prompt;
* with hidden image tokens, the compacted engine equals ``generate()`` on the full sequence whose decoder never
  lets any query read a hidden image key (docs/math.md §7's equivalence; 3D positions for the M-RoPE families);
* families that cannot run a path refuse it, naming the reason.

The oracles run the model's own forward or ``generate``; the only thing they add is the per-token inputs for the
longer sequence (as the family's processor would give them) and, for hiding, a 4D mask rewritten on the way into the
decoder."""
from __future__ import annotations

import pytest
import torch

from mmalign.bdhs import BDHSConfig, BDHSEngine, PairInput
from mmalign.integrations.hf import patch_sequence_logps
from mmalign.models import UnsupportedModel, adapter_for
from mmalign.train.batches import PairExample, pair_logps, shares_prompt

from . import zoo

# What a family's processor gives per token past the prompt (the oracle's own knowledge, not mmalign's table)
FILL = {"paligemma": {"token_type_ids": 1}}
REPEAT = {"mllama": ("cross_attention_mask",)}
NO_BDHS = {"lfm2_vl", "mllama"}           # refused by the engine, with the reason
TWO_SEQUENCES_ONLY = {"lfm2_vl"}         # convolution layers: no shared-prompt layout


def _extend(name: str, inputs: dict, prompt_len: int, width: int) -> dict:
    out = dict(inputs)
    for key, value in inputs.items():
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[1] != prompt_len or width == prompt_len:
            continue
        if key in REPEAT.get(name, ()):
            tail = value[:, -1:].expand(-1, width - prompt_len, *value.shape[2:])
        elif key in ("token_type_ids", "mm_token_type_ids"):
            tail = value.new_full((value.shape[0], width - prompt_len), FILL.get(name, {}).get(key, 0))
        else:
            continue
        out[key] = torch.cat([value, tail], 1)
    return out


def _own_logps(s, responses) -> torch.Tensor:
    """sum_t log p(response_t | prompt, response_<t) from the model's own forward on each sequence."""
    P = len(s.prompt_ids)
    out = []
    for resp in responses:
        ids = torch.cat([s.prompt_ids, torch.tensor(resp)])[None]
        logits = s.model(input_ids=ids, **_extend(s.name, s.image_inputs, P, ids.shape[1])).logits[0]
        lp = torch.log_softmax(logits[P - 1:-1].double(), -1)
        out.append(lp.gather(-1, torch.tensor(resp)[:, None]).sum())
    return torch.stack(out)


def _examples(s, rng) -> tuple[list[PairExample], list[list[int]]]:
    lo, hi = s.text_ids
    lengths = [(5, 3), (2, 4)]
    resp = [torch.randint(lo, hi, (n,), generator=rng).tolist() for pair in lengths for n in pair]
    examples = [PairExample(i, f"p{i}", s.prompt_ids, s.image_inputs, resp[2 * i], resp[2 * i + 1])
                for i in range(len(lengths))]
    return examples, resp


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layout", ["shared", "two"])
@pytest.mark.parametrize("name", zoo.VARIANTS)
def test_pair_logps_equal_the_models_own_forward(name, layout, rng):
    s = zoo.build(name)
    if layout == "shared" and not shares_prompt(s.model):
        assert name in TWO_SEQUENCES_ONLY, adapter_for(s.model).shared_prompt_reason()
        pytest.skip(f"{name}: {adapter_for(s.model).shared_prompt_reason()}")
    examples, resp = _examples(s, rng)
    own = _own_logps(s, resp)
    own.sum().backward()
    expected = _grads(s.model)
    s.model.zero_grad(set_to_none=True)
    chosen, rejected = pair_logps(s.model, examples, share_prompt=layout == "shared")
    got = torch.stack([chosen, rejected], 1).reshape(-1)
    torch.testing.assert_close(got, own)
    got.sum().backward()
    grads = _grads(s.model)
    assert grads.keys() == expected.keys()
    # Hugging Face's norms compute in float32 even in a float64 model (RMSNorms, Pixtral's and SigLIP's too). mmalign
    # runs the prompt (shared layout) or the image (both layouts) once per pair, so their gradient from both
    # responses is summed before those casts, not after: gradients agree to float32 rounding, relative to each
    # gradient's scale (Gemma-3's projector gradient reaches 2e3 here; a key bias's gradient is 0 up to rounding).
    # The forward is exact in float64.
    tol = 1e-6
    for key in expected:
        atol = tol * float(expected[key].abs().max()) + 1e-12
        torch.testing.assert_close(grads[key], expected[key], rtol=tol, atol=atol, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name", zoo.VARIANTS)
def test_patch_equals_the_models_own_logits(name, rng):
    s = zoo.build(name)
    lo, hi = s.text_ids
    P = len(s.prompt_ids)
    ids = torch.cat([s.prompt_ids, torch.randint(lo, hi, (6,), generator=rng)])[None]
    inputs = _extend(s.name, s.image_inputs, P, ids.shape[1])
    labels = ids.clone()
    labels[:, :P] = -100
    logits = s.model(input_ids=ids, **inputs).logits[0, :-1].double()
    own = torch.log_softmax(logits, -1).gather(-1, labels[0, 1:, None].clamp_min(0))[:, 0] * (labels[0, 1:] != -100)
    undo = patch_sequence_logps(s.model)
    out = s.model(input_ids=ids, labels=labels, fused_lm_head=True, **inputs)
    undo()
    torch.testing.assert_close(out.log_probs[0], own)


class IdTokenizer:
    """Token ids written as words ("t17 t18" <-> [17, 18]): the engine's tokenizer for models without one."""

    def __init__(self, vocab: int, eos: int):
        self.vocab, self.eos_token_id = vocab, eos

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [int(w[1:]) for w in text.split()]}

    def __len__(self) -> int:
        return self.vocab

    def convert_ids_to_tokens(self, ids):
        return [f"t{i}" for i in ids]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(f" t{i}" for i in ids)


def _engine(s, **config):
    vocab = s.model.get_output_embeddings().weight.shape[0]
    cfg = BDHSConfig(**{"tries": 1, "max_new_tokens": 4, "max_response_tokens": 4, **config})
    return BDHSEngine(s.model, IdTokenizer(vocab, s.eos_id), lambda a, b: torch.zeros(len(a)), cfg)


def _generate(s, new: int, hidden_keys: torch.Tensor | None = None) -> tuple[list[int], torch.Tensor]:
    """Greedy ``generate`` from the prompt: (tokens, logits of the first step). With ``hidden_keys`` (P,) bool (False
    = hidden), a pre-hook rewrites the decoder's attention mask on every call so that no query reads a hidden key
    (whatever mask the model built)."""
    hook = None
    if hidden_keys is not None:
        decoder = adapter_for(s.model).decoder
        hook = decoder.register_forward_pre_hook(_hiding(hidden_keys), with_kwargs=True)
    try:
        ids = s.prompt_ids[None]  # with its padding mask, as the processor gives it (Molmo2's bos is its pad token)
        out = s.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **s.image_inputs,
                               max_new_tokens=new, do_sample=False, min_new_tokens=new, output_logits=True,
                               return_dict_in_generate=True)
    finally:
        if hook is not None:
            hook.remove()
    return out.sequences[0, len(s.prompt_ids):].tolist(), out.logits[0][0]


def _hiding(keep: torch.Tensor):
    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        q = embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        k = past + q
        visible = torch.nn.functional.pad(keep, (0, k - len(keep)), value=True)[:k]
        causal = torch.arange(past, k)[:, None] >= torch.arange(k)[None, :]

        def rewrite(m):
            allowed = causal if m is None or m.dim() == 2 else (m if m.dtype == torch.bool else m == 0)[0, 0]
            allowed = allowed & visible[None, :]
            return allowed[None, None] if m is None or m.dtype == torch.bool or m.dim() == 2 else \
                torch.zeros_like(m).masked_fill(~allowed[None, None], torch.finfo(m.dtype).min)

        mask = kwargs.get("attention_mask")
        kwargs["attention_mask"] = ({key: rewrite(v) for key, v in mask.items()} if isinstance(mask, dict)
                                    else rewrite(mask))
        return args, kwargs

    return hook


def _pair(s) -> PairInput:
    return PairInput("pair-0", s.prompt_ids, "", s.image_inputs)


@pytest.mark.parametrize("name", zoo.VARIANTS)
def test_engine_greedy_tokens_equal_generate(name):
    s = zoo.build(name)
    if name in NO_BDHS:
        with pytest.raises(UnsupportedModel, match="BDHS"):
            _engine(s, mode="none")
        return
    rows = _engine(s, mode="none").complete_rows([_pair(s)], 1, unguided=True)
    tokens, logits = _generate(s, 4)
    torch.testing.assert_close(rows[0].first_logits, logits.float())
    assert _until_eos(rows[0].generated, s.eos_id) == _until_eos(tokens, s.eos_id)


@pytest.mark.parametrize("name", [v for v in zoo.VARIANTS if v not in NO_BDHS])
def test_compacted_engine_equals_the_masked_full_sequence(name):
    s = zoo.build(name)
    engine = _engine(s, mode="attn", rho_th=0.6, seed=3)
    keep = engine.draw(_pair(s), 1, unguided=True).keep[0]
    image = s.prompt_ids == adapter_for(s.model).image_token
    assert image.any() and (image & ~keep).any() and (image & keep).any()  # some hidden, some kept
    rows = engine.complete_rows([_pair(s)], 1, unguided=True)
    tokens, logits = _generate(s, 4, hidden_keys=keep)
    assert not torch.allclose(logits, _generate(s, 1)[1], rtol=0, atol=1e-9)  # hiding changes the logits
    torch.testing.assert_close(rows[0].first_logits, logits.float())
    assert _until_eos(rows[0].generated, s.eos_id) == _until_eos(tokens, s.eos_id)


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


def test_a_family_outside_the_table_is_refused_naming_the_input(monkeypatch):
    """Qwen2-VL's forward hands its decoder multimodal RoPE positions: were its entry missing, every path would refuse
    it naming position_ids and how to add an entry, never run without them. A LLaVA (embeddings alone) outside the
    table runs through the generic path, exactly."""
    from mmalign.models import FAMILIES

    monkeypatch.delitem(FAMILIES, "qwen2_vl")
    s = zoo.build("qwen2_vl")
    examples, _ = _examples(s, torch.Generator().manual_seed(0))
    with pytest.raises(UnsupportedModel, match=r"passes position_ids \(shape \(3, 2, .*FAMILIES has no entry for 'qwen2_vl'"):
        pair_logps(s.model, examples)
    with pytest.raises(UnsupportedModel, match="position_ids"):
        _engine(s, mode="attn").complete_rows([_pair(s)], 1, unguided=True)
    monkeypatch.delitem(FAMILIES, "llava")
    s = zoo.build("llava")
    examples, resp = _examples(s, torch.Generator().manual_seed(0))
    assert not shares_prompt(s.model)  # outside the table: the two-sequence layout only
    torch.testing.assert_close(torch.stack(pair_logps(s.model, examples), 1).reshape(-1), _own_logps(s, resp))


def test_families_that_cannot_run_bdhs_say_why():
    with pytest.raises(UnsupportedModel, match="convolution"):
        _engine(zoo.build("lfm2_vl"))
    with pytest.raises(UnsupportedModel, match="cross-attention"):
        _engine(zoo.build("mllama"))


def test_a_sliding_window_shorter_than_the_sequence_is_refused_by_the_engine():
    """Gemma-3's sliding window counts columns, which compaction and left-padded batches change: the engine refuses
    sequences that do not fit the window instead of decoding them inexactly."""
    s = zoo.build("gemma3")
    s.model.config.get_text_config().sliding_window = len(s.prompt_ids) + 2
    with pytest.raises(UnsupportedModel, match="sliding window"):
        _engine(s, mode="attn").complete_rows([_pair(s)], 1, unguided=True)


def test_the_two_sequence_layout_is_exact_past_a_sliding_window(rng):
    """Rows longer than Gemma-3's sliding window: the family's own masks count the window in columns, so the pairs'
    sequences are captured themselves (the image encoded twice) and the log-probs stay the model's own."""
    s = zoo.build("gemma3")
    s.model.config.get_text_config().sliding_window = len(s.prompt_ids) + 4
    examples, resp = _examples(s, rng)
    assert not shares_prompt(s.model, len(s.prompt_ids) + 8)
    torch.testing.assert_close(torch.stack(pair_logps(s.model, examples), 1).reshape(-1), _own_logps(s, resp))
