"""``mmalign eval`` end to end on a tiny LLaVA and the synthetic benchmark (POPE questions and CHAIR in their
public formats, mmalign.synthetic.write_eval_set) and a small AMBER set: per-question rows, several models in one
call (a model directory, a LoRA adapter directory, a model object), the summary equal to the metrics of the rows,
resume after a kill, bad records, greedy answers equal to the model's own generate()."""
import json

import pytest
import torch

from mmalign import synthetic
from mmalign.cli import main
from mmalign.eval import job as J
from mmalign.eval import coco_vocabulary
from mmalign.eval.metrics import chair_scores, pope_scores
from mmalign.models import PromptEncoder, load_model

from ..bdhs import _models as M


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = M.tokenizer()
    model_dir = M.save_llava(root / "llava", tok)
    paths = synthetic.write_eval_set(root / "bench", 3)
    return root, model_dir, paths


def _cfg(paths, models, **kw):
    base = dict(models=models, images=paths["images"], pope=[paths["pope"]], chair_instances=[paths["instances"]],
                chair_captions=[paths["captions"]], chair_vocabulary="instances",
                decoding=J.Decoding(max_new_tokens=5), batch_size=2, device="cpu", progress=False)
    return J.EvalConfig(**{**base, **kw})


def _rows(path):
    return [json.loads(x) for x in open(path)]


def test_rows_summary_and_several_models(setup, tmp_path):
    import peft

    root, model_dir, paths = setup
    base, processor = load_model(model_dir, "cpu", torch.float32)
    torch.manual_seed(3)
    lora = peft.get_peft_model(load_model(model_dir, "cpu", torch.float32)[0],
                               peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(str(tmp_path / "adapter"))
    summary = J.run(_cfg(paths, {"base": model_dir, "lora": str(tmp_path / "adapter"), "object": (base, processor)}),
                    tmp_path / "out")
    assert set(summary.scores) == {"base", "lora", "object"}
    for name in summary.scores:
        pope, chair = _rows(tmp_path / "out" / name / "pope.jsonl"), _rows(tmp_path / "out" / name / "chair.jsonl")
        assert [r["id"] for r in pope] == list(range(6)) and [r["id"] for r in chair] == [0, 1, 2]
        for r in pope:
            assert r["parsed"] in ("yes", "no") and r["correct"] == (r["parsed"] == r["label"])
            assert r["prompt"].startswith("Is there a")
        for r in chair:
            assert set(r["hallucinated"]) == set(r["mentioned"]) - set(r["ground_truth"])
        # the summary is the metrics of the rows
        expected = pope_scores([r["label"] for r in pope], [r["answer"] for r in pope])
        assert summary.scores[name]["pope"]["random"] == expected
        got = summary.scores[name]["chair"]
        want = chair_scores([(r["answer"], r["ground_truth"]) for r in chair], coco_vocabulary(paths["instances"]))
        assert got == {k: v for k, v in want.items() if k != "samples"}
        assert got["mean_length"] == sum(len(r["answer"].split()) for r in chair) / 3
    # a model directory and the same model as an object give the same answers; the adapter changes them
    same = [r["answer"] for r in _rows(tmp_path / "out" / "base" / "chair.jsonl")]
    assert same == [r["answer"] for r in _rows(tmp_path / "out" / "object" / "chair.jsonl")]
    table = (tmp_path / "out" / "summary.md").read_text()
    assert table.startswith("| model | POPE random acc") and "| lora |" in table
    assert (tmp_path / "out" / "summary.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == json.loads(json.dumps(summary.scores))


def test_greedy_answers_are_the_models_own(setup, tmp_path):
    """The engine's batched decoding (prompts of different images in one batch) gives generate()'s greedy tokens."""
    root, model_dir, paths = setup
    model, processor = load_model(model_dir, "cpu", torch.float32)
    J.run(_cfg(paths, {"m": (model, processor)}, chair_instances=[]), tmp_path)
    enc = PromptEncoder(processor, images=paths["images"])
    for row in _rows(tmp_path / "m" / "pope.jsonl"):
        p = enc.encode(str(row["id"]), row["prompt"], row["image"])
        ids = p.prompt_ids[None]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **p.image_inputs, max_new_tokens=5,
                             do_sample=False)
        assert row["answer"] == processor.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_resume_after_a_kill_and_bad_records(setup, tmp_path, monkeypatch):
    """Killed after the first batch: the rerun answers only what is left and ends with the uninterrupted rows; a
    question whose image is missing goes to the failed file."""
    root, model_dir, paths = setup
    lines = open(paths["pope"]).read().splitlines()
    bad = dict(json.loads(lines[3]), image="missing.png")
    (tmp_path / "pope_random.jsonl").write_text("\n".join(lines[:3] + [json.dumps(bad)] + lines[4:]) + "\n")
    cfg = _cfg({**paths, "pope": str(tmp_path / "pope_random.jsonl")}, {"m": model_dir}, chair_instances=[])
    whole = J.run(cfg, tmp_path / "whole")
    calls = []
    real = J._answer

    def crash(batch, encoder, generator):
        calls.append([item.index for item in batch])
        if len(calls) == 2:
            raise KeyboardInterrupt  # the kill, after the first batch was written
        return real(batch, encoder, generator)

    monkeypatch.setattr(J, "_answer", crash)
    with pytest.raises(KeyboardInterrupt):
        J.run(cfg, tmp_path / "killed")
    monkeypatch.setattr(J, "_answer", lambda batch, e, g: calls.append([i.index for i in batch]) or real(batch, e, g))
    again = J.run(cfg, tmp_path / "killed")
    assert calls == [[0, 1], [2, 3], [2, 3], [4, 5]]  # the second run starts after the written batch
    assert _rows(tmp_path / "killed" / "m" / "pope.jsonl") == _rows(tmp_path / "whole" / "m" / "pope.jsonl")
    assert again.scores == whole.scores
    failed = _rows(tmp_path / "whole" / "m" / "pope.failed.jsonl")
    assert [f["index"] for f in failed] == [3] and "missing.png" in failed[0]["error"]


def test_amber_and_the_cli(setup, tmp_path, capsys):
    """AMBER's discriminative and generative queries through the CLI, and a clear error for a missing benchmark."""
    root, model_dir, paths = setup
    images = sorted(p.name for p in (root / "bench" / "images").iterdir())
    (tmp_path / "query.json").write_text(json.dumps(
        [{"id": 1, "image": images[0], "query": "Describe this image."},
         {"id": 2, "image": images[1], "query": "Is there a circle in this image?"}]))
    (tmp_path / "annotations.json").write_text(json.dumps(
        [{"id": 1, "type": "generative", "truth": ["circle"], "hallu": ["dog"]},
         {"id": 2, "type": "discriminative-hallucination", "truth": "no"}]))
    (tmp_path / "relation.json").write_text(json.dumps({"circle": [], "dog": ["puppy"]}))
    argv = ["eval", "--model", f"tiny={model_dir}", "--out", str(tmp_path / "out"), "--images", paths["images"],
            "--amber-queries", str(tmp_path / "query.json"), "--amber-annotations", str(tmp_path / "annotations.json"),
            "--amber-relation", str(tmp_path / "relation.json"), "--max-new-tokens", "4", "--device", "cpu",
            "--no-progress"]
    assert main(argv) == 0
    scores = json.loads((tmp_path / "out" / "summary.json").read_text())["tiny"]["amber"]
    assert scores["discriminative"]["discriminative"]["n"] == 1 and scores["generative"]["n"] == 1
    assert "| tiny |" in capsys.readouterr().out
    assert main(["eval", "--model", f"tiny={model_dir}", "--out", str(tmp_path / "none")]) == 2
    assert "give POPE questions" in capsys.readouterr().err


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_training_run_is_a_model_to_evaluate(setup, tmp_path, lora):
    """A `mmalign train` output directory holds the trained model (or its adapters) with the processor, and
    `mmalign eval` loads it: the same log-probs as the trained policy."""
    pytest.importorskip("deepspeed")
    from mmalign.train import Trainer, TrainConfig, pair_logps

    from ..hardness import _fixtures as fx

    root, model_dir, paths = setup
    fx.write_images(root / "images")
    fx.write_jsonl(root / "in.jsonl", fx.pairs(4))
    trainer = Trainer(TrainConfig(model=model_dir, data=str(root / "in.jsonl"), images=str(root / "images"),
                                  output_dir=str(tmp_path), reference="model", micro_batch_size=2, max_steps=1,
                                  lr=1e-2, device="cpu", progress=False, tensorboard=False,
                                  lora={"r": 2} if lora else None))
    trainer.train()
    model, _ = J.load_for_eval(str(tmp_path), "cpu", torch.float32)
    batch = trainer.micro_batch(0)
    with torch.no_grad():
        for got, want in zip(pair_logps(model, batch), pair_logps(trainer.policy, batch)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
