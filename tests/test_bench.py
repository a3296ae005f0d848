"""`mmalign bench` runs suites and writes a complete report folder (quick, two cheap suites)."""
import json

import pytest

from mmalign import bench
from mmalign.cli import main


def test_bench_writes_a_report_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MMALIGN_BENCH_PAIRS", "3")  # a shape override is recorded (these suites ignore it)
    out = tmp_path / "report"
    assert main(["bench", "--ops", "preference_loss,damo_step", "--quick", "--bench-device", "cpu",
                 "--out", str(out)]) == 0
    for name in ("raw.json", "report.md", "bench.png", "meta.txt"):
        assert (out / name).stat().st_size > 0
    text = (out / "report.md").read_text()
    assert "## preference_loss fwd+bwd N=16" in text and "## damo_step fwd N=16" in text
    assert "speedup vs eager" in text and "commit:" in text and "versions:" in text
    meta = (out / "meta.txt").read_text()
    assert "device: cpu" in meta and "quick: True" in meta and "settings: MMALIGN_BENCH_PAIRS=3" in meta
    raw = json.loads((out / "raw.json").read_text())
    assert all("peak_mem_bytes" in b["extra_info"] for b in raw["benchmarks"])
    assert "report folder" in capsys.readouterr().out


def test_bench_errors():
    with pytest.raises(ValueError, match="ops: unknown"):
        bench.run(["nope"])
    assert main(["bench", "--ops", "nope"]) == 2
