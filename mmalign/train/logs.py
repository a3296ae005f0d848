"""A run's metrics: ``OUTPUT/metrics.jsonl`` (one JSON object per logged optimizer step, ``split`` "train" or
"eval") and, when the tensorboard package is installed, TensorBoard event files under ``OUTPUT/tensorboard``.

A run resumed from the checkpoint of step S redoes the steps after S, so the log is cut back to S first: rows of
later steps are dropped from metrics.jsonl (rewritten atomically), and the new TensorBoard writer purges events
after S (``purge_step``), so that no step is logged twice in either."""
from __future__ import annotations

import json
from pathlib import Path

from .. import jobs


class MetricsLog:
    def __init__(self, out: Path, *, tensorboard: bool, resume_step: int | None):
        self.path = Path(out) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.cut(resume_step)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the tensorboard package is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                purge = None if resume_step is None else resume_step + 1
                self.writer = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=purge)

    def cut(self, step: int) -> int:
        """Drop the rows of steps after ``step`` (a torn last line too); returns how many were dropped."""
        if not self.path.exists():
            return 0
        keep, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            if row.get("step", 0) <= step:
                keep.append(line)
            else:
                dropped += 1
        if dropped:
            jobs.atomic_write(self.path, lambda f: f.writelines(line + "\n" for line in keep))
        return dropped

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            split = row.get("split", "train")
            for key, value in row.items():
                if key not in ("step", "split") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{split}/{key}", value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read(path: str | Path, split: str | None = None) -> list[dict]:
    """The rows of a run directory's (or a file's) metrics.jsonl, those of ``split`` only when given (rows written
    before splits existed count as "train")."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics (a run directory or its metrics.jsonl)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows if split is None else [r for r in rows if r.get("split", "train") == split]
