"""patch_sequence_logps: fused log-probs equal the eager ones (and their gradients) on a tiny Llama and a
tiny LLaVA; generation is unchanged; undo restores the original forward; unknown model types are refused."""
import pytest
import torch

from mmalign import synthetic
from mmalign.integrations.hf import MODELS, patch_sequence_logps


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
    model.config.model_type = "not-a-model"
    with pytest.raises(ValueError, match="not in mmalign.integrations.hf.MODELS"):
        patch_sequence_logps(model)
    assert "llava_next" in MODELS
