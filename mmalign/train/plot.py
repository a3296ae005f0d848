"""``mmalign plot``: curves of a training run's ``metrics.jsonl`` (one panel per metric, one line per run)."""
from __future__ import annotations

import json
from pathlib import Path

DEFAULT_KEYS = ("loss", "margin", "accuracy", "alpha_m", "beta_mean", "kept")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no metrics (a run directory or its metrics.jsonl)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(runs: list[str], out: str, keys=DEFAULT_KEYS) -> str:
    """One PNG with a panel per metric in ``keys`` and a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..jobs import atomic_write_bytes

    data = {str(r): read_metrics(r) for r in runs}
    keys = [k for k in keys if any(k in row for rows in data.values() for row in rows)]
    if not keys:
        raise ValueError("keys: none of them is in the metrics")
    cols = min(3, len(keys))
    rows_n = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for name, rows in data.items():
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=Path(name).name or name)
        ax.set_title(key)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    atomic_write_bytes(Path(out), lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out
