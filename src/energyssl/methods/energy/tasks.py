"""The pretext tasks as one kind of thing: a task corrupts a batch (its pixels, or its ViT's
position embeddings), has the energy model restore it, and scores each step. Pixel tasks wrap
a corruption (:mod:`.corruptions`), patch sorting restores shuffled position embeddings
(:mod:`.sorting`), and a per-image mix gives each image one of them.

Every task also reports on held-out images (restoration error, sorting accuracy) and gives the
rows of the restoration figures.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import Tensor, nn

from ...config import option
from ...errors import UserError
from ...rng import Generator, uniform
from ...vit_tokens import install_sincos_positions, require_vit
from .corruptions import TASKS, Corruption, build_corruption, task_corruptions, tasks_in_use
from .model import EnergyModel, Restoration
from .sorting import PatchSorting, shuffle_and_sort, sorting_report

SORTING = "sorting"
Block = tuple[Tensor, list[Tensor], Tensor | None]  # corrupted, each restoration step, original (or None)


def task_option() -> Any:
    """The ``task`` option of the methods that train on a pretext task (energy, AE + task)."""
    return option(
        "masking",
        "pretext task: grid_mask, block_mask, block_mask_large, super_resolution, denoise, colorize, mixed (one "
        "of all per image), masking (one of the three masks per image), or sorting (ViT: restore shuffled position "
        "embeddings; also joins mixed via corruption.mixed.tasks)",
        flag=True,
    )


def corruption_option() -> Any:
    return option(
        {},
        "per-task parameters, e.g. {grid_mask: {cell: 4, ratio: 0.7}, mixed: {tasks: [...], weights: [...]}}; "
        "on the command line: --set corruption.grid_mask.ratio=0.5",
        flag=True,
    )


def check_task_parameters(task: str, params: Any) -> None:
    """``params`` is a mapping whose every key names a task ``task`` draws from."""
    if not isinstance(params, dict):
        raise UserError("corruption must be a mapping of task name to parameters")
    unknown = sorted(set(params) - {*TASKS, SORTING})
    if unknown:
        close = difflib.get_close_matches(unknown[0], [*TASKS, SORTING], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f"; tasks: {', '.join([*TASKS, SORTING])}"
        raise UserError(f"corruption parameters for an unknown task '{unknown[0]}'{hint}")
    unused = sorted(set(params) - tasks_in_use(task, params))
    if unused:
        raise UserError(f"corruption parameters for {', '.join(unused)} do not apply to task {task}")


def split_sorting(task: str, params: dict[str, Any]) -> tuple[str | None, dict[str, Any], float]:
    """(pixel task or None, its parameters, share of images given to patch sorting).

    ``sorting`` alone, or ``mixed`` whose ``tasks`` list names ``sorting`` (it then gets its
    weight's share of the images; the other tasks share the rest)."""
    if task == SORTING:
        return None, params, 1.0
    mixed = params.get("mixed", {})
    if task != "mixed" or SORTING not in mixed.get("tasks", []):
        return task, params, 0.0
    tasks = list(mixed["tasks"])
    weights = list(mixed.get("weights") or [1.0] * len(tasks))
    if len(weights) != len(tasks):
        raise UserError(f"mixed: {len(weights)} weights for {len(tasks)} tasks")
    index = tasks.index(SORTING)
    share = weights[index] / sum(weights)
    tasks.pop(index)
    weights.pop(index)
    if not tasks:
        return None, params, 1.0
    return "mixed", {**params, "mixed": {**mixed, "tasks": tasks, "weights": weights}}, share


class PixelTask:
    """Corrupt the pixels and restore them: ``corruption`` is one task or a per-image mix."""

    def __init__(self, name: str, corruption: Corruption) -> None:
        self.name, self.corruption = name, corruption

    def __call__(
        self, model: EnergyModel, images: Tensor, generator: Generator, steps: int, grad_scale: float
    ) -> Restoration:
        return model(images, self.corrupt(images, generator), steps=steps, grad_scale=grad_scale)

    @torch.compiler.disable
    def corrupt(self, images: Tensor, generator: Generator) -> Tensor:
        """Eager under ``--compile``: a mix's random, data-dependent subsets would make every
        batch a new graph; the restoration after it is compiled once."""
        return self.corruption(images, generator)

    def parts(self) -> dict[str, Corruption]:
        """The single corruptions in use, by name (a mix's parts, or the one task)."""
        return task_corruptions(self.corruption, self.name)

    def report(self, model: EnergyModel, images: Tensor, steps: int, seed: int) -> dict[str, dict[str, float]]:
        return {name: pixel_report(model, images, corruption, steps, seed) for name, corruption in self.parts().items()}

    def blocks(self, model: EnergyModel, images: Tensor, steps: int, seed: int) -> dict[str, Block]:
        return restoration_blocks(model, self.parts(), images, steps, seed)


class SortingTask:
    """Shuffle the ViT's position embeddings among each image's patches and restore them; the
    embedding is fixed to 2-D sin-cos values while pretraining."""

    name = SORTING
    corruption = None  # no pixel corruption

    def __init__(self, sorting: PatchSorting, backbone: nn.Module) -> None:
        vit = require_vit(backbone, "patch sorting", class_token=False)
        sorting.edge_choices(vit.patch_embed.patch_size[0])  # refuse a kernel it would zero, up front
        self.sorting, self.table = sorting, install_sincos_positions(vit, trainable=False)

    def __call__(
        self, model: EnergyModel, images: Tensor, generator: Generator, steps: int, grad_scale: float
    ) -> Restoration:
        return shuffle_and_sort(model, self.sorting, self.table.to(images), images, generator, steps, grad_scale)

    def report(self, model: EnergyModel, images: Tensor, steps: int, seed: int) -> dict[str, dict[str, float]]:
        return {SORTING: sorting_report(model, self.sorting, self.table, images, steps, seed)}

    def blocks(self, model: EnergyModel, images: Tensor, steps: int, seed: int) -> dict[str, Block]:
        return {}  # positions have no picture


class SortingMix:
    """Patch sorting for a ``share`` of the images (drawn per image), a pixel task for the rest."""

    def __init__(self, pixels: PixelTask, sorting: SortingTask, share: float) -> None:
        self.pixels, self.sorting, self.share = pixels, sorting, share
        self.corruption = pixels.corruption

    def __call__(
        self, model: EnergyModel, images: Tensor, generator: Generator, steps: int, grad_scale: float
    ) -> Restoration:
        to_sort = uniform((len(images),), generator, images.device) < self.share
        parts = []
        if (~to_sort).any():
            parts.append((int((~to_sort).sum()), self.pixels(model, images[~to_sort], generator, steps, grad_scale)))
        if to_sort.any():
            parts.append((int(to_sort.sum()), self.sorting(model, images[to_sort], generator, steps, grad_scale)))
        total = len(images)

        def weighted(get) -> Tensor:
            return sum(n / total * get(part) for n, part in parts)

        step_losses = [weighted(lambda p, k=k: p.step_losses[k]) for k in range(steps)]
        return Restoration(weighted(lambda p: p.loss), step_losses, [], weighted(lambda p: p.baseline))

    def report(self, model: EnergyModel, images: Tensor, steps: int, seed: int) -> dict[str, dict[str, float]]:
        return {**self.pixels.report(model, images, steps, seed), **self.sorting.report(model, images, steps, seed)}

    def blocks(self, model: EnergyModel, images: Tensor, steps: int, seed: int) -> dict[str, Block]:
        return self.pixels.blocks(model, images, steps, seed)


PretextTask = PixelTask | SortingTask | SortingMix


def pixel_corruption(task: str, params: dict[str, Any], in_chans: int, mean, std) -> Corruption | None:
    """The pixel part of ``task`` (None for sorting alone)."""
    pixel_task, pixel_params, _ = split_sorting(task, params)
    if pixel_task is None:
        return None
    return build_corruption(pixel_task, pixel_params, in_chans=in_chans, mean=mean, std=std)


def build_task(task: str, params: dict[str, Any], backbone: nn.Module, in_chans: int, mean, std) -> PretextTask:
    """The pretext task ``task`` with its ``corruption`` parameters, for ``backbone``'s data."""
    pixel_task, _, share = split_sorting(task, params)
    corruption = pixel_corruption(task, params, in_chans, mean, std)
    pixels = None if corruption is None else PixelTask(pixel_task or task, corruption)
    if share == 0:
        assert pixels is not None
        return pixels
    sorting_params = dict(params.get(SORTING, {}))
    unknown = set(sorting_params) - set(PatchSorting.__dataclass_fields__)
    if unknown:
        raise UserError(f"unknown parameter(s) for sorting: {', '.join(sorted(unknown))}")
    sorting = SortingTask(PatchSorting(**sorting_params), backbone)
    return sorting if pixels is None else SortingMix(pixels, sorting, share)


def pixel_report(
    model: EnergyModel, images: Tensor, corruption: Corruption, steps: int, seed: int = 0, batch_size: int = 128
) -> dict[str, float]:
    """Mean squared error to the clean images of the corrupted input and of each restoration
    step: the restoration works where ``restored_mse`` < ``corrupted_mse``."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    sums = torch.zeros(steps + 1, dtype=torch.float64)
    for start in range(0, len(images), batch_size):
        clean = images[start : start + batch_size]
        corrupted = corruption(clean, generator)
        restored = model.restore(corrupted, steps)
        for k, x in enumerate([corrupted, *restored]):
            sums[k] += ((x.detach() - clean) ** 2).mean(dim=(1, 2, 3)).sum().item()
    mse = (sums / len(images)).tolist()
    row = {"corrupted_mse": mse[0], **{f"step{k}_mse": v for k, v in enumerate(mse[1:], 1)}}
    row["restored_mse"] = mse[-1]
    return row


def restoration_blocks(
    model: EnergyModel, corruptions: dict[str, Corruption | None], clean: Tensor, steps: int, seed: int
) -> dict[str, Block]:
    """(corrupted, each restoration step, original) per corruption, as the figures draw them; a
    ``None`` corruption restores ``clean`` as given, with no original to compare."""
    blocks = {}
    for name, corruption in corruptions.items():
        corrupted = clean if corruption is None else corruption(clean, torch.Generator().manual_seed(seed))
        restored = [x.detach() for x in model.restore(corrupted, steps)]
        blocks[name] = (corrupted, restored, None if corruption is None else clean)
    return blocks
