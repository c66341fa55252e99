"""The one interface every pretraining method implements, and what the harness gives it.

A method is an ``nn.Module`` with:

* ``backbone``: the timm model that is exported and fine-tuned; everything else (decoder,
  projector, teacher, energy head) is the method's own and is dropped on export;
* ``Options``: a dataclass of its ``--method-options``, validated before anything is built;
* ``transform(...)``: the views of an image it trains on (one crop unless it says otherwise);
* ``forward(views, generator) -> StepOutput``: the loss of a batch and what to log;
* ``after_step(progress)``: per-step updates outside the optimizer (an EMA teacher, momentum
  and temperature schedules), with ``progress`` the share of the run done, in [0, 1].
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import PretrainConfig
from ..data import DataInfo, pretrain_transform

Generator = torch.Generator | None


@dataclass
class StepOutput:
    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)  # scalars for metrics.jsonl (averaged over processes)


@dataclass
class NoOptions:
    pass


@dataclass
class BuildContext:
    """What a method may need to know of the run besides its own options."""

    cfg: PretrainConfig
    info: DataInfo
    grad_mode: str = "exact"  # the energy method's gradient (the others train as usual)
    input_scale: Any = None  # the energy method's fp16 dE/dx scale (precision.InputGradScale)


class Method(nn.Module):
    Options: ClassVar[type] = NoOptions
    uses_task: ClassVar[bool] = False  # whether --task (a corruption) applies
    uses_crop_scale: ClassVar[bool] = True  # False: its views crop as its paper does
    backbone: nn.Module

    @classmethod
    def build(cls, backbone: nn.Module, context: BuildContext, options: Any) -> Method:
        """The method around ``backbone``; ``options`` is an instance of ``cls.Options``."""
        return cls(backbone, **vars(options))

    @classmethod
    def transform(
        cls, info: DataInfo, img_size: int, crop_scale: tuple[float, float], options: Any
    ) -> Callable[[Any], list]:
        """The views of one image (``options``: the method's); by default one RandomResizedCrop and flip."""
        crop = pretrain_transform(info, img_size, crop_scale)
        return lambda image: [crop(image)]

    def forward(self, views: list[Tensor], generator: Generator = None) -> StepOutput:
        raise NotImplementedError

    def after_step(self, progress: float) -> None:
        """Updates after each optimizer step; none by default."""

    def checkpointed(self) -> nn.Module:
        """The module whose weights checkpoints hold (with ``backbone.`` keys for export)."""
        return self


def frozen_copy(module: nn.Module) -> nn.Module:
    """An EMA teacher's start: a copy of ``module`` that the optimizer never touches; only
    :func:`ema_update` moves it."""
    return copy.deepcopy(module).requires_grad_(False)


def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source, parameter by parameter (buffers,
    such as BatchNorm statistics, are the target's own, as MoCo v3 and DINO keep them)."""
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters(), strict=True):
            t.lerp_(s.detach(), 1.0 - momentum)


def cosine_schedule(start: float, end: float, progress: float) -> float:
    """From ``start`` at progress 0 to ``end`` at 1 along a half cosine (the momentum schedule
    of BYOL, DINO, MoCo v3 and I-JEPA)."""
    return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
