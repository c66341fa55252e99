"""The energy method's figures and their numbers: restoration grids, energy histograms, PSNR
and AUROC (matplotlib Figures; the global backend stays the caller's)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from ...visualize import save_figure


def to_pixels(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Normalised images (B, C, H, W) back to [0, 1] pixels."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)


def psnr(x: Tensor, reference: Tensor) -> Tensor:
    """Per-image PSNR in dB of [0, 1] pixel images."""
    mse = ((x - reference) ** 2).flatten(1).mean(dim=1).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def _show(ax: Axes, image: Tensor) -> None:
    array = image.detach().cpu().float().numpy()
    if array.shape[0] == 1:
        ax.imshow(array[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.transpose(array, (1, 2, 0)))
    ax.set_xticks([])
    ax.set_yticks([])


def save_restoration_grid(
    path: Path,
    blocks: dict[str, tuple[Tensor, list[Tensor], Tensor | None]],
    mean: Sequence[float],
    std: Sequence[float],
    title: str = "",
    names: Sequence[str] | None = None,
) -> Path:
    """One block of rows per task; each row an image (labelled with ``names``, else #i):
    corrupted, every restoration step, and the original when known. Tensors are normalised
    (B, C, H, W)."""
    steps = max(len(s) for _, s, _ in blocks.values())
    has_original = any(o is not None for _, _, o in blocks.values())
    columns = ["corrupted", *[f"step {k}" for k in range(1, steps + 1)]] + (["original"] if has_original else [])
    rows = [(task, i) for task, (c, _, _) in blocks.items() for i in range(len(c))]
    fig = Figure(figsize=(1.4 * len(columns) + 1.2, 1.4 * len(rows) + 0.6))
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, (task, i) in enumerate(rows):
        corrupted, restored, original = blocks[task]
        images = [corrupted[i], *[s[i] for s in restored]] + ([original[i]] if original is not None else [])
        for c, ax in enumerate(axes[r]):
            if c < len(images):
                _show(ax, to_pixels(images[c][None], mean, std)[0])
            else:
                ax.axis("off")
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
        label = names[i] if names else f"#{i}"
        axes[r][0].set_ylabel(f"{task}\n{label}" if i == 0 else label, fontsize=8, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, top_inches=0.3 if title else 0.0)


def save_energy_histogram(path: Path, groups: dict[str, np.ndarray], title: str = "") -> Path:
    """Overlaid histograms of energy scores, one per group (real, corrupted, restored, ...)."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    values = np.concatenate(list(groups.values()))
    bins = np.linspace(values.min(), values.max(), 50)
    for label, energies in groups.items():
        ax.hist(energies, bins=bins, alpha=0.5, label=f"{label} (mean {energies.mean():.3g})")
    ax.set_xlabel("energy E(x) (lower = more likely)")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Probability that a positive scores above a negative (ties count half): Mann-Whitney U."""
    scores = np.concatenate([negatives, positives])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    u = ranks[len(negatives) :].sum() - len(positives) * (len(positives) + 1) / 2
    return float(u / (len(negatives) * len(positives)))
