"""results.json per evaluation run, accuracy, labeled subsets, and the Markdown report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError

RESULTS = "results.json"


def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of ``fraction`` of each class (at least one image per class), fixed by ``seed``."""
    if not 0 < fraction <= 1:
        raise UserError(f"label fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picked = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        count = max(1, round(fraction * len(members)))
        picked.append(rng.choice(members, count, replace=False))
    return np.sort(np.concatenate(picked))


def dataset_labels(dataset: Any) -> np.ndarray:
    labels = getattr(dataset, "labels", None)
    if labels is None:
        labels = np.array([label for _, label in getattr(dataset, "samples", [])])
    labels = np.asarray(labels)
    if len(labels) == 0 or (labels < 0).any():
        raise UserError("evaluation needs labeled data (class-per-folder images or a labeled dataset)")
    return labels


def topk_correct(logits: Tensor, targets: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of targets within the top-k predictions, for each k not above the class count."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top.eq(targets.view(-1, 1))
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks if k <= logits.shape[1]}


def accuracy_metrics(logits: Tensor, targets: Tensor) -> dict[str, float]:
    correct = topk_correct(logits, targets, (1, 5) if logits.shape[1] > 5 else (1,))
    return {f"top{k}": 100.0 * v / len(targets) for k, v in correct.items()}


def write_results(out: Path, record: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def label_share(fraction: float) -> str:
    """A label fraction as people say it: 1% of labels, 100% of labels."""
    return f"{100 * fraction:g}%"


def summary_line(record: dict[str, Any]) -> str:
    metrics = ", ".join(f"{k} {v:.2f}" for k, v in record["metrics"].items() if isinstance(v, float))
    return (
        f"{record['protocol']} | {record['model']} | {record['dataset']} "
        f"| {label_share(record['label_fraction'])} of labels "
        f"| seed {record['seed']} | {metrics} | {record['wall_time_s']:.0f} s"
    )


def report(paths: list[str]) -> str:
    """A Markdown table of every results.json under ``paths`` (files or folders)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(sorted(p.rglob(RESULTS)))
        else:
            raise UserError(f"no such file or folder: {p}")
    if not files:
        raise UserError(f"no {RESULTS} found under {', '.join(paths)}")
    rows = ["| run | protocol | model | init | data | labels | seed | scored on | top-1 (mIoU) | best val | top-5 |"
            " time (s) |"]  # fmt: skip
    rows.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for f in files:
        try:
            r = json.loads(f.read_text())
            m = r["metrics"]
            init = Path(r["checkpoint"]).parent.name if r.get("checkpoint") else "random init"
            scored = r["config"].get("eval_split", "test")
            rows.append(
                f"| {f.parent.name} | {r['protocol']} | {r['model']} | {init} | {r['dataset']} | "
                f"{label_share(r['label_fraction'])} | {r['seed']} | {scored} | {m.get('top1', m.get('miou')):.2f} | "
                f"{_fmt(m.get('top1_best', m.get('miou_best')))} | "
                f"{_fmt(m.get('top5'))} | {r['wall_time_s']:.0f} |"
            )
        except (KeyError, ValueError, TypeError):
            print(f"warning: skipped {f}: not an energyssl results file", file=sys.stderr)
    if len(rows) == 2:
        raise UserError(f"no readable {RESULTS} under {', '.join(paths)}")
    return "\n".join(rows) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def scored_ks(classes: int) -> tuple[int, ...]:
    """The top-k accuracies reported: top-5 only where there are more than 5 classes."""
    return (1, 5) if classes > 5 else (1,)


@torch.no_grad()
def correct_counts(model: torch.nn.Module, loader, device: torch.device, ks: tuple[int, ...]) -> Tensor:
    """[images, top-k hits for each k]: sums, so the counts of disjoint shards add up."""
    model.eval()
    counts = torch.zeros(1 + len(ks), dtype=torch.float64)
    for images, labels in loader:
        hits = topk_correct(model(images.to(device)).float().cpu(), labels, ks)
        counts += torch.tensor([len(labels), *(hits[k] for k in ks)], dtype=torch.float64)
    return counts


def accuracy_from_counts(counts: Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    return {f"top{k}": 100.0 * counts[i + 1].item() / counts[0].item() for i, k in enumerate(ks)}
