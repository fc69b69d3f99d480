"""The PNG plots of bench/report.py (matplotlib, Agg backend: no display needed).

Each plot is one or two panels of lines over a shared x axis: a scaling series of the
report (devices, offered rate, stored rows), one line per consumer or per variant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402


def _plain(value: float, _pos: int | None = None) -> str:
    """Tick labels as plain numbers (1,000 rather than 10^3)."""
    return f"{value:,.0f}" if value >= 10 else f"{value:g}"


@dataclass
class Line:
    label: str
    x: list[float]
    y: list[float | None]
    style: str = "o-"
    color: str | None = None


@dataclass
class Panel:
    title: str
    ylabel: str
    lines: list[Line] = field(default_factory=list)
    logy: bool = False


def save(
    path: Path,
    panels: Sequence[Panel],
    *,
    xlabel: str,
    logx: bool = False,
    suptitle: str = "",
    note: str = "",
) -> Path:
    """Draw ``panels`` side by side into ``path`` (PNG) and return it."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        drawn = 0
        for line in panel.lines:
            points = [(x, y) for x, y in zip(line.x, line.y, strict=True) if y is not None]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, line.style, label=line.label, color=line.color)
            drawn += 1
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(panel.ylabel)
        if logx:
            ax.set_xscale("log")
            ax.set_xticks(sorted({x for line in panel.lines for x in line.x}))
            ax.xaxis.set_major_formatter(FuncFormatter(_plain))
            ax.xaxis.set_minor_formatter(NullFormatter())
        if panel.logy:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(_plain))
        else:
            ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
        if drawn > 1:
            ax.legend(fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=11)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, alpha=0.7)
    fig.tight_layout(rect=(0, 0.03 if note else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
