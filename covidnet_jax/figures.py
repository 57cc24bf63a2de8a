"""Matplotlib for the project's PNGs: headless (Agg), and written the same way everywhere.

`pyplot`/`save_figure` for figures drawn with pyplot; `new_figure`/`figure_png` for figures
that never touch pyplot's global state (no backend, safe in any thread).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """`matplotlib.pyplot` on the headless Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, *, dpi: int = 120) -> Path:
    """Writes `fig` as a PNG at `path` (parents created) and closes it.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def new_figure(width: float, height: float) -> Any:
    """A Matplotlib figure of `width` x `height` inches at 100 dpi, laid out by
    "constrained" layout, made without pyplot (no GUI backend, no global figure list)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def figure_png(fig: Any) -> bytes:
    """The PNG bytes of a Matplotlib figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
