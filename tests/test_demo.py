"""`mmalign demo` end to end in a reduced size: every stage runs and leaves its files."""
import json

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("open_clip")
pytest.importorskip("sentence_transformers")


def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    from mmalign.cli import main

    # the DeepSpeed process group (gloo, world 1) stays for the session: DeepSpeed caches its groups, and
    # the trainer tests reuse it
    assert main(["demo", "--workdir", str(tmp_path / "demo"), "--pairs", "8", "--steps", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "pairs: 8 read, 8 scored" in out and "pairs: 8 read, 8 rejected responses generated" in out
    assert "| dpo | 3 |" in out and "| damo | 3 |" in out
    work = tmp_path / "demo"
    history = json.loads((work / "history.json").read_text())
    assert [c["step"] for c in history["damo"]] == [1, 2, 3]
    for name in ("margins.png", "pairs.hardness.delta.png", "pairs.bdhs.tries.png", "pairs.ref.jsonl"):
        assert (work / name).stat().st_size > 0
    rows = [json.loads(x) for x in open(work / "pairs.ref.jsonl")]
    assert {"alpha_d", "ref_chosen_logp", "difficulty"} <= set(rows[0])
