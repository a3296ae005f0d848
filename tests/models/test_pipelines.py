"""The pipelines end to end on VLM families with their real processors (built offline, tests/models/_processors.py):
Qwen2.5-VL (dynamic resolution, image_grid_thw, multimodal RoPE), Qwen3-VL (deepstack), Gemma-3 (bidirectional
image blocks), SmolVLM (image splitting: tiles and a global image) and LLaVA-OneVision (AnyRes). For each: the reference pass, whose log-probs equal the model's own forward on each sequence; one
DeepSpeed step of ``mmalign train`` from them (at step 0 the policy is the reference, so the DPO loss is log 2 and
every reward 0); and ``mmalign bdhs`` writing a rejected response for every pair."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("deepspeed")

from mmalign.cli import main  # noqa: E402
from mmalign.models import PromptEncoder, load_model  # noqa: E402

from ..bdhs import _models as M  # noqa: E402
from ..hardness import _fixtures as fx  # noqa: E402
from ._processors import SAVERS  # noqa: E402

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "gemma3", "smolvlm", "llava_onevision"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    rows = fx.pairs(4)
    fx.write_images(root / "images")
    fx.write_jsonl(root / "in.jsonl", rows)
    words = [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]
    return root, rows, words, M.save_sentence_model(root / "st")


def _read(path):
    return [json.loads(line) for line in open(path)]


def _own_logps(model, processor, root, row) -> tuple[float, float]:
    """log p(response | prompt, image) from the model's own forward on each full sequence (float64)."""
    enc = PromptEncoder(processor, images=str(root / "images"), dtype=torch.float64).encode(row["id"], row["prompt"],
                                                                                             row["image"])
    tok = processor.tokenizer
    out = []
    for text in (row["chosen"], row["rejected"]):
        resp = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.cat([enc.prompt_ids, torch.tensor(resp)])[None]
        P = len(enc.prompt_ids)
        inputs = {k: torch.cat([v, v.new_zeros(1, len(resp))], 1) if k in ("mm_token_type_ids", "token_type_ids")
                  else v for k, v in enc.image_inputs.items()}
        logits = model(input_ids=ids, **inputs).logits[0, P - 1:-1]
        out.append(float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(resp)[:, None]).sum()))
    return tuple(out)


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_pass_train_step_and_bdhs(family, data, tmp_path):
    root, rows, words, st_dir = data
    model_dir = SAVERS[family](tmp_path / family, words)
    images = str(root / "images")
    ref = tmp_path / "ref.jsonl"
    assert main(["train", "--model", model_dir, "--data", str(root / "in.jsonl"), "--images", images,
                 "--precompute-reference", str(ref), "--batch-size", "3", "--device", "cpu", "--no-progress"]) == 0
    written = _read(ref)
    assert [r["id"] for r in written] == [r["id"] for r in rows]
    model, processor = load_model(model_dir, "cpu", torch.float64)
    for row, out in zip(rows[:2], written):
        chosen, rejected = _own_logps(model, processor, root, row)
        assert out["ref_chosen_logp"] == pytest.approx(chosen, rel=1e-5)
        assert out["ref_rejected_logp"] == pytest.approx(rejected, rel=1e-5)

    run = tmp_path / "run"
    assert main(["train", "--model", model_dir, "--data", str(ref), "--images", images, "--output-dir", str(run),
                 "--max-steps", "1", "--micro-batch-size", "2", "--lr", "1e-3", "--device", "cpu",
                 "--no-progress"]) == 0
    metrics = _read(run / "metrics.jsonl")
    assert len(metrics) == 1
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 0
    assert metrics[0]["margin"] == pytest.approx(0.0, abs=1e-5)

    out = tmp_path / "bdhs.jsonl"
    assert main(["bdhs", str(root / "in.jsonl"), "--out", str(out), "--images", images, "--model", model_dir,
                 "--similarity-model", st_dir, "--tries", "1", "--max-new-tokens", "3",
                 "--rho-th", "0.5", "--device", "cpu", "--no-progress"]) == 0
    generated = _read(out)
    assert [r["id"] for r in generated] == [r["id"] for r in rows]
    assert all(r["bdhs_mode"] == "attn" and r["rejected_original"] != r["rejected"] for r in generated)
