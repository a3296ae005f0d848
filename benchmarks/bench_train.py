"""One DPO / DAMO training micro-step (forward + backward, reference log-probs precomputed) of a LLaVA
built from a config with random weights, N pairs that share prompt and image:

  eager        the classic TRL (< 1.0) recipe: chosen and rejected concatenated into 2N sequences, the whole
               VLM forward on them (the vision tower encodes every image twice), full logits, fp32
               log_softmax, gather
  trl          TRL 1.x's own path (when trl is installed): the same 2N sequences through the model patched by
               trl's add_fused_lm_head (chunked LM head, no full logits)
  mmalign      mmalign.train.pair_logps (vision once per pair, the prompt once per pair: chosen and rejected in
               one decoder sequence, fused log-probs from the final hidden states)
               + DAMOLoss with the dpo preset;  mmalign-damo: the same with the damo preset
  mmalign-2n   mmalign with share_prompt=False: chosen and rejected as 2N decoder sequences (what the shared
               prompt saves)
  *-ckpt       the same with Hugging Face gradient checkpointing (each decoder layer keeps only its input and
               runs its forward again in the backward; TRL >= 1.0 turns it on by default)

pairs/s = N / time. CPU: 8 pairs, 576 image tokens, a 2-layer 256-wide decoder with a 32k vocabulary,
fp32 (--quick: 2 pairs, 1 layer, 24-token responses). GPU: 8 pairs, a 16-layer 2048-wide decoder (~1B) with a
32k vocabulary, bf16. MMALIGN_BENCH_SHAPE=gpu, MMALIGN_BENCH_LAYERS=N, MMALIGN_BENCH_PRECISION=fp32|bf16 and
MMALIGN_BENCH_PAIRS=N change the shape (conftest.decoder_dims): e.g. the GPU's widths at 1 and 2 layers on
CPU, fp32, to project the GPU case's memory per layer."""
import os

import pytest
import torch

from mmalign.nn import DAMOConfig, DAMOLoss
from mmalign.train import PairExample, enable_checkpointing, pair_logps

from conftest import bench_dtype, decoder_dims, decoder_label, run_case

PROVIDERS = ["eager", "trl", "trl-ckpt", "mmalign", "mmalign-damo", "mmalign-2n", "mmalign-ckpt"]


def _model(device, quick):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text = dict(decoder_dims(device, 1 if quick else 2), max_position_embeddings=4096, pad_token_id=0, eos_token_id=2)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                  image_size=336, patch_size=14)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=31999, vision_feature_layer=-1)
    torch.manual_seed(0)
    dtype = bench_dtype(device)
    with torch.device(device):  # a ~1B random init on the host takes seconds
        model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").to(device, dtype)
    return model.train(), dtype, decoder_label(text)


def _examples(device, dtype, n, quick):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        prompt = torch.cat([torch.randint(3, 31000, (8,), generator=g), torch.full((576,), 31999),
                            torch.randint(3, 31000, (12,), generator=g)])
        resp = lambda: torch.randint(3, 31000, (24 if quick else 64,), generator=g).tolist() + [2]  # noqa: E731
        out.append(PairExample(i, f"pair-{i}", prompt, {"pixel_values": torch.randn(
            1, 3, 336, 336, generator=g).to(device, dtype)}, resp(), resp(), None, -60.0, -62.0))
    return out


def _concatenated(examples, device):
    """TRL's batch: 2N padded sequences [chosen...; rejected...], labels on the responses only."""
    seqs = [torch.cat([e.prompt_ids, torch.tensor(resp)]) for side in ("chosen_ids", "rejected_ids")
            for e in examples for resp in [getattr(e, side)]]
    width = max(len(s) for s in seqs)
    ids = torch.stack([torch.nn.functional.pad(s, (0, width - len(s))) for s in seqs]).to(device)
    labels = ids.clone()
    for i, s in enumerate(seqs):
        labels[i, :len(examples[0].prompt_ids)] = -100
        labels[i, len(s):] = -100
    mask = (labels != -100) | (torch.arange(width, device=device) < len(examples[0].prompt_ids))
    px = torch.cat([e.image_inputs["pixel_values"] for e in examples] * 2)
    return ids, mask.long(), labels, px


def _dpo(pc, pr, rc, rr, beta=0.1):
    return -torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_train_step(benchmark, device, quick, provider):
    model, dtype, decoder = _model(device, quick)
    n = int(os.environ.get("MMALIGN_BENCH_PAIRS") or (8 if device == "cuda" else (2 if quick else 8)))
    if provider.endswith("-ckpt"):
        enable_checkpointing(model)
    path = provider.removesuffix("-ckpt")
    examples = _examples(device, dtype, n, quick)
    rc = torch.tensor([e.ref_chosen for e in examples], device=device)
    rr = torch.tensor([e.ref_rejected for e in examples], device=device)
    if path in ("eager", "trl"):
        ids, mask, labels, px = _concatenated(examples, device)
        if path == "trl":
            trl_utils = pytest.importorskip("trl.trainer.utils")
            trl_utils.add_fused_lm_head(model)

        def step():
            if path == "eager":
                logits = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits[:, :-1].float()
                target = labels[:, 1:]
                lp = torch.log_softmax(logits, -1).gather(-1, target.clamp_min(0)[..., None])[..., 0]
                logps = (lp * (target != -100)).sum(1)
            else:
                out = model(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels, fused_lm_head=True)
                logps = out.log_probs.float().sum(1)
            pc, pr = logps.chunk(2)
            loss = _dpo(pc, pr, rc, rr)
            loss.backward()
            return loss
    else:
        loss_fn = DAMOLoss(0.1, DAMOConfig.from_preset("damo" if path == "mmalign-damo" else "dpo")).to(device)
        share = False if path == "mmalign-2n" else None  # None: the default (shared here)

        def step():
            pc, pr = pair_logps(model, examples, share_prompt=share)
            loss = loss_fn(pc.float(), pr.float(), rc, rr).loss
            loss.backward()
            return loss

    benchmark.group = f"train step fwd+bwd {decoder} pairs={n}"
    run_case(benchmark, device, step, lambda: (), op="train_step", mode="fwd+bwd", provider=provider,
             shape=f"{decoder} pairs={n} image_tokens=576 response={len(examples[0].chosen_ids)} "
                   f"{str(dtype).replace('torch.', '')}",
             pairs=n, rounds=3 if device == "cuda" else (1 if quick else 2))
