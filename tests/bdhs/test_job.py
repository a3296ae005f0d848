"""`mmalign bdhs` end to end on a tiny LLaVA saved with its processor and a tiny sentence-transformers
model: output format, failures, resume after a kill, two shards equal one process, the CLI."""
import json

import pytest
import torch

pytest.importorskip("sentence_transformers")

from mmalign.bdhs import BDHSConfig, job  # noqa: E402
from mmalign.cli import main  # noqa: E402

from ..hardness import _fixtures as fx  # noqa: E402
from . import _models as M  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bdhs")
    tok = M.tokenizer()
    model_dir = M.save_llava(root / "llava", tok)
    st_dir = M.save_sentence_model(root / "st")
    fx.write_images(root / "images")
    rows = fx.pairs(7)
    fx.write_jsonl(root / "in.jsonl", rows)
    model, processor = job.load_model(model_dir, "cpu", torch.float32)
    return root, rows, model, processor, model_dir, st_dir


def _kw(root, st_dir, **extra):
    return dict(images=root / "images", similarity_model=st_dir, batch_size=3, progress=False,
                engine=BDHSConfig(max_new_tokens=4, tries=3, rho_th=0.9, seed=5), **extra)


def _read(path):
    return [json.loads(line) for line in open(path)]


def _same(a, b):
    """Same rows; the similarity may differ in the last bits (the sentence model's batch changes)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["bdhs_similarity"] == pytest.approx(y["bdhs_similarity"], abs=1e-6)
        assert {k: v for k, v in x.items() if k != "bdhs_similarity"} == {k: v for k, v in y.items() if k != "bdhs_similarity"}


def test_output_summary_and_failures(setup, tmp_path):
    root, rows, model, processor, model_dir, st_dir = setup
    bad = rows[:3] + [dict(rows[3], image="nope.png"), dict(rows[4], chosen="  "), "{broken"] + rows[5:]
    fx.write_jsonl(tmp_path / "in.jsonl", bad)
    s = job.run(tmp_path / "in.jsonl", tmp_path / "out.jsonl", model=model, processor=processor, **_kw(root, st_dir))
    out = _read(tmp_path / "out.jsonl")
    assert (s.records, s.generated, s.failed) == (8, 5, 3) and sum(s.tries.values()) == 5
    assert [r["id"] for r in out] == ["pair-0", "pair-1", "pair-2", "pair-5", "pair-6"]
    for r, src in zip(out, [rows[i] for i in (0, 1, 2, 5, 6)]):
        assert r["rejected_original"] == src["rejected"] and r["chosen"] == src["chosen"]
        assert r["rejected"] != src["rejected"] and 1 <= r["bdhs_try"] <= 3 and r["bdhs_mode"] == "attn"
        assert isinstance(r["bdhs_similarity"], float)
    failed = _read(tmp_path / "out.failed.jsonl")
    assert [(f["index"], f["line"]) for f in failed] == [(3, 4), (4, 5), (5, 6)]
    assert "nope.png" in failed[0]["error"] and "chosen is empty" in failed[1]["error"]
    assert (tmp_path / "out.tries.png").stat().st_size > 0
    assert json.loads((tmp_path / "out.summary.json").read_text())["generated"] == 5


class _Killed(BaseException):
    pass


def test_resume_after_a_kill_and_shards(setup, tmp_path):
    root, rows, model, processor, model_dir, st_dir = setup
    kw = dict(model=model, processor=processor, **_kw(root, st_dir))
    job.run(root / "in.jsonl", tmp_path / "ref.jsonl", **kw)
    ref = _read(tmp_path / "ref.jsonl")

    real = job._process
    calls = []

    def dies(batch, *a):
        if len(calls) == 1:
            raise _Killed
        calls.append(len(batch))
        return real(batch, *a)

    job._process = dies
    try:
        with pytest.raises(_Killed):
            job.run(root / "in.jsonl", tmp_path / "out.jsonl", **kw)
    finally:
        job._process = real
    work = tmp_path / "out.jsonl.work" / "shard-00000-of-00001.jsonl"
    assert len(work.read_text().splitlines()) == 3
    job.run(root / "in.jsonl", tmp_path / "out.jsonl", keep_work=True, **kw)
    assert sorted(json.loads(x)["index"] for x in work.read_text().splitlines()) == list(range(7))
    _same(_read(tmp_path / "out.jsonl"), ref)
    # two shards, one after the other: the second one merges, and the result is the same
    assert job.run(root / "in.jsonl", tmp_path / "sh.jsonl", shard="0/2", **kw) is None
    s = job.run(root / "in.jsonl", tmp_path / "sh.jsonl", shard="1/2", **kw)
    assert s.generated == 7
    _same(_read(tmp_path / "sh.jsonl"), ref)


def test_cli(setup, tmp_path, capsys):
    root, rows, model, processor, model_dir, st_dir = setup
    args = ["bdhs", str(root / "in.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--model", model_dir,
            "--images", str(root / "images"), "--similarity-model", st_dir, "--max-new-tokens", "3", "--tries", "2",
            "--no-progress", "--mode", "both", "--rho-th", "0.9"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "pairs: 7 read, 7 rejected responses generated, 0 failed" in printed and "| try | pairs |" in printed
    assert all(r["bdhs_mode"] == "both" for r in _read(tmp_path / "o.jsonl"))
    assert main(args) == 2 and "exists" in capsys.readouterr().err
    assert main(args[:-2] + ["--rho-th", "2"]) == 2 and "rho_th" in capsys.readouterr().err


def test_an_empty_rejected_response_is_a_failed_record(setup):
    """A pair whose every try generated nothing goes to the failed file with the reason, never into the dataset
    as an empty rejected response."""
    from mmalign import data
    from mmalign.bdhs import BDHSResult

    root, rows, model, processor, model_dir, st_dir = setup

    class Engine:
        def generate(self, pairs):
            return [BDHSResult(p.id, "" if i == 0 else "A blue square.", 2, 1.0, True, False) for i, p in enumerate(pairs)]

    recs = list(data.iter_records(root / "in.jsonl"))[:2]
    cfg = job.BDHSJobConfig(images=str(root / "images"))
    out = job._process(recs, Engine(), lambda rec: rec, cfg)
    assert out[0]["status"] == "failed" and "generated no text in 2 tries" in out[0]["error"]
    assert out[1]["status"] == "ok" and out[1]["rejected"] == "A blue square."
