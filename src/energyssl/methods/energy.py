"""The energy method: a backbone plus a one-output head is an energy E(x); corrupted images are
restored by K gradient steps on the input, and the loss is each step's distance to the clean
image. Its settings are the top-level flags (--task, --steps, --grad-mode, --alpha-init, ...),
so it takes no --method-options."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..corruptions import Corruption
from ..energy import DEFAULT_ALPHA, EnergyModel
from ..objective import PretextObjective, objective_parts
from ..sorting import PatchSorting
from .base import BuildContext, Generator, Method, NoOptions, StepOutput


class EnergyMethod(PretextObjective, Method):
    """The pretext objective, trained through the method interface: one view, K steps."""

    uses_task = True

    def __init__(
        self, model: EnergyModel, corruption: Corruption | None, sorting: PatchSorting | None, sorting_share: float,
        steps: int, input_scale: Any = None,
    ) -> None:  # fmt: skip
        super().__init__(model, corruption, sorting, sorting_share)
        self.steps, self.input_scale = steps, input_scale

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    @classmethod
    def build(cls, backbone: nn.Module, context: BuildContext, options: NoOptions) -> EnergyMethod:
        cfg, info = context.cfg, context.info
        model = EnergyModel(
            backbone, alpha_init=cfg.alpha_init or DEFAULT_ALPHA, head_init_std=cfg.head_init_std,
            langevin_std=cfg.langevin_std, loss=cfg.loss, grad_mode=context.grad_mode,
        )  # fmt: skip
        parts = objective_parts(cfg.task, cfg.corruption, info.in_chans, info.mean, info.std)
        return cls(model, *parts, steps=cfg.steps, input_scale=context.input_scale)

    def forward(self, views: list[Tensor], generator: Generator = None) -> StepOutput:  # type: ignore[override]
        scale = 1.0 if self.input_scale is None else self.input_scale.scale
        out = PretextObjective.forward(self, views[0], generator, steps=self.steps, grad_scale=scale)
        logs = {f"loss_step{k + 1}": v for k, v in enumerate(out.step_losses)}
        return StepOutput(out.loss, logs if out.baseline is None else {**logs, "corrupted_loss": out.baseline})

    def checkpointed(self) -> nn.Module:
        return self.model
