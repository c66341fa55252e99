"""The pretext objective of a training step: corrupt the batch (pixels, position embeddings or
both, one task per image), restore it with the energy model, and return the loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .corruptions import Corruption, build_corruption, uniform
from .energy import EnergyModel, Restoration
from .errors import UserError
from .sorting import PatchSorting, install_sincos, sorting_restoration
from .vit_tokens import require_vit

SORTING = "sorting"


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


class PretextObjective(nn.Module):
    """Wraps the energy model for training (and for DDP): ``forward(images, generator)``."""

    def __init__(
        self,
        model: EnergyModel,
        corruption: Corruption | None,
        sorting: PatchSorting | None = None,
        sorting_share: float = 0.0,
    ) -> None:
        super().__init__()
        self.model, self.corruption, self.sorting, self.sorting_share = model, corruption, sorting, sorting_share
        self.table: Tensor | None = None
        if sorting is not None:
            vit = require_vit(model.backbone, "patch sorting", class_token=False)
            sorting.edge_choices(vit.patch_embed.patch_size[0])  # refuse a kernel it would zero, up front
            self.table = install_sincos(vit, trainable=False)

    def _pixels(self, images: Tensor, generator: torch.Generator | None, steps: int, grad_scale: float) -> Restoration:
        assert self.corruption is not None
        return self.model(images, self.corruption(images, generator), steps=steps, grad_scale=grad_scale)

    def _sorting(self, images: Tensor, generator: torch.Generator | None, steps: int, grad_scale: float) -> Restoration:
        assert self.sorting is not None and self.table is not None
        table = self.table.to(images)
        return sorting_restoration(self.model, self.sorting, table, images, generator, steps, grad_scale)

    def calibrate_alpha(self, images: Tensor) -> float:
        """Start alpha at the size of this data's corruptions (see
        :meth:`EnergyModel.calibrate_alpha`); sorting alone keeps its alpha."""
        if self.corruption is None:
            return self.model.alpha.item()
        return self.model.calibrate_alpha(self.corruption(images, torch.Generator().manual_seed(0)), images)

    def forward(
        self, images: Tensor, generator: torch.Generator | None = None, steps: int = 2, grad_scale: float = 1.0
    ) -> Restoration:
        if self.sorting is None:
            return self._pixels(images, generator, steps, grad_scale)
        if self.corruption is None:
            return self._sorting(images, generator, steps, grad_scale)
        to_sort = uniform((len(images),), generator, images.device) < self.sorting_share
        parts = []
        if (~to_sort).any():
            parts.append((int((~to_sort).sum()), self._pixels(images[~to_sort], generator, steps, grad_scale)))
        if to_sort.any():
            parts.append((int(to_sort.sum()), self._sorting(images[to_sort], generator, steps, grad_scale)))
        total = len(images)

        def weighted(get) -> Tensor:
            return sum(n / total * get(part) for n, part in parts)

        step_losses = [weighted(lambda p, k=k: p.step_losses[k]) for k in range(steps)]
        return Restoration(weighted(lambda p: p.loss), step_losses, [], weighted(lambda p: p.baseline))


def objective_parts(
    task: str, params: dict[str, Any], in_chans: int, mean, std
) -> tuple[Corruption | None, PatchSorting | None, float]:
    """(pixel corruption, patch sorting, share of images sorted) of ``task``."""
    pixel_task, pixel_params, share = split_sorting(task, params)
    corruption = None
    if pixel_task is not None:
        corruption = build_corruption(pixel_task, pixel_params, in_chans=in_chans, mean=mean, std=std)
    sorting = None
    if share > 0:
        sorting_params = dict(params.get(SORTING, {}))
        unknown = set(sorting_params) - set(PatchSorting.__dataclass_fields__)
        if unknown:
            raise UserError(f"unknown parameter(s) for sorting: {', '.join(sorted(unknown))}")
        sorting = PatchSorting(**sorting_params)
    return corruption, sorting, share


def build_objective(
    model: EnergyModel, task: str, params: dict[str, Any], in_chans: int, mean, std
) -> PretextObjective:
    return PretextObjective(model, *objective_parts(task, params, in_chans, mean, std))


def freeze_unreached_parameters(objective: nn.Module, example: Tensor) -> list[str]:
    """Stop training the parameters one backward pass of the objective does not reach (e.g. a
    final norm's bias, which shifts E by a constant so dE/dx ignores it): they could never
    learn, and DDP rejects parameters without a gradient. Returns their names."""
    objective.zero_grad(set_to_none=True)
    objective(example, torch.Generator().manual_seed(0)).loss.backward()
    dead = [name for name, p in objective.named_parameters() if p.requires_grad and p.grad is None]
    objective.zero_grad(set_to_none=True)
    return freeze_parameters(objective, dead)


def freeze_parameters(objective: nn.Module, names: list[str]) -> list[str]:
    """Stop training the parameters ``names`` (a resumed run freezes what the run froze)."""
    params = dict(objective.named_parameters())
    unknown = [name for name in names if name not in params]
    if unknown:
        raise UserError(f"the checkpoint froze parameters this model does not have: {', '.join(unknown)}")
    for name in names:
        params[name].requires_grad_(False)
    return names
