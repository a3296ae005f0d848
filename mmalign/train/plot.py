"""``mmalign plot``: curves of a training run's ``metrics.jsonl`` (one panel per metric, one line per run)."""
from __future__ import annotations

from pathlib import Path

from .logs import read

DEFAULT_KEYS = ("loss", "margin", "accuracy", "alpha_m", "beta_mean", "kept")


def plot_runs(runs: list[str], out: str, keys=DEFAULT_KEYS) -> str:
    """One PNG with a panel per metric in ``keys`` and a line per run; a key ``eval/<metric>`` plots the held-out
    rows' metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..jobs import atomic_write_bytes

    data = {str(r): _points(read(r)) for r in runs}
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


def _points(rows: list[dict]) -> list[dict]:
    """Train rows as they are, held-out rows with their keys prefixed by ``eval/``."""
    return [r if r.get("split", "train") == "train" else
            {"step": r["step"], **{f"eval/{k}": v for k, v in r.items() if k not in ("step", "split")}} for r in rows]
