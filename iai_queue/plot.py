"""Latency CDFs of a benchmark run, drawn with matplotlib (extra ``plot``).

One figure, two panels: the enqueue latency (µs, log scale) and the whole
recall latency (ms) of each mode, as empirical CDFs — where a p50 or a p99
sits, and how long the tail is, at a glance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["check_plot_path", "plot_latency_cdfs"]

_COLOURS = {"queued": "tab:green", "sync": "tab:red", "noop": "tab:blue"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    return plt


def check_plot_path(path: Path) -> None:
    """Raises ImportError without matplotlib, ValueError for a file type it cannot write."""
    try:
        plt = _pyplot()
    except ImportError:
        raise ImportError('drawing needs matplotlib: pip install "iai_queue[plot]"') from None
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise ValueError(f"{str(path)!r}: unknown image type {path.suffix or '(none)'}; "
                         f"use one of {', '.join('.' + f for f in sorted(formats))}")


def _cdf(values: Sequence[float]):
    xs = sorted(values)
    n = len(xs)
    return xs, [(i + 1) / n for i in range(n)]


def plot_latency_cdfs(samples: Mapping[str, Mapping[str, Sequence[float]]], path: Path, *, title: str = "") -> Path:
    """``samples[mode]["enqueue_us" | "recall_ms"]`` → a PNG (or any matplotlib format) at ``path``."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, series in samples.items():
        colour = _COLOURS.get(mode)
        for ax, key in ((left, "enqueue_us"), (right, "recall_ms")):
            values = [v for v in series.get(key, ()) if v > 0] if ax is left else list(series.get(key, ()))
            if values:
                xs, ys = _cdf(values)
                ax.step(xs, ys, where="post", label=f"{mode} (n={len(values)})", color=colour)
    left.set_xscale("log")
    left.set_xlabel("provenance enqueue / write latency (µs, log scale)")
    right.set_xlabel("whole recall latency (ms)")
    for ax in (left, right):
        ax.set_ylabel("fraction of calls ≤ x")
        ax.set_ylim(0, 1.0)
        for q in (0.5, 0.99):
            ax.axhline(q, color="grey", linewidth=0.6, linestyle=":")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="lower right")
    fig.suptitle(f"iai-queue bench: latency CDFs{' - ' + title if title else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
