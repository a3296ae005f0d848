"""The hardness job end to end on synthetic images with tiny random CLIP models: the numbers against a
literal transcription of docs/math.md §4, bad records, resume after a kill, sharding over two processes, the
Hugging Face CLIP backend and the CLI."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip")

from mmalign import data, hardness, jobs  # noqa: E402
from mmalign.hardness.scores import subsentence_probabilities_reference  # noqa: E402

from . import _fixtures as fx  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardness")
    fx.write_images(root / "images")
    rows = fx.pairs(14)
    fx.write_jsonl(root / "in.jsonl", rows)
    clip = fx.open_clip_config(root)
    scorer = hardness.load_scorer(clip, None, seed=0)
    return root, rows, clip, scorer


def _read(path):
    return [json.loads(line) for line in open(path)]


def _assert_same(a, b, rel=1e-5):
    """Same records; floats equal up to rounding (batch composition changes CPU matmul blocking)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            vx, vy = x[k], y[k]
            if isinstance(vx, float) or (isinstance(vx, list) and vx and isinstance(vx[0], float)):
                torch.testing.assert_close(torch.tensor(vx), torch.tensor(vy), rtol=rel, atol=1e-6)
            else:
                assert vx == vy, k


def test_numbers_follow_spec_section_4(setup, tmp_path):
    root, rows, clip, scorer = setup
    summary = hardness.run(root / "in.jsonl", tmp_path / "out.jsonl", scorer=scorer, images=root / "images",
                           batch_size=4, progress=False)
    out = _read(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == [r["id"] for r in rows] and summary.scored == 14 and summary.failed == 0
    model = scorer.model
    deltas = []
    for rec, res in zip(rows, out):
        assert {k: res[k] for k in rec} == rec  # the input record is written back unchanged
        assert res["chosen_subsentences"] == hardness.split_rules(rec["chosen"])
        image = scorer.preprocess(data.open_image(rec["image"], root / "images"))[None]
        texts = res["chosen_subsentences"] + res["rejected_subsentences"]
        with torch.no_grad():  # CLIP's logits_per_image, straight from the model
            img_f, txt_f, scale = model(image, scorer.tokenizer(texts))
            c = (scale * img_f @ txt_f.T)[0].double()
        p = len(res["chosen_subsentences"])
        p_w, p_l, delta = subsentence_probabilities_reference(c[:p], c[p:])
        torch.testing.assert_close(torch.tensor(res["chosen_clip_scores"] + res["rejected_clip_scores"]),
                                   c.float(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(res["chosen_subsentence_probs"], dtype=torch.float64), p_w,
                                   rtol=1e-5, atol=1e-6)
        assert res["delta"] == pytest.approx(delta.item(), abs=1e-5)
        assert res["delta_clip_scores"] == pytest.approx((c[:p].sum() / c[p:].sum()).item(), rel=1e-4)
        deltas.append(res["delta"])
    delta_mean = sum(deltas) / len(deltas)
    assert summary.delta_mean == pytest.approx(delta_mean, rel=1e-12)
    for res in out:
        sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
        assert res["alpha_d"] == pytest.approx(sig(res["delta"]) / sig(delta_mean), rel=1e-12)
    assert Path(summary.histogram).stat().st_size > 0
    assert json.loads((tmp_path / "out.summary.json").read_text())["scored"] == 14
    assert not (tmp_path / "out.jsonl.work").exists()


def test_fixed_delta_mean_and_scores_ablation(setup, tmp_path):
    root, rows, clip, scorer = setup
    s = hardness.run(root / "in.jsonl", tmp_path / "o.jsonl", scorer=scorer, images=root / "images", progress=False,
                     delta="scores", delta_mean=0.0482190464911681, histogram=False)
    assert s.delta_field == "delta_clip_scores" and s.histogram is None
    for r in _read(tmp_path / "o.jsonl"):
        assert r["alpha_d"] == pytest.approx(hardness.alpha_d(r["delta_clip_scores"], 0.0482190464911681).item())


def test_bad_records_and_images_are_skipped_and_reported(setup, tmp_path):
    root, rows, clip, scorer = setup
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    bad = [dict(rows[1], image="missing.png"), dict(rows[2], image=str(tmp_path / "corrupt.png")),
           dict(rows[3], chosen="", rejected=" ... ")]
    fx.write_jsonl(tmp_path / "in.jsonl", [rows[0], bad[0], "{oops", bad[1], bad[2], rows[4]])
    s = hardness.run(tmp_path / "in.jsonl", tmp_path / "out.jsonl", scorer=scorer, images=root / "images",
                     batch_size=2, progress=False)
    assert (s.records, s.scored, s.failed) == (6, 2, 4)
    failed = _read(tmp_path / "out.failed.jsonl")
    assert [(f["index"], f["id"], f["line"]) for f in failed] == [(1, "pair-1", 2), (2, None, 3), (3, "pair-2", 4),
                                                                  (4, "pair-3", 5)]
    assert "missing.png" in failed[0]["error"] and "not valid JSON" in failed[1]["error"]
    assert "not a decodable image" in failed[2]["error"] and "no sub-sentence" in failed[3]["error"]
    with pytest.raises(jobs.JobError, match=r"strict: record 1 \(id=pair-1, line 2\): image"):
        hardness.run(tmp_path / "in.jsonl", tmp_path / "strict.jsonl", scorer=scorer, images=root / "images",
                     strict=True, progress=False)


class _Killed(BaseException):
    pass


class _DiesAfter:
    """A scorer that is killed in its (n+1)-th call, like a job killed in the middle of a batch."""

    def __init__(self, scorer, n):
        self.scorer, self.n, self.description = scorer, n, scorer.description

    def score(self, *args):
        if self.n == 0:
            raise _Killed
        self.n -= 1
        return self.scorer.score(*args)


def test_resume_after_a_kill_redoes_nothing_and_duplicates_nothing(setup, tmp_path):
    root, rows, clip, scorer = setup
    kw = dict(images=root / "images", batch_size=3, progress=False)
    hardness.run(root / "in.jsonl", tmp_path / "ref.jsonl", scorer=scorer, **kw)
    out = tmp_path / "out.jsonl"
    with pytest.raises(_Killed):
        hardness.run(root / "in.jsonl", out, scorer=_DiesAfter(scorer, 2), **kw)
    work = out.with_name("out.jsonl.work") / "shard-00000-of-00001.jsonl"
    assert len(work.read_text().splitlines()) == 6 and not out.exists()
    with open(work, "a") as f:  # a write torn by the kill
        f.write('{"index": 6, "status": "ok", "del')
    calls = []
    counting = _DiesAfter(scorer, 10**9)
    counting.score = lambda *a: calls.append(len(a[0])) or scorer.score(*a)
    hardness.run(root / "in.jsonl", out, scorer=counting, keep_work=True, **kw)
    assert sum(calls) == 14 - 6  # only what was not finished
    indices = [json.loads(line)["index"] for line in work.read_text().splitlines()]
    assert sorted(indices) == list(range(14))
    _assert_same(_read(out), _read(tmp_path / "ref.jsonl"))


def test_resume_refuses_other_parameters_and_finished_outputs(setup, tmp_path):
    root, rows, clip, scorer = setup
    out = tmp_path / "out.jsonl"
    with pytest.raises(_Killed):
        hardness.run(root / "in.jsonl", out, scorer=_DiesAfter(scorer, 1), images=root / "images", batch_size=4,
                     progress=False)
    with pytest.raises(jobs.JobError, match="other parameters.*seed: 0 -> 3"):
        hardness.run(root / "in.jsonl", out, scorer=scorer, images=root / "images", seed=3, progress=False)
    with pytest.raises(jobs.JobError, match="split into \\[1\\] shards"):
        hardness.run(root / "in.jsonl", out, scorer=scorer, images=root / "images", shard="0/2", progress=False)
    hardness.run(root / "in.jsonl", out, scorer=scorer, images=root / "images", progress=False)
    with pytest.raises(jobs.JobError, match="exists"):
        hardness.run(root / "in.jsonl", out, scorer=scorer, images=root / "images", progress=False)
    assert hardness.run(root / "in.jsonl", out, scorer=scorer, images=root / "images", progress=False,
                        overwrite=True).scored == 14


def test_two_processes_equal_one(setup, tmp_path):
    """Two `mmalign hardness --shard i/2` processes give the one-process output. Every run is a fresh process
    on the CPU: this test process may hold state that changes float rounding (DeepSpeed ZeRO-3, run by the
    trainer tests, leaves torch.nn.functional.linear replaced by its own wrapper)."""
    root, rows, clip, scorer = setup
    out = tmp_path / "sharded.jsonl"
    cmd = [sys.executable, "-m", "mmalign", "hardness", str(root / "in.jsonl"), "--images", str(root / "images"),
           "--clip-model", clip, "--clip-pretrained", "none", "--batch-size", "3", "--no-progress", "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    for launcher_var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # from earlier tests
        env.pop(launcher_var, None)
    single = subprocess.run(cmd + ["--out", str(tmp_path / "single.jsonl")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr
    procs = [subprocess.Popen(cmd + ["--out", str(out), "--shard", f"{i}/2"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum("pairs: 14 read, 14 scored" in o for o, _ in outputs) == 1  # exactly one process merged
    _assert_same(_read(out), _read(tmp_path / "single.jsonl"))
    assert not out.with_name("sharded.jsonl.work").exists()


def test_shard_from_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert jobs.Shard.parse(None) == jobs.Shard(2, 3)
    assert jobs.Shard.parse("1/4").owns(5) and not jobs.Shard.parse("1/4").owns(6)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(ValueError, match="shard"):
            jobs.Shard.parse(bad)


def test_hugging_face_clip_and_parquet_output(setup, tmp_path):
    pytest.importorskip("pyarrow")
    from transformers import CLIPModel

    root, rows, clip, _ = setup
    path = fx.hf_clip_dir(tmp_path / "clip")
    scorer = hardness.load_scorer(path)
    assert isinstance(scorer, hardness.HFClipScorer)
    images = [data.open_image(r["image"], root / "images") for r in rows[:3]]
    texts = ["a red circle", "a green square", "a very long text " * 20, "blue"]
    which = torch.tensor([0, 1, 2, 2])
    got = scorer.score(images, texts, which)
    model = CLIPModel.from_pretrained(path).eval()
    enc = scorer.tokenizer(texts, padding=True, truncation=True, max_length=24, return_tensors="pt")
    px = scorer.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=px).logits_per_image
    torch.testing.assert_close(got, logits[which, torch.arange(4)], rtol=1e-5, atol=1e-5)
    s = hardness.run(root / "in.jsonl", tmp_path / "out.parquet", clip_model=path, images=root / "images",
                     progress=False)
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert s.scored == 14 and len(table) == 14 and table[0]["alpha_d"] > 0 and table[0]["id"] == "pair-0"


def test_cli_reports_errors_with_exit_code_2(setup, tmp_path, capsys):
    from mmalign.cli import main

    root, rows, clip, _ = setup
    assert main(["hardness", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--clip-model",
                 clip, "--clip-pretrained", "none", "--no-progress"]) == 2
    assert "absent.jsonl does not exist" in capsys.readouterr().err
    assert main(["hardness", str(root / "in.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--clip-model",
                 "no-such-model", "--no-progress"]) == 2
    assert "open_clip knows no model 'no-such-model'" in capsys.readouterr().err
    assert main(["hardness", str(root / "in.jsonl"), "--out", str(tmp_path / "o.txt"), "--clip-model",
                 clip, "--clip-pretrained", "none", "--no-progress"]) == 2
    assert "expected a .jsonl or .parquet" in capsys.readouterr().err


def test_llm_splitter_job_counts_fallbacks(setup, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmalign.hardness.split import FEW_SHOT

    root, rows, clip, scorer = setup
    tok = fx.word_tokenizer([FEW_SHOT] + [r["chosen"] + " " + r["rejected"] for r in rows], bos="<s>")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    s = hardness.run(root / "in.jsonl", tmp_path / "out.jsonl", scorer=scorer, images=root / "images",
                     splitter="llm", llm_model=str(tmp_path / "llm"), llm_max_new_tokens=4, progress=False)
    assert s.scored == 14 and s.llm_fallbacks == 28  # a random model never writes "- " lines
    out = _read(tmp_path / "out.jsonl")
    assert out[0]["split_fallback"] == ["chosen", "rejected"]
    assert out[0]["chosen_subsentences"] == hardness.split_rules(rows[0]["chosen"])
    with pytest.raises(ValueError, match="llm_model"):
        hardness.run(root / "in.jsonl", tmp_path / "x.jsonl", scorer=scorer, splitter="llm")


@pytest.mark.skipif(not os.environ.get("MMALIGN_CLIP_MODEL"), reason="set MMALIGN_CLIP_MODEL (and "
                    "MMALIGN_CLIP_PRETRAINED) to real CLIP weights to run this check")
def test_real_clip_prefers_the_description_of_the_image(setup, tmp_path):
    """With real weights, chosen captions (right colour and shape) must beat rejected ones (wrong colour)."""
    root, rows, *_ = setup
    scorer = hardness.load_scorer(os.environ["MMALIGN_CLIP_MODEL"], os.environ.get("MMALIGN_CLIP_PRETRAINED", "openai"))
    hardness.run(root / "in.jsonl", tmp_path / "out.jsonl", scorer=scorer, images=root / "images", progress=False)
    deltas = [r["delta"] for r in _read(tmp_path / "out.jsonl")]
    assert sum(d > 0 for d in deltas) >= 0.8 * len(deltas), deltas


def test_a_merge_killed_midway_is_finished_by_a_rerun(setup, tmp_path):
    import socket

    root, rows, clip, scorer = setup
    out = tmp_path / "out.jsonl"
    kw = dict(scorer=scorer, images=root / "images", progress=False)
    hardness.run(root / "in.jsonl", tmp_path / "ref.jsonl", **kw)
    real_merge = hardness.job.merge

    def dies(*a, **k):
        raise _Killed

    hardness.job.merge = dies
    try:
        with pytest.raises(_Killed):
            hardness.run(root / "in.jsonl", out, **kw)
    finally:
        hardness.job.merge = real_merge
    lock = out.with_name("out.jsonl.work") / "merge.lock"
    dead = 2**22 + 12345  # beyond the default pid_max: no such process
    lock.write_text(f"{socket.gethostname()} {dead}\n")
    assert hardness.run(root / "in.jsonl", out, **kw).scored == 14
    _assert_same(_read(out), _read(tmp_path / "ref.jsonl"))
    work = jobs.WorkDir(tmp_path / "x.jsonl", jobs.Shard(), {})
    work.mark_done()
    (work.dir / "merge.lock").write_text(f"{socket.gethostname()} {os.getpid()}\n")  # a live merger
    assert not work.take_merge()
    (work.dir / "merge.lock").write_text(f"{socket.gethostname()} {dead}\n")  # a dead one
    assert work.take_merge() and not work.take_merge()
