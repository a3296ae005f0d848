"""`mmalign demo` end to end in a reduced size: every stage runs and leaves its files."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("deepspeed")
pytest.importorskip("open_clip")
pytest.importorskip("sentence_transformers")


def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    from mmalign.cli import main

    # the DeepSpeed process group (gloo, world 1) stays for the session: DeepSpeed caches its groups, and
    # the trainer tests reuse it
    assert main(["demo", "--workdir", str(tmp_path / "demo"), "--pairs", "8", "--steps", "3", "--sft-steps", "3",
                 "--eval-images", "2", "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "pairs: 8 read, 8 scored" in out
    # a warm-up of 3 steps leaves a model that may end some responses at once: those pairs fail, with the reason
    made, failed = map(int, re.search(r"pairs: 8 read, (\d+) rejected responses generated, (\d+) failed", out).groups())
    assert made + failed == 8 and made > 0
    assert "| dpo | 3 |" in out and "| damo | 3 |" in out  # held-out metrics after the last step
    assert "| model | POPE random acc" in out and "| base |" in out and "| damo |" in out
    assert "## what the numbers show" in out and "- dpo: POPE accuracy" in out and "- damo: CHAIR_i" in out
    work = tmp_path / "demo"
    history = json.loads((work / "history.json").read_text())
    assert [c["step"] for c in history["damo"]] == [1, 2, 3] and any(k.endswith("/margin") for k in history["dpo"][-1])
    for name in ("margins.png", "pairs.hardness.delta.png", "pairs.bdhs.tries.png", "pairs.ref.jsonl",
                 "eval/summary.png", "eval/base/pope.jsonl", "eval/dpo/chair.jsonl", "runs/sft/model/config.json"):
        assert (work / name).stat().st_size > 0
    rows = [json.loads(x) for x in open(work / "pairs.ref.jsonl")]
    assert {"alpha_d", "ref_chosen_logp", "difficulty"} <= set(rows[0])
    scores = json.loads((work / "eval" / "summary.json").read_text())
    assert set(scores) == {"base", "dpo", "damo"} and scores["base"]["pope"]["random"]["n"] == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_demo_on_the_gpu(tmp_path):
    """Every stage on the GPU (the trainer with NCCL), in its own process: this session's process group is
    gloo (the CPU tests)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-m", "mmalign", "demo", "--workdir", str(tmp_path / "demo"), "--pairs", "8",
                          "--steps", "3", "--sft-steps", "3", "--eval-images", "2", "--no-progress", "--device", "cuda"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "| dpo | 3 |" in run.stdout and "| damo | 3 |" in run.stdout
