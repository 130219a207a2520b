"""PNG focus maps: which level of detail each part of the history is shown at."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

_COLORS = ["#d62728", "#ff7f0e", "#2ca02c", "#1f77b4", "#9467bd", "#8c564b"]


def focus_map(
    rows: list[np.ndarray],
    path: str | Path,
    labels: list[str] | None = None,
    marks: dict[str, tuple[int, int]] | None = None,
    title: str = "working context: level of detail over the history",
) -> Path:
    """One row per snapshot: the level each history token is shown at (0 = raw)."""
    width = max(len(r) for r in rows)
    img = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        img[i, : len(r)] = r
    top = int(np.nanmax(img)) if np.isfinite(img).any() else 0
    cmap = ListedColormap(_COLORS[: top + 1])
    fig, ax = plt.subplots(figsize=(11, 1.2 + 0.28 * len(rows)))
    im = ax.imshow(
        img, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5, vmax=top + 0.5
    )
    cbar = fig.colorbar(im, ax=ax, ticks=range(top + 1), pad=0.01)
    cbar.ax.set_yticklabels(["raw" if lv == 0 else f"L{lv} gist" for lv in range(top + 1)])
    ax.set_xlabel("history position (tokens)")
    if labels:
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
    for name, (start, end) in (marks or {}).items():
        ax.axvspan(start, end, color="black", alpha=0.25)
        ax.annotate(name, (start, -0.6), fontsize=8, annotation_clip=False)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
