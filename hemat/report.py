"""Plots and the markdown report card of a run directory."""

from __future__ import annotations

import os
from pathlib import Path

from hemat.errors import HematError


def plot_series(records: list[dict], keys: list[str], out_png: str | Path, title: str, x_key: str = "step",
                ylabel: str | None = None, log_y: bool = False) -> Path | None:
    """One line per key over x_key (records lacking a key are skipped for that line), written atomically.
    None if there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: [(r[x_key], r[k]) for r in records if r.get(k) is not None and x_key in r] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=key, marker="o" if len(points) < 30 else None, markersize=3)
    ax.set_title(title)
    ax.set_xlabel(x_key)
    if ylabel:
        ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out_png)


def save_figure(fig, png: str | Path) -> Path:
    """Lay out, write atomically (a temporary file, then rename) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    png = Path(png)
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png)
    return png


def markdown_table(header: list[str], rows: list[list]) -> str:
    if any(len(r) != len(header) for r in rows):
        raise HematError("markdown_table: every row needs one cell per header column")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def write_report(path: str | Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """sections: (heading, markdown body) pairs, written in order."""
    path = Path(path)
    body = [f"# {title}", ""]
    for heading, text in sections:
        body += [f"## {heading}", "", text.rstrip(), ""]
    path.write_text("\n".join(body))
    return path
