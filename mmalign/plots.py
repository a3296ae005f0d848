"""PNG plots of the pipelines (the δ histogram of ``mmalign hardness``, BDHS's tries, the demo's margins,
``mmalign eval``'s summary), written atomically; without matplotlib a note instead of a plot."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .jobs import atomic_write_bytes


def save_plot(path: Path, draw: Callable) -> str | None:
    """Draw with ``draw(ax)`` on a fresh matplotlib figure and save it atomically as PNG; None (and a
    note on stderr) when matplotlib is not installed."""
    import sys

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: {path} not written (pip install matplotlib)", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    draw(ax)
    fig.tight_layout()
    atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return str(path)
