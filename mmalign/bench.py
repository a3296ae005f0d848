"""``mmalign bench``: run the benchmark suites of ``benchmarks/`` and write a report folder.

    mmalign bench [--ops logps,damo_step,...] [--quick] [--device cuda] [--out bench-report]

Each suite times mmalign against eager PyTorch in the same run (plus torch.compile, TRL and
FlexAttention where installed), with the time and the peak memory above the inputs of every case; GPU
cases synchronize inside the timed function. The folder gets ``raw.json`` (pytest-benchmark's, with
machine and commit), ``report.md`` (speedup and memory ratios per op and size), ``bench.png`` (time and
memory, log scale) and ``meta.txt``; device, versions, date and commit are in every one of them.
``--quick`` (smallest shapes, fewest rounds) takes about a minute on 2 CPU cores.

The suites live in the source tree (``benchmarks/``), next to this package in a checkout.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
from pathlib import Path

#: op -> the suite that measures it
SUITES = {
    "logps": "bench_logps.py",
    "fused_linear_logps": "bench_fused_linear_logps.py",
    "preference_loss": "bench_preference_loss.py",
    "damo_step": "bench_damo.py",
    "attention": "bench_attention.py",
    "bdhs": "bench_bdhs.py",
    "train_step": "bench_train.py",
    "trainers": "bench_trainers.py",
}


def benchmarks_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (here / "conftest.py").exists():
        raise FileNotFoundError(f"{here}: the benchmark suites are in the source tree's benchmarks/ folder; "
                                "run mmalign bench from a checkout (pip install -e .)")
    return here


def _commit(repo: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("MMALIGN_COMMIT", "unknown")


def run(ops: list[str] | None = None, *, quick: bool = False, out: str = "bench-report", device: str | None = None,
        extra_args: list[str] | None = None) -> Path:
    """Run the suites of ``ops`` (default: all) and write the report folder ``out``; returns its path."""
    ops = list(ops or SUITES)
    unknown = [o for o in ops if o not in SUITES]
    if unknown:
        raise ValueError(f"ops: unknown {unknown}; known: {sorted(SUITES)}")
    bench = benchmarks_dir()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "raw.json"
    cmd = [sys.executable, "-m", "pytest", *[SUITES[o] for o in ops], "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={raw}", "--benchmark-columns=median,iqr,rounds"]
    cmd += (["--quick"] if quick else []) + (["--bench-device", device] if device else []) + list(extra_args or [])
    started = _dt.datetime.now(_dt.timezone.utc)
    commit = _commit(bench.parent)  # the tree that runs (edits made while the suites run do not count)
    settings = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MMALIGN_BENCH_"))
    # pytest-benchmark turns itself off when it sees an xdist worker's variables (inherited when a test
    # suite run under pytest-xdist calls this): the benchmarks run in a plain pytest of their own
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    proc = subprocess.run(cmd, cwd=bench, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the benchmark suites failed (pytest exit code {proc.returncode}): {' '.join(cmd)}")
    if not raw.exists() or not json.loads(raw.read_text()).get("benchmarks"):
        raise RuntimeError(f"no benchmark ran (every case skipped: see the reasons above; is --bench-device "
                           f"{device or 'auto'} available?): {' '.join(cmd)}")
    sys.path.insert(0, str(bench))
    try:
        import report
    finally:
        sys.path.remove(str(bench))
    text, _ = report.build([str(raw)], commit)
    (out / "report.md").write_text(text)
    report.plot([str(raw)], out, report.caption([str(raw)], commit))
    info = json.loads(raw.read_text())
    first = next((b["extra_info"] for b in info.get("benchmarks", [])), {})
    (out / "meta.txt").write_text(
        f"device: {first.get('device', '?')}\nversions: {first.get('versions', '?')}\n"
        f"date: {started.isoformat(timespec='seconds')}\ncommit: {commit}\nops: {','.join(ops)}\nquick: {quick}\n"
        f"settings: {settings or 'defaults'}\ncommand: {' '.join(cmd)}\n")
    return out
