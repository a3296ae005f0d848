"""DAMODPOTrainer inside TRL's DPOTrainer on a tiny Llama on CPU: with the dpo preset it reproduces TRL's
own sigmoid DPO losses step by step; with the damo preset it trains and logs the DAMO statistics."""
import math

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from mmalign import synthetic  # noqa: E402
from mmalign.nn import DAMOConfig, DAMOLoss  # noqa: E402


def _setup(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import DPOConfig

    tok = synthetic.word_tokenizer(image_token=None)
    rows = synthetic.make_pairs(8, tmp_path / "images")
    ds = datasets.Dataset.from_list([{"prompt": "USER : Describe the image . ASSISTANT :", "chosen": r["chosen"],
                                      "rejected": r["rejected"]} for r in rows])
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)

    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg)

    def args(name, **kw):
        kw = {"learning_rate": 1e-3, "max_steps": 3, "max_length": 64, "beta": 0.1, **kw}
        return DPOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, logging_steps=1,
                         report_to=[], use_cpu=True, save_strategy="no", seed=0, **kw)

    return tok, ds, model, args


def _losses(trainer):
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_dpo_preset_matches_trl(tmp_path):
    from trl import DPOTrainer

    from mmalign.integrations.trl import DAMODPOTrainer

    tok, ds, model, args = _setup(tmp_path)
    # fp32 and SGD: two correct implementations then agree to float32 rounding at every step (bf16 rounds
    # the two heads differently, and Adam's m / sqrt(v) turns rounding in near-zero gradients into
    # lr-sized steps)
    fp32_sgd = {"bf16": False, "optim": "sgd", "learning_rate": 2.0}
    ours = DAMODPOTrainer(model=model(), ref_model=model(), args=args("ours", **fp32_sgd), train_dataset=ds,
                          processing_class=tok, damo_loss=DAMOLoss(0.1, DAMOConfig.from_preset("dpo")))
    theirs = DPOTrainer(model=model(), ref_model=model(), args=args("theirs", **fp32_sgd), train_dataset=ds,
                        processing_class=tok)
    a, b = _losses(ours), _losses(theirs)
    assert len(a) == 3 and a[0] == pytest.approx(math.log(2), abs=1e-7)  # policy == reference at step 0
    assert abs(a[2] - a[0]) > 1e-2  # the steps move the loss: later steps compare real updates
    assert a == pytest.approx(b, rel=1e-5)


def test_peft_model_without_ref_model_matches_trl(tmp_path):
    """A LoRA policy and no ref_model: the reference is the base model with the adapter off, as in TRL, and with
    the dpo preset the losses equal TRL's step by step (the adapter starts at zero: log 2 at step 0)."""
    peft = pytest.importorskip("peft")
    from trl import DPOTrainer

    from mmalign.integrations.trl import DAMODPOTrainer

    tok, ds, model, args = _setup(tmp_path)

    def lora():
        torch.manual_seed(1)
        return peft.get_peft_model(model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))

    fp32_sgd = {"bf16": False, "optim": "sgd", "learning_rate": 2.0}
    ours = DAMODPOTrainer(model=lora(), ref_model=None, args=args("ours", **fp32_sgd), train_dataset=ds,
                          processing_class=tok, damo_loss=DAMOLoss(0.1, DAMOConfig.from_preset("dpo")))
    theirs = DPOTrainer(model=lora(), ref_model=None, args=args("theirs", **fp32_sgd), train_dataset=ds,
                        processing_class=tok)
    a, b = _losses(ours), _losses(theirs)
    assert len(a) == 3 and a[0] == pytest.approx(math.log(2), abs=1e-7)
    assert abs(a[2] - a[0]) > 1e-3
    assert a == pytest.approx(b, rel=1e-5)


def test_reference_runs_in_the_policys_precision(tmp_path):
    """Under bf16 mixed precision accelerate wraps the models' forwards in autocast; the reference's fused
    log-probs must run under it too, or identical weights give nonzero log-ratios at the first step."""
    from mmalign.integrations.trl import DAMODPOTrainer

    tok, ds, model, args = _setup(tmp_path)
    ours = DAMODPOTrainer(model=model(), ref_model=model(), args=args("ours", bf16=True, max_steps=1),
                          train_dataset=ds, processing_class=tok,
                          damo_loss=DAMOLoss(0.1, DAMOConfig.from_preset("dpo")))
    assert _losses(ours)[0] == pytest.approx(math.log(2), abs=1e-7)


def test_damo_preset_trains_and_logs(tmp_path):
    from mmalign.integrations.trl import DAMODPOTrainer

    tok, ds, model, args = _setup(tmp_path)
    trainer = DAMODPOTrainer(model=model(), ref_model=model(), args=args("damo"), train_dataset=ds,
                             processing_class=tok, damo_loss=DAMOLoss(0.1, DAMOConfig.from_preset("damo")))
    losses = _losses(trainer)
    logged = [h for h in trainer.state.log_history if "damo/alpha_m" in h]
    assert len(losses) == 3 and len(logged) == 3 and logged[-1]["damo/kept"] == 3  # floor(0.8 * 4)
    assert float(trainer.damo_loss.running_mean) != 0.0


def test_vlm_dpo_preset_matches_trl(tmp_path):
    """A tiny LLaVA with its processor and images, TRL's conversational VLM data: the patch's multimodal fused
    log-probs give TRL's own DPO losses step by step (the dpo preset)."""
    from PIL import Image
    from trl import DPOTrainer

    from mmalign.integrations.trl import DAMODPOTrainer

    _, _, _, args = _setup(tmp_path)
    tok = synthetic.word_tokenizer()
    processor = synthetic.llava_processor(tok, chat_template=synthetic.CHAT_TEMPLATE)
    rows = synthetic.make_pairs(8, tmp_path / "images")
    ds = datasets.Dataset.from_list([
        {"images": [Image.open(tmp_path / "images" / r["image"]).convert("RGB")],
         "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image ."}]}],
         "chosen": [{"role": "assistant", "content": [{"type": "text", "text": r["chosen"]}]}],
         "rejected": [{"role": "assistant", "content": [{"type": "text", "text": r["rejected"]}]}]} for r in rows])

    def model():
        return synthetic.tiny_llava(tok, seed=0)

    fp32_sgd = {"bf16": False, "optim": "sgd", "learning_rate": 2.0, "max_length": None}
    ours = DAMODPOTrainer(model=model(), ref_model=model(), args=args("ours", **fp32_sgd), train_dataset=ds,
                          processing_class=processor, damo_loss=DAMOLoss(0.1, DAMOConfig.from_preset("dpo")))
    theirs = DPOTrainer(model=model(), ref_model=model(), args=args("theirs", **fp32_sgd), train_dataset=ds,
                        processing_class=processor)
    a, b = _losses(ours), _losses(theirs)
    assert len(a) == 3 and a[0] == pytest.approx(math.log(2), abs=1e-7)
    assert abs(a[2] - a[0]) > 1e-3
    assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("dpo,loss,match", [
    (dict(loss_type="ipo"), {}, r"loss_type: DAMODPOTrainer's loss is damo_loss \(loss_type='sigmoid'\)"),
    (dict(loss_type=["sigmoid", "sft"]), {}, "loss_type"),
    (dict(label_smoothing=0.1), {}, "label_smoothing: DAMODPOTrainer's loss is damo_loss"),
    (dict(beta=0.3), dict(beta=0.2), "beta: DPOConfig has beta=0.3 and damo_loss beta=0.2"),
    (dict(ld_alpha=0.5), {}, "ld_alpha: DAMODPOTrainer's loss"),
    (dict(use_weighting=True), {}, "use_weighting"),
    (dict(loss_type="ipo", beta=0.3), dict(config=DAMOConfig.from_preset("dpo", loss_type="ipo"), beta=0.3),
     None),  # they agree
    (dict(beta=0.3), None, None),  # no damo_loss: the default one takes DPOConfig's beta
])
def test_trl_loss_options_it_does_not_read_are_refused(tmp_path, dpo, loss, match):
    """DPOConfig's loss options would be silently ignored (the loss is damo_loss): they raise unless they agree."""
    from mmalign.integrations.trl import DAMODPOTrainer

    tok, ds, model, args = _setup(tmp_path)

    def build():
        return DAMODPOTrainer(model=model(), ref_model=model(), args=args("x", **dpo), train_dataset=ds,
                              processing_class=tok, damo_loss=None if loss is None else DAMOLoss(**loss))

    if match is None:
        assert build().damo_loss.beta == dpo["beta"]
    else:
        with pytest.raises(ValueError, match=match):
            build()

