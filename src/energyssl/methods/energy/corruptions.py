"""Corruptions: the pretext tasks. Each maps a batch of normalised images (B, C, H, W)
to a corrupted batch of the same shape, drawing its randomness per image from an
optional ``torch.Generator`` so a seed reproduces it exactly.

Masked pixels are set to 0, the dataset mean in normalised space.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import UserError
from ...rng import Generator, uniform


def require(ok: bool, message: str) -> None:
    """A parameter out of its range is one clear error, not a crash or a silent clamp."""
    if not ok:
        raise UserError(message)


class Corruption:
    """Base class: a named, parametrised corruption. Subclasses implement ``__call__``."""

    name: ClassVar[str]

    def __call__(self, x: Tensor, generator: Generator = None) -> Tensor:
        raise NotImplementedError


@dataclass
class GridMask(Corruption):
    """Blank ``ratio`` of the cells of a square grid (exactly round(ratio * cells) per image)."""

    name: ClassVar[str] = "grid_mask"
    cell: int = 4
    ratio: float = 0.7

    def __post_init__(self) -> None:
        require(self.cell >= 1, f"grid_mask: cell must be >= 1, got {self.cell}")
        require(0 <= self.ratio <= 1, f"grid_mask: ratio must be in [0, 1], got {self.ratio}")

    def mask(self, batch: int, height: int, width: int, generator: Generator, device: torch.device) -> Tensor:
        """Boolean mask (B, 1, H, W), True where blanked."""
        rows, cols = math.ceil(height / self.cell), math.ceil(width / self.cell)
        n_masked = round(self.ratio * rows * cols)
        order = uniform((batch, rows * cols), generator, device).argsort(dim=1)
        cells = torch.zeros(batch, rows * cols, dtype=torch.bool, device=device)
        cells.scatter_(1, order[:, :n_masked], True)
        cells = cells.view(batch, 1, rows, cols)
        full = cells.repeat_interleave(self.cell, dim=2).repeat_interleave(self.cell, dim=3)
        return full[:, :, :height, :width]

    def __call__(self, x: Tensor, generator: Generator = None) -> Tensor:
        b, _, h, w = x.shape
        return x.masked_fill(self.mask(b, h, w, generator, x.device), 0.0)


@dataclass
class BlockMask(Corruption):
    """Blank ``count`` rectangles per image; each covers ``scale`` (fraction of the image
    area) with aspect ratio in ``aspect`` (log-uniform), at a uniform position."""

    name: ClassVar[str] = "block_mask"
    count: int = 75
    scale: tuple[float, float] = (0.001, 0.01)
    aspect: tuple[float, float] = (0.3, 3.3)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "small": {"count": 75, "scale": (0.001, 0.01)},
        "large": {"count": 25, "scale": (0.01, 0.04)},
    }

    def __post_init__(self) -> None:
        require(self.count >= 1, f"block_mask: count must be >= 1, got {self.count}")
        require(
            0 < self.scale[0] <= self.scale[1] <= 1, f"block_mask: scale must be 0 < lo <= hi <= 1, got {self.scale}"
        )
        require(0 < self.aspect[0] <= self.aspect[1], f"block_mask: aspect must be 0 < lo <= hi, got {self.aspect}")

    def mask(self, batch: int, height: int, width: int, generator: Generator, device: torch.device) -> Tensor:
        u = uniform((4, batch, self.count, 1, 1), generator, device)
        area = (self.scale[0] + (self.scale[1] - self.scale[0]) * u[0]) * height * width
        log_lo, log_hi = math.log(self.aspect[0]), math.log(self.aspect[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])
        block_h = torch.sqrt(area * aspect).round().clamp(1, height)
        block_w = torch.sqrt(area / aspect).round().clamp(1, width)
        top = ((height - block_h + 1) * u[2]).floor()
        left = ((width - block_w + 1) * u[3]).floor()
        ys = torch.arange(height, device=device).view(1, 1, height)
        xs = torch.arange(width, device=device).view(1, 1, width)
        rows = ((ys >= top.view(batch, -1, 1)) & (ys < (top + block_h).view(batch, -1, 1))).float()  # (B, n, H)
        cols = ((xs >= left.view(batch, -1, 1)) & (xs < (left + block_w).view(batch, -1, 1))).float()  # (B, n, W)
        # pixel (y, x) is covered when some block spans both its row and its column: a batched
        # (H, n) @ (n, W) product keeps memory at O(B H W), not O(B n H W)
        with torch.autocast(device.type, enabled=False):
            covered = torch.bmm(rows.transpose(1, 2), cols)
        return (covered > 0).unsqueeze(1)

    def __call__(self, x: Tensor, generator: Generator = None) -> Tensor:
        b, _, h, w = x.shape
        return x.masked_fill(self.mask(b, h, w, generator, x.device), 0.0)


@dataclass
class SuperResolution(Corruption):
    """Bicubic downsampling by ``factor``, then nearest-neighbour upsampling back."""

    name: ClassVar[str] = "super_resolution"
    factor: int = 2

    def __post_init__(self) -> None:
        require(self.factor >= 1, f"super_resolution: factor must be >= 1, got {self.factor}")

    def __call__(self, x: Tensor, generator: Generator = None) -> Tensor:
        h, w = x.shape[-2:]
        small = F.interpolate(
            x, size=(max(1, h // self.factor), max(1, w // self.factor)), mode="bicubic", align_corners=False
        )
        return F.interpolate(small, size=(h, w), mode="nearest")


@dataclass
class Denoise(Corruption):
    """``sqrt(g) * x + sqrt(1 - g) * noise`` with ``g`` uniform in ``gamma`` per image."""

    name: ClassVar[str] = "denoise"
    gamma: tuple[float, float] = (0.1, 0.9)

    def __post_init__(self) -> None:
        require(
            0 <= self.gamma[0] <= self.gamma[1] <= 1, f"denoise: gamma must be 0 <= lo <= hi <= 1, got {self.gamma}"
        )

    def __call__(self, x: Tensor, generator: Generator = None) -> Tensor:
        g = self.gamma[0] + (self.gamma[1] - self.gamma[0]) * uniform((x.shape[0], 1, 1, 1), generator, x.device)
        gen_device = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
        return g.sqrt() * x + (1 - g).sqrt() * noise


@dataclass
class Colorize(Corruption):
    """Grey image (ITU-R 601 luma, computed on un-normalised pixels) on every channel."""

    name: ClassVar[str] = "colorize"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __call__(self, x: Tensor, generator: Generator = None) -> Tensor:
        if x.shape[1] != 3:
            raise UserError(
                f"colorization needs 3-channel images, got {x.shape[1]} channel(s); "
                "choose another task (e.g. grid_mask) for grayscale data"
            )
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        pixels = x * std + mean
        weights = torch.tensor((0.299, 0.587, 0.114), device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        grey = (pixels * weights).sum(dim=1, keepdim=True)
        return (grey - mean) / std


@dataclass
class Mixed(Corruption):
    """One corruption drawn per image, with probabilities proportional to ``weights``."""

    name: ClassVar[str] = "mixed"
    corruptions: dict[str, Corruption] = field(default_factory=dict)
    weights: list[float] | None = None

    def __post_init__(self) -> None:
        if not self.corruptions:
            raise UserError("mixed needs at least one corruption")
        if self.weights is not None and len(self.weights) != len(self.corruptions):
            raise UserError(f"mixed: {len(self.weights)} weights for {len(self.corruptions)} corruptions")

    def choose(self, batch: int, generator: Generator, device: torch.device) -> Tensor:
        """Index of the corruption applied to each image."""
        weights = torch.tensor(self.weights or [1.0] * len(self.corruptions), dtype=torch.float)
        cumulative = (weights / weights.sum()).cumsum(0).to(device)
        u = uniform((batch, 1), generator, device)
        return (u >= cumulative[:-1].view(1, -1)).sum(dim=1)

    def __call__(self, x: Tensor, generator: Generator = None) -> Tensor:
        choice = self.choose(x.shape[0], generator, x.device)
        out = x.clone()
        for index, corruption in enumerate(self.corruptions.values()):
            picked = (choice == index).nonzero().squeeze(1)
            if picked.numel():
                out[picked] = corruption(x[picked], generator)
        return out


CORRUPTIONS: dict[str, type[Corruption]] = {
    cls.name: cls for cls in (GridMask, BlockMask, SuperResolution, Denoise, Colorize, Mixed)
}
SINGLE_TASKS = ("grid_mask", "block_mask", "block_mask_large", "super_resolution", "denoise", "colorize")
# A per-image mixture's default tasks (None: every task the data allows).
MIXTURES: dict[str, tuple[str, ...] | None] = {
    "mixed": None,
    "masking": ("grid_mask", "block_mask", "block_mask_large"),
}
TASKS = SINGLE_TASKS + tuple(MIXTURES)


def build_corruption(
    task: str, params: dict[str, dict[str, Any]] | None = None, *, in_chans: int = 3, mean=None, std=None
) -> Corruption:
    """Build the corruption named ``task`` with per-corruption ``params`` from the config.

    ``mixed`` draws among ``params["mixed"]["tasks"]`` (default: every task the data
    allows, colorization only for 3-channel images) with optional ``weights``; ``masking`` is
    the same with the three masks by default.
    """
    params = params or {}
    if task not in TASKS:
        raise UserError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}, sorting (ViT)")
    if task in MIXTURES:
        mixture = dict(params.get(task, {}))
        default = MIXTURES[task] or [t for t in SINGLE_TASKS if t != "colorize" or in_chans == 3]
        tasks = mixture.pop("tasks", default)
        weights = mixture.pop("weights", None)
        if mixture:
            raise UserError(f"unknown parameter(s) for {task}: {', '.join(mixture)}")
        if any(t in MIXTURES for t in tasks):
            raise UserError(f"{task} cannot contain a mixture ({', '.join(MIXTURES)})")
        parts = {t: build_corruption(t, params, in_chans=in_chans, mean=mean, std=std) for t in tasks}
        return Mixed(parts, weights)
    if task == "colorize" and in_chans != 3:
        raise UserError(f"colorization needs 3-channel images, the data has {in_chans} channel(s)")
    if task == "block_mask_large":
        kwargs = {**BlockMask.PRESETS["large"], **params.get("block_mask_large", {})}
        return _construct(BlockMask, task, kwargs)
    kwargs = dict(params.get(task, {}))
    if task == "colorize" and mean is not None:
        kwargs.setdefault("mean", tuple(mean))
        kwargs.setdefault("std", tuple(std))
    return _construct(CORRUPTIONS[task], task, kwargs)


def tasks_in_use(task: str, params: dict[str, Any], in_chans: int = 3) -> set[str]:
    """The corruption names ``task`` draws from (itself, or a mixture's and the mixture's own
    name): the keys of ``corruption`` parameters that can take effect."""
    if task not in MIXTURES:
        return {task}
    default = MIXTURES[task] or [t for t in SINGLE_TASKS if t != "colorize" or in_chans == 3]
    return {task, *params.get(task, {}).get("tasks", default)}


def task_corruptions(corruption: Corruption, task: str) -> dict[str, Corruption]:
    """The individual corruptions in use, by name (the parts of ``mixed``, or the one task)."""
    if isinstance(corruption, Mixed):
        return dict(corruption.corruptions)
    return {task: corruption}


def _construct(cls: type[Corruption], task: str, kwargs: dict[str, Any]) -> Corruption:
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(kwargs) - fields
    if unknown:
        raise UserError(
            f"unknown parameter(s) for {task}: {', '.join(sorted(unknown))}; known: {', '.join(sorted(fields))}"
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    return cls(**kwargs)
