"""The one interface every pretraining method implements, and what the harness gives it.

A method is an ``nn.Module`` with:

* ``backbone``: the timm model that is exported and fine-tuned; everything else (decoder,
  projector, teacher, energy head) is the method's own and is dropped on export;
* ``Options``: a dataclass of its ``--method-options`` (fields marked with
  :func:`~energyssl.config.option` ``flag=True`` are also ``pretrain`` flags and config keys),
  validated before anything is built;
* ``transform(...)``: the views of an image it trains on (one crop unless it says otherwise);
* ``forward(views, generator) -> StepOutput``: the loss of a batch and what to log;
* ``after_step(progress)``: per-step updates outside the optimizer (an EMA teacher, momentum
  and temperature schedules), with ``progress`` the run's clock in [0, 1], the one the
  learning rate follows; it returns the scheduled values to log.

and, for a method that needs more of the run, hooks that do nothing by default: its numeric
precision (:meth:`Method.configure_precision`), a start on a first batch (:meth:`Method.prepare`),
whether a non-finite loss skips the step (:meth:`Method.skip_step`), what checkpoints record of
it, and its report and figures (:meth:`Method.end_of_epoch`, :meth:`Method.report`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..compiling import compile_forward
from ..config import PretrainConfig
from ..data import DataInfo, pretrain_transform
from ..errors import UserError
from ..models import enable_grad_checkpointing
from ..precision import amp_dtype_for
from ..rng import Generator

__all__ = [
    "BuildContext", "Check", "Generator", "Method", "NoOptions", "PrecisionChoice", "Results", "StepOutput",
    "ema_update", "freeze_parameters", "freeze_unreached_parameters", "frozen_copy", "positive", "shares", "sizes",
]  # fmt: skip


@dataclass
class StepOutput:
    loss: Tensor
    logs: dict[str, Tensor | float] = field(default_factory=dict)  # scalars for metrics.jsonl (averaged over processes)


@dataclass
class NoOptions:
    pass


@dataclass
class BuildContext:
    """What a method may need to know of the run besides its own options."""

    cfg: PretrainConfig
    info: DataInfo


@dataclass
class PrecisionChoice:
    """How a method trains numerically: the autocast dtype (None: float32), a note on the
    method's own numeric mode (printed at start), why, and what checkpoints keep of the choice
    so that a resumed run makes the same one."""

    dtype: torch.dtype | None
    mode: str = ""
    why: str = ""
    saved: dict[str, str] = field(default_factory=dict)


@dataclass
class Results:
    """Where a method's end-of-run report and figures go: the run folder, the data's
    description, held-out images (loaded on first use) and the run's seed."""

    out: Path
    info: DataInfo
    held_out: Callable[[], Tensor]
    seed: int


class Method(nn.Module):
    Options: ClassVar[type] = NoOptions
    uses_crop_scale: ClassVar[bool] = True  # False: its views crop as its paper does
    shown: ClassVar[tuple[str, ...]] = ()  # keys of its logs shown in the progress bar
    resume_keys: ClassVar[tuple[str, ...]] = ()  # keys of metadata() a resumed run must agree on
    resume_safe: ClassVar[tuple[str, ...]] = ()  # options a resumed run may change (numerics, figures)
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

    def after_step(self, progress: float) -> dict[str, Tensor | float]:
        """Updates after each optimizer step; returns the scheduled values to log (none by default)."""
        return {}

    def checkpointed(self) -> nn.Module:
        """The module whose weights checkpoints hold (with ``backbone.`` keys for export)."""
        return self

    def set_grad_checkpointing(self, model_name: str) -> str:
        """``--grad-checkpointing``: recompute activations in the backward pass instead of keeping
        them (by default the backbone's blocks, timm's way); returns what it does, to print."""
        enable_grad_checkpointing(self.backbone, model_name)
        return "gradient checkpointing: the backbone's blocks are recomputed in the backward pass"

    def compile_step(self, backend: str, announce: bool) -> None:
        """``--compile``: the forward compiled (AOT autograd derives its backward)."""
        compile_forward(self, backend, announce)

    def configure_precision(self, amp: str, device: torch.device, saved: dict[str, str]) -> PrecisionChoice:
        """The autocast dtype of ``--amp`` on ``device``; ``saved`` is what a resumed run's
        checkpoint recorded of its choice ({} for a new run)."""
        return PrecisionChoice(amp_dtype_for(amp, device))

    def prepare(self, example: list[Tensor]) -> list[str]:
        """A new run's start on the views of a few images, before DDP copies rank 0's weights;
        returns lines to print."""
        return []

    def skip_step(self, finite: bool) -> bool:
        """Told whether the batch's loss is finite on every process: True skips the step instead
        of stopping the run (a loss scale of the method's own backed off)."""
        return False

    def training_state(self) -> dict[str, Any]:
        """What a checkpoint's training state holds of the method beyond its weights."""
        return {}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`training_state` from a checkpoint's training state."""

    def metadata(self) -> dict[str, str]:
        """What checkpoints record of the method's settings (strings), for later tools and resumes."""
        return {}

    def nonfinite_causes(self) -> list[str]:
        """What of the method can make the loss NaN or infinite, each with its fix."""
        return []

    def end_of_epoch(self, epoch: int, results: Results) -> None:
        """After each epoch, on the main process (figures along the way)."""

    def report(self, results: Results) -> None:
        """After the last step, on the main process: the method's own report and figures."""


Check = tuple[bool, str]  # (in range, the message when not): what an Options' ``checks()`` returns


def sizes(options: Any, *names: str) -> list[Check]:
    """Options that are unset (the method's default) or at least 1."""
    values = {name: getattr(options, name) for name in names}
    return [(v is None or v >= 1, f"{name} must be >= 1, got {v}") for name, v in values.items()]


def shares(options: Any, *names: str) -> list[Check]:
    """Options in [0, 1] (momenta, shares of a run)."""
    values = {name: getattr(options, name) for name in names}
    return [(0 <= v <= 1, f"{name} must be in [0, 1], got {v}") for name, v in values.items()]


def positive(options: Any, *names: str) -> list[Check]:
    """Options above 0 (temperatures)."""
    values = {name: getattr(options, name) for name in names}
    return [(v > 0, f"{name} must be > 0, got {v}") for name, v in values.items()]


def frozen_copy(module: nn.Module) -> nn.Module:
    """An EMA teacher's start: a copy of ``module`` that the optimizer never touches; only
    :func:`ema_update` moves it."""
    return copy.deepcopy(module).requires_grad_(False)


def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * source, parameter by parameter (buffers,
    such as BatchNorm statistics, are the target's own, as MoCo v3 and DINO keep them). timm's
    ModelEmaV3 averages buffers too, which would change those methods' teachers."""
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters(), strict=True):
            t.lerp_(s.detach(), 1.0 - momentum)


def freeze_unreached_parameters(method: nn.Module, example: list[Tensor]) -> list[str]:
    """Stop training the parameters one backward pass of the method does not reach (e.g. a
    final norm's bias, which shifts an energy by a constant so dE/dx ignores it): they could
    never learn, and DDP rejects parameters without a gradient. Returns their names."""
    method.zero_grad(set_to_none=True)
    method(example, torch.Generator().manual_seed(0)).loss.backward()
    dead = [name for name, p in method.named_parameters() if p.requires_grad and p.grad is None]
    method.zero_grad(set_to_none=True)
    return freeze_parameters(method, dead)


def freeze_parameters(method: nn.Module, names: list[str]) -> list[str]:
    """Stop training the parameters ``names`` (a resumed run freezes what the run froze)."""
    params = dict(method.named_parameters())
    unknown = [name for name in names if name not in params]
    if unknown:
        raise UserError(f"the checkpoint froze parameters this model does not have: {', '.join(unknown)}")
    for name in names:
        params[name].requires_grad_(False)
    return names
