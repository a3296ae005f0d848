"""Whole trainers, same model, data, batch and precision: mmalign's Trainer (DeepSpeed ZeRO-0, fused log-probs,
DAMOLoss with the dpo / damo preset) against TRL's DPOTrainer (when trl is installed), a few optimizer
steps each, timed from the first step to the last (trainer construction, tokenization by TRL at init and
DeepSpeed's initialization are outside the timed region; mmalign tokenizes on the fly, inside it; neither
writes a checkpoint). Not in --quick.

Models built from configs with random weights, synthetic caption pairs, reference log-probs from a
frozen copy of the initial model in both (with LoRA: the base with the adapters off, in both). kind="text": a Llama;
kind="vlm": a LLaVA with 576 image tokens (336 px, 14 px patches), the same prompt format on both sides (a chat
template on the processor); kind="qwen2_5_vl": a Qwen2.5-VL-shaped model (multimodal RoPE, 2 KV heads, 256 image
tokens of a 448 px image) with its real processor, built offline.

What trains (the VLMs only): mmalign-dpo is the default recipe (the vision tower frozen, the LLM and the projector
trained); mmalign-dpo-full trains everything (what mmalign-dpo meant before 0.2.0, and what TRL trains);
mmalign-dpo-lora and trl-lora train the alignment study's LoRA (rank 128, scaling 256 on the LLM's linear layers,
the projector in full) with the same peft config on both sides.
CPU: 4-layer 256-wide decoder, 32k vocabulary, 8 pairs per step, fp32. GPU: 16-layer 2048-wide (~1B),
8 pairs, bf16 mixed precision (MMALIGN_BENCH_SHAPE, MMALIGN_BENCH_LAYERS, MMALIGN_BENCH_PRECISION: see
conftest.decoder_dims). pairs/s = steps x pairs / time. Memory: everything the trainer holds at
its peak, i.e. what its construction left allocated (both models, and what DeepSpeed allocates up front:
bf16 mode's fp32 master weights) plus the peak of train() above that (activations, gradients, the
optimizer moments both create at the first step).

The two do the same work in the same precision:
- Gradient checkpointing only where the provider says -ckpt: trl-ckpt is TRL >= 1.0's default (it turns
  checkpointing on unless told otherwise), trl without it is TRL's fastest; mmalign-*-ckpt checkpoint each
  decoder layer the same way (Hugging Face's gradient checkpointing: one more policy forward per step, the
  activations of a layer's input only).
- bf16 is mixed precision on both sides: fp32 master weights and fp32 Adam moments, bf16 compute. mmalign
  through DeepSpeed's bf16 mode (bf16 weights, fp32 master copy), and as mmalign-dpo-autocast through
  DeepSpeed's torch_autocast (fp32 weights under torch.autocast, the reference's linear layers in bf16);
  TRL through the Hugging Face Trainer's (an fp32 policy under bf16 autocast). A policy loaded in bf16 would make TRL train in pure bf16, whose
  weights cannot take DPO-sized updates (lr 5e-7 is below bf16's resolution). The frozen reference is bf16
  on both sides. MMALIGN_BENCH_PRECISION=fp32|bf16 overrides the device's default (a CPU check of the
  GPU setup)."""
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from mmalign import synthetic
from mmalign._measure import memory_left

from conftest import bench_dtype, decoder_dims, decoder_label, run_case

PROVIDERS = ["trl", "trl-ckpt", "mmalign-dpo", "mmalign-damo", "mmalign-dpo-autocast", "mmalign-dpo-ckpt",
             "mmalign-dpo-autocast-ckpt", "mmalign-dpo-full", "mmalign-dpo-lora", "trl-lora"]
STEPS = 3
LORA = {"r": 128, "alpha": 256, "target": "llm"}  # the alignment study's (docs/math.md section 11)


def _qwen(device, quick):
    """A Qwen2.5-VL-shaped model (multimodal RoPE, the Qwen2 decoder at the widths of decoder_dims with
    Qwen2.5-VL-3B's 2 KV heads; a one-block vision tower; 448 px images: 256 image tokens) with its real processor,
    built offline (tests/models/_processors.py)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.models._processors import qwen2_5_vl_parts

    dims = decoder_dims(device, 2 if quick else 4)
    head_dim = dims["hidden_size"] // dims["num_attention_heads"]
    quarter = head_dim // 16  # mrope_section sums to head_dim / 2: [16, 24, 24] at 128, as Qwen2.5-VL
    text = dict(dims, num_key_value_heads=2, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [2 * quarter, 3 * quarter, 3 * quarter]})
    vision = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, window_size=112)
    processor, cfg = qwen2_5_vl_parts(synthetic.vocabulary(), text=text, vision=vision,
                                      image=dict(patch_size=14, min_pixels=448 * 448, max_pixels=448 * 448))
    return processor, cfg, text


def _setup(device, quick, kind):
    from transformers import (AutoModelForImageTextToText, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                              LlavaForConditionalGeneration)

    tok = synthetic.word_tokenizer(image_token="<image>" if kind == "vlm" else None)
    text = dict(decoder_dims(device, 2 if quick else 4), pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    dtype = bench_dtype(device)
    processor = tok
    if kind == "qwen2_5_vl":
        processor, cfg, text = _qwen(device, quick)
    elif kind == "vlm":
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                      image_size=336, patch_size=14)
        cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                          vision_feature_layer=-1)
        processor = synthetic.llava_processor(tok, 336, 14, chat_template=synthetic.CHAT_TEMPLATE)
    else:
        cfg = LlamaConfig(**text)

    def model(dtype=dtype):  # built on the device: a ~1B random init on the host takes seconds, 8 per case
        torch.manual_seed(0)
        with torch.device(device):
            if kind == "qwen2_5_vl":
                return AutoModelForImageTextToText.from_config(cfg, attn_implementation="sdpa").to(device, dtype)
            cls = LlavaForConditionalGeneration if kind == "vlm" else LlamaForCausalLM
            return cls._from_config(cfg, attn_implementation="sdpa").to(device, dtype)

    work = tempfile.mkdtemp(prefix="mmalign-bench-trainers-")
    rows = synthetic.make_pairs(64, __import__("pathlib").Path(work) / "images")
    with open(os.path.join(work, "pairs.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "prompt": "Describe the image ."}) + "\n")
    return processor, model, dtype, work, rows, decoder_label(text)


def _lora_config(model):
    """The peft config mmalign's trainer builds for LORA on ``model`` (adapters on the LLM's linear layers, the
    projector trained in full): TRL gets the same one."""
    from mmalign.train import TrainConfig
    from mmalign.train.policy import lora_config

    return lora_config(model(torch.float32), TrainConfig(lora=LORA, train=["llm", "projector"]))


def _trl_rows(rows, work, kind):
    if kind == "text":
        return [{"prompt": "USER : Describe the image . ASSISTANT :", "chosen": r["chosen"], "rejected": r["rejected"]}
                for r in rows]
    from PIL import Image

    return [{"images": [Image.open(os.path.join(work, "images", r["image"])).convert("RGB")],
             "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image ."}]}],
             "chosen": [{"role": "assistant", "content": [{"type": "text", "text": r["chosen"]}]}],
             "rejected": [{"role": "assistant", "content": [{"type": "text", "text": r["rejected"]}]}]} for r in rows]


# every text case first: after a vlm case (gigabytes, freed) the next case on a 2-core CPU ran up to 50% slower
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("kind", ["text", "vlm", "qwen2_5_vl"])
def test_trainer_steps(benchmark, device, quick, provider, kind):
    if quick:
        pytest.skip("--quick: whole trainers take minutes")
    if kind == "text" and provider.endswith(("-full", "-lora")):
        pytest.skip("what trains (a frozen tower, LoRA) is measured on the VLMs")
    tok, model, dtype, work, rows, decoder = _setup(device, quick, kind)
    pairs = int(os.environ.get("MMALIGN_BENCH_PAIRS") or 8)
    ckpt = provider.endswith("-ckpt")
    lora = provider.endswith("-lora")
    if provider.startswith("trl"):
        datasets = pytest.importorskip("datasets")
        trl = pytest.importorskip("trl")
        ds = datasets.Dataset.from_list(_trl_rows(rows, work, kind))

        def make():
            args = trl.DPOConfig(output_dir=os.path.join(work, "trl"), per_device_train_batch_size=pairs,
                                 max_steps=STEPS, learning_rate=1e-5, beta=0.1, report_to=[], save_strategy="no",
                                 use_cpu=device == "cpu", bf16=dtype == torch.bfloat16, logging_steps=STEPS,
                                 disable_tqdm=True, max_length=128 if kind == "text" else None,
                                 gradient_checkpointing=ckpt)
            # bf16: an fp32 policy under autocast (mixed precision, as DeepSpeed's bf16 mode), a bf16 reference; with
            # LoRA the reference is the base with the adapters off (no ref_model), as in mmalign
            if lora:
                return (trl.DPOTrainer(model=model(torch.float32), ref_model=None, args=args, train_dataset=ds,
                                       processing_class=tok, peft_config=_lora_config(model)),)
            return (trl.DPOTrainer(model=model(torch.float32), ref_model=model(), args=args, train_dataset=ds,
                                   processing_class=tok),)
    else:
        pytest.importorskip("deepspeed")
        from mmalign.train import Trainer, TrainConfig

        autocast = "-autocast" in provider
        if autocast and dtype != torch.bfloat16:
            pytest.skip("autocast is a bf16 mode (the GPU default; MMALIGN_BENCH_PRECISION=bf16 on CPU)")

        def make():
            cfg = TrainConfig(data=os.path.join(work, "pairs.jsonl"), output_dir=tempfile.mkdtemp(dir=work),
                              images=os.path.join(work, "images"),
                              loss=provider.split("-")[1], reference="model", micro_batch_size=pairs, max_steps=STEPS,
                              lr=1e-5, bf16=dtype == torch.bfloat16, autocast=autocast, progress=False, tensorboard=False,
                              resume=False, save_final=False, max_length=128 if kind == "text" else 1024,
                              gradient_checkpointing=ckpt, train="all" if provider.endswith("-full") else "default",
                              lora=LORA if lora else None)
            return (Trainer(cfg, model=model(torch.float32), processor=tok),)  # DeepSpeed casts it for bf16

    held = []

    def built():  # what the trainer holds before train(): models, DeepSpeed's master weights and buffers
        trainer, left = memory_left(make, device)
        held.append(left)
        return trainer

    benchmark.group = (f"trainer ({kind}, {decoder}) {STEPS} steps x {pairs} pairs, "
                       "memory: all the trainer holds at its peak")
    run_case(benchmark, device, lambda t: t.train(), built, op="trainer", mode=f"{STEPS} steps", provider=provider,
             shape=f"{kind} {decoder} {STEPS} steps x {pairs} pairs {str(dtype).replace('torch.', '')}",
             pairs=STEPS * pairs,
             rounds=2 if device == "cuda" else (3 if kind == "text" else 1), held_bytes=lambda: held[-1], collect=True)
