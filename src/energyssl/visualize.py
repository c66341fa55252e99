"""Figures without pyplot: a ``matplotlib.figure.Figure`` written to PNG (the global backend stays
the caller's), training curves, and the ``plot`` command."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from .errors import UserError
from .metrics import read_metrics

CURVE_KEYS = ("loss", "alpha", "momentum", "lr")  # drawn where a run logged them


def save_figure(fig: Figure, path: Path, top_inches: float = 0.0) -> Path:
    """Lay out (keeping ``top_inches`` free for a title) and write a PNG."""
    fig.tight_layout(rect=(0, 0, 1, 1 - top_inches / fig.get_figheight()))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def save_curves(path: Path, runs: dict[str, list[dict]], keys: Sequence[str] = CURVE_KEYS) -> Path:
    """One panel per metric some run logged, against the step, one line per run (a run of one
    logged step is a dot)."""
    keys = [key for key in keys if any(key in r for records in runs.values() for r in records)]
    if not keys:
        raise UserError(f"nothing to plot: no run logged any of {', '.join(CURVE_KEYS)}")
    fig = Figure(figsize=(4.5 * len(keys), 3.5))
    axes = fig.subplots(1, len(keys), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for name, records in runs.items():
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, label=name, marker="o" if len(points) == 1 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        if key == "loss":
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot(runs: list[str], out: Path) -> Path:
    """Loss, alpha and lr curves of one or more runs, overlaid."""
    records = {}
    for run in runs:
        metrics = Path(run) / "metrics.jsonl"
        if not metrics.is_file():
            print(f"warning: skipped {run}: no metrics.jsonl")
            continue
        records[Path(run).resolve().name] = read_metrics(metrics)
    if not records:
        raise UserError(f"no metrics.jsonl in {', '.join(runs)}")
    path = save_curves(out, records)
    print(f"saved {path}")
    return path
