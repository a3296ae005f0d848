"""patch_sequence_logps: fused log-probs equal the eager ones (and their gradients) on a tiny Llama and a
tiny LLaVA, and every causal LM family of mmalign.models.FAMILIES; generation is unchanged; undo restores the
original forward; a model type outside the table runs through the generic path. (Every VLM family: tests/models.)"""
import pytest
import torch

from mmalign import synthetic
from mmalign.integrations.hf import patch_sequence_logps
from mmalign.models import FAMILIES, UnsupportedModel


def _llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        pad_token_id=tok.pad_token_id)).double()


def _eager(model, ids, labels, **kw):
    logits = model(input_ids=ids, **kw).logits[:, :-1].double()
    target = labels[:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, target.clamp_min(0)[..., None])[..., 0]
    return lp.masked_fill(target == -100, 0.0)


@pytest.mark.parametrize("kind", ["llama", "llava"])
def test_fused_log_probs_equal_eager(rng, kind):
    tok = synthetic.word_tokenizer()
    model = _llama(tok) if kind == "llama" else synthetic.tiny_llava(tok, dtype=torch.float64)
    n_image = 16 if kind == "llava" else 0
    ids = torch.randint(4, len(tok) - 1, (2, 12 + n_image), generator=rng)
    kw = {}
    if kind == "llava":
        ids[:, 2:2 + n_image] = tok.convert_tokens_to_ids("<image>")
        kw["pixel_values"] = torch.randn(2, 3, 32, 32, generator=rng, dtype=torch.float64)
    labels = ids.clone()
    labels[:, :n_image + 5] = -100
    labels[1, -2:] = -100
    ref = _eager(model, ids, labels, **kw)
    ref.sum().backward()
    grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    undo = patch_sequence_logps(model)
    out = model(input_ids=ids, labels=labels, fused_lm_head=True, **kw)
    torch.testing.assert_close(out.log_probs, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.logps, ref.sum(1), rtol=1e-10, atol=1e-10)
    out.log_probs.sum().backward()
    torch.testing.assert_close(model.lm_head.weight.grad, grad, rtol=1e-9, atol=1e-10)
    plain = model(input_ids=ids, **kw).logits  # without the flag: the original forward
    assert plain.shape == (2, ids.shape[1], len(tok))
    undo()
    assert "forward" not in vars(model)
    assert model(input_ids=ids, labels=labels, **kw).logits is not None  # the stock forward again


CAUSAL = sorted(name for name, family in FAMILIES.items() if family.kind == "causal")
MOE = {"mixtral", "qwen3_moe", "granitemoe", "granitemoeshared"}  # routed experts: float32 matmuls only
LOGIT_TRANSFORMS = {"gemma2": dict(final_logit_softcapping=0.5), "gemma3_text": dict(final_logit_softcapping=0.5),
                    "cohere": dict(logit_scale=0.3), "cohere2": dict(logit_scale=0.3),
                    "granite": dict(logits_scaling=4.0), "granitemoe": dict(logits_scaling=4.0),
                    "granitemoeshared": dict(logits_scaling=4.0)}


@pytest.mark.parametrize("kind", CAUSAL)
def test_every_causal_lm_family_gives_its_own_log_probs(rng, kind):
    """Each causal LM of the table, tiny and random: the fused log-probs equal log_softmax of the model's own
    logits, including the families that transform them (Gemma-2/3 soft-capping, Cohere's scale, Granite's
    divisor: set far from neutral here, so that the head's raw output would be far off)."""
    from ..bdhs import _models as M

    dtype = torch.float32 if kind in MOE else torch.float64
    try:
        model = M.causal_lm(kind, 97, dtype, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2, num_local_experts=4, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=32, **LOGIT_TRANSFORMS.get(kind, {})).eval()
    except ValueError:
        pytest.skip(f"this transformers has no {kind}")
    ids = torch.randint(3, 97, (2, 10), generator=rng)
    labels = ids.clone()
    labels[:, :4] = -100
    ref = _eager(model, ids, labels)
    undo = patch_sequence_logps(model)
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.log_probs.double(), ref, **tol)
    undo()


def test_an_unknown_logit_transform_is_refused():
    """A family whose entry names no logit transform, but whose config announces one."""
    from mmalign.models import logit_transform

    tok = synthetic.word_tokenizer()
    model = _llama(tok)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="model type 'llama': its config sets final_logit_softcapping=30.0"):
        patch_sequence_logps(model)
    model.config.final_logit_softcapping, model.config.logits_scaling = None, 1.0  # neutral values pass
    assert logit_transform(model).kwargs() == dict(logit_scale=1.0, logit_softcap=None)


def test_generation_is_unchanged_and_errors():
    tok = synthetic.word_tokenizer()
    model = _llama(tok).eval()
    ids = torch.tensor([tok("The image shows one red circle", add_special_tokens=False)["input_ids"]])
    before = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    undo = patch_sequence_logps(model)
    after = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(before, after)
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=ids, fused_lm_head=True)
    undo()
    assert "llava_next" in FAMILIES


def test_a_model_type_outside_the_table_runs_through_the_generic_path(rng):
    """A family mmalign.models does not know, whose decoder takes the embeddings alone: the patch computes its log-probs
    (the model's own forward up to its decoder, then the fused head); one without an LM head is refused."""
    tok = synthetic.word_tokenizer()
    model = _llama(tok)
    model.config.model_type = "not-a-model"
    ids = torch.randint(4, len(tok) - 1, (2, 9), generator=rng)
    labels = ids.clone()
    labels[:, :3] = -100
    ref = _eager(model, ids, labels)
    undo = patch_sequence_logps(model)
    torch.testing.assert_close(model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs, ref)
    undo()
    with pytest.raises(UnsupportedModel, match="cannot find its decoder and lm_head"):
        patch_sequence_logps(model.model)
