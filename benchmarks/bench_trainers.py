"""Whole trainers, same model, data, batch and precision: mmalign's Trainer (DeepSpeed ZeRO-0, fused log-probs,
DAMOLoss with the dpo / damo preset) against TRL's DPOTrainer (when trl is installed), a few optimizer
steps each, timed from the first step to the last (trainer construction, tokenization by TRL at init and
DeepSpeed's initialization are outside the timed region; mmalign tokenizes on the fly, inside it; neither
writes a checkpoint). Not in --quick.

Text-only causal LM built from a config with random weights, synthetic caption pairs, reference
log-probs from a frozen copy of the initial model in both. CPU: 4-layer 256-wide Llama, 32k vocabulary,
8 pairs per step, fp32. GPU: 16-layer 2048-wide (~1B), 8 pairs, bf16. pairs/s = steps x pairs / time."""
import json
import os
import tempfile

import pytest
import torch

from mmalign import synthetic

from conftest import run_case

PROVIDERS = ["trl", "mmalign-dpo", "mmalign-damo"]
STEPS = 3


def _setup(device, quick):
    from transformers import LlamaConfig, LlamaForCausalLM

    gpu = device == "cuda"
    tok = synthetic.word_tokenizer(image_token=None)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048 if gpu else 256, intermediate_size=5632 if gpu else 512,
                      num_hidden_layers=16 if gpu else (2 if quick else 4), num_attention_heads=16 if gpu else 4,
                      num_key_value_heads=8 if gpu else 2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
    dtype = torch.bfloat16 if gpu else torch.float32

    def model():
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).to(device, dtype)

    work = tempfile.mkdtemp(prefix="mmalign-bench-trainers-")
    rows = synthetic.make_pairs(64, __import__("pathlib").Path(work) / "images")
    with open(os.path.join(work, "pairs.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "prompt": "Describe the image ."}) + "\n")
    return tok, model, dtype, work, rows


@pytest.mark.parametrize("provider", PROVIDERS)
def test_trainer_steps(benchmark, device, quick, provider):
    if quick:
        pytest.skip("--quick: whole trainers take minutes")
    tok, model, dtype, work, rows = _setup(device, quick)
    pairs = 8
    if provider == "trl":
        datasets = pytest.importorskip("datasets")
        trl = pytest.importorskip("trl")
        ds = datasets.Dataset.from_list([{"prompt": "USER : Describe the image . ASSISTANT :", "chosen": r["chosen"],
                                          "rejected": r["rejected"]} for r in rows])

        def make():
            args = trl.DPOConfig(output_dir=os.path.join(work, "trl"), per_device_train_batch_size=pairs,
                                 max_steps=STEPS, learning_rate=1e-5, beta=0.1, report_to=[], save_strategy="no",
                                 use_cpu=device == "cpu", bf16=dtype == torch.bfloat16, logging_steps=STEPS,
                                 disable_tqdm=True, max_length=128)
            return (trl.DPOTrainer(model=model(), ref_model=model(), args=args, train_dataset=ds,
                                   processing_class=tok),)
    else:
        pytest.importorskip("deepspeed")
        from mmalign.train import Trainer, TrainConfig

        def make():
            cfg = TrainConfig(data=os.path.join(work, "pairs.jsonl"), output_dir=tempfile.mkdtemp(dir=work),
                              loss=provider.split("-")[1], reference="model", micro_batch_size=pairs, max_steps=STEPS,
                              lr=1e-5, bf16=dtype == torch.bfloat16, progress=False, tensorboard=False,
                              resume=False, save_final=False, max_length=128)
            return (Trainer(cfg, model=model(), processor=tok),)

    benchmark.group = f"trainer {STEPS} steps x {pairs} pairs"
    run_case(benchmark, device, lambda t: t.train(), make, op="trainer", mode=f"{STEPS} steps", provider=provider,
             shape=f"{STEPS} steps x {pairs} pairs {str(dtype).replace('torch.', '')}", pairs=STEPS * pairs,
             rounds=1 if device == "cpu" else 2)
