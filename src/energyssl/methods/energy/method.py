"""The energy method through the method interface: one view, a pretext task, K gradient steps
on the input, the loss at every step. Its settings are its options; each is also a ``pretrain``
flag and config key (``--task``, ``--steps``, ``--grad-mode``, ...)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...config import option
from ...errors import UserError
from ..base import BuildContext, Check, Generator, Method, PrecisionChoice, Results, StepOutput
from .figures import save_restoration_grid
from .model import DEFAULT_ALPHA, GRAD_MODES, EnergyModel, non_smooth_layers
from .precision import InputGradScale, choose_precision
from .tasks import PretextTask, build_task, check_task_parameters, corruption_option, task_option

LOSSES = ("mse", "smooth_l1")
GRAD_MODE_CHOICES = ("auto", *GRAD_MODES)
GRID_IMAGES = 4  # held-out images per task in the restoration figures


@dataclass
class EnergyOptions:
    task: str = task_option()
    corruption: dict = corruption_option()
    steps: int = option(
        2,
        "restoration steps K (2, as the paper's: ahead of K=1 on validation at equal FLOPs, benchmarks/RESULTS.md)",
        flag=True,
    )
    grad_mode: str = option(
        "auto",
        "parameter gradient of the energy objective: exact (double backward), fast (finite difference of two "
        "backward passes; float32, smooth backbones such as ViTs and ConvNeXts), or auto (fast float32 on CPUs, "
        "exact bf16 on GPUs, exact for kinked backbones; printed at start with the reason)",
        flag=True,
    )
    alpha_init: float | None = option(
        None,
        "initial step size alpha (learned, kept positive); default: set on the first batch so that the first "
        "step covers half the corruption (dE/dx shrinks as images grow)",
        flag=True,
    )
    head_init_std: float = option(
        10.0, "energy head init: std * 1/sqrt(features); larger starts with a usable dE/dx", True
    )
    langevin_std: float = option(
        0.0, "std of Gaussian noise added at each restoration step (Langevin style)", flag=True
    )
    loss: str = option("mse", "restoration loss: mse or smooth_l1", flag=True)
    vis_every: int = option(
        1, "save a restoration grid every N epochs in restorations/ (0: only at the end)", flag=True
    )

    def checks(self) -> list[Check]:
        check_task_parameters(self.task, self.corruption)
        return [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.loss in LOSSES, f"loss must be one of {LOSSES}, got '{self.loss}'"),
            (self.grad_mode in GRAD_MODE_CHOICES, f"grad_mode is one of {GRAD_MODE_CHOICES}, not {self.grad_mode}"),
            (self.alpha_init is None or self.alpha_init > 0, f"alpha_init must be > 0, got {self.alpha_init}"),
            (self.head_init_std > 0, f"head_init_std must be > 0, got {self.head_init_std}"),
            (self.langevin_std >= 0, f"langevin_std must be >= 0, got {self.langevin_std}"),
            (self.vis_every >= 0, f"vis_every must be >= 0, got {self.vis_every}"),
        ]


class EnergyMethod(Method):
    """E(x) = head(backbone(x)); corrupted inputs restored by K steps x <- x - alpha dE/dx."""

    Options = EnergyOptions
    shown = ("alpha",)
    resume_keys = ("task", "steps")
    resume_safe = ("grad_mode", "vis_every")  # the same gradient either way (to float rounding); figures

    def __init__(self, model: EnergyModel, task: PretextTask, options: EnergyOptions, model_name: str = "") -> None:
        super().__init__()
        self.model, self.task, self.options, self.model_name = model, task, options, model_name
        self.input_scale: InputGradScale | None = None  # fp16 only (see .precision)

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    @classmethod
    def build(cls, backbone: nn.Module, context: BuildContext, options: EnergyOptions) -> EnergyMethod:
        info = context.info
        model = EnergyModel(
            backbone, alpha_init=options.alpha_init or DEFAULT_ALPHA, head_init_std=options.head_init_std,
            langevin_std=options.langevin_std, loss=options.loss,
            grad_mode="exact" if options.grad_mode == "auto" else options.grad_mode,  # until configure_precision
        )  # fmt: skip
        task = build_task(options.task, options.corruption, backbone, info.in_chans, info.mean, info.std)
        return cls(model, task, options, context.cfg.model)

    @classmethod
    def around(
        cls, model: EnergyModel, task: str = "grid_mask", corruption: dict | None = None, steps: int = 2,
        in_chans: int = 1, mean=(0.5,), std=(0.5,),
    ) -> EnergyMethod:  # fmt: skip
        """The method around an existing energy model, outside a run (tests, benchmarks)."""
        options = EnergyOptions(task=task, corruption=corruption or {}, steps=steps, grad_mode=model.grad_mode)
        return cls(model, build_task(task, options.corruption, model.backbone, in_chans, mean, std), options)

    def forward(self, views: list[Tensor], generator: Generator = None) -> StepOutput:
        scale = 1.0 if self.input_scale is None else self.input_scale.scale
        out = self.task(self.model, views[0], generator, self.options.steps, scale)
        logs: dict[str, Tensor | float] = {f"loss_step{k + 1}": v for k, v in enumerate(out.step_losses)}
        return StepOutput(out.loss, logs if out.baseline is None else {**logs, "corrupted_loss": out.baseline})

    def after_step(self, progress: float) -> dict[str, Tensor | float]:
        logs: dict[str, Tensor | float] = {"alpha": self.model.alpha.detach()}
        return logs if self.input_scale is None else {**logs, "input_grad_scale": self.input_scale.scale}

    def checkpointed(self) -> nn.Module:
        return self.model

    def set_grad_checkpointing(self, model_name: str) -> str:
        """Exact mode keeps K restoration steps' graphs for the double backward: each step's is
        recomputed in the backward instead (:meth:`EnergyModel.restore`). Fast mode keeps one
        ordinary graph at a time; there the backbone's blocks are checkpointed, timm's way."""
        if self.model.grad_mode == "exact":
            self.model.checkpoint_steps = True
            return "gradient checkpointing: each restoration step's graph is recomputed in the backward pass"
        return super().set_grad_checkpointing(model_name)

    def compile_step(self, backend: str, announce: bool) -> None:
        """The exact gradient's restoration compiled whole: dE/dx by ``torch.func`` so that the
        double backward is the compiled graph's backward (:meth:`EnergyModel.energy_grad`)."""
        if self.model.grad_mode == "exact":
            if self.model.checkpoint_steps:
                raise UserError(
                    "--compile and --grad-checkpointing do not combine in exact mode: checkpointing needs "
                    "autograd's saved-tensor hooks, which torch.func (the compiled input gradient) lacks"
                )
            self.model.functional = True
        super().compile_step(backend, announce)

    def configure_precision(self, amp: str, device: torch.device, saved: dict[str, str]) -> PrecisionChoice:
        """The gradient mode and dtype (:func:`.precision.choose_precision`); a resumed run keeps
        the mode it chose, so that ``auto`` resolving otherwise here cannot change the optimizer."""
        asked = self.options.grad_mode
        resumed = asked == "auto" and "grad_mode" in saved
        grad_mode = saved["grad_mode"] if resumed else asked
        kinked = non_smooth_layers(self.backbone)
        if grad_mode == "fast" and kinked:
            raise UserError(
                f"grad_mode fast needs a smooth backbone; {self.model_name} has {', '.join(kinked)} "
                "(use --grad-mode exact)"
            )
        if grad_mode == "fast" and amp not in ("auto", "none"):
            raise UserError("grad_mode fast needs float32: use --amp none")
        mode, dtype, why = choose_precision(grad_mode, amp, kinked, device)
        self.model.grad_mode = mode
        self.input_scale = InputGradScale() if dtype == torch.float16 else None
        return PrecisionChoice(dtype, f"{mode} gradient", "as the resumed run chose" if resumed else why)

    def prepare(self, example: list[Tensor]) -> list[str]:
        """BatchNorm statistics from a clean batch, and alpha sized to this data's corruptions
        (see :meth:`EnergyModel.calibrate_alpha`; sorting alone keeps its alpha)."""
        images = example[0]
        self.model.prime_batchnorm(images)
        if self.options.alpha_init is not None:
            return []
        corruption = self.task.corruption
        alpha = self.model.alpha.item()
        if corruption is not None:
            alpha = self.model.calibrate_alpha(corruption(images, torch.Generator().manual_seed(0)), images)
        return [f"alpha starts at {alpha:.3g}: the first step covers half the corruption of a batch"]

    def skip_step(self, finite: bool) -> bool:
        """Under fp16, an overflow of dE/dx halves its scale and skips the step."""
        if self.input_scale is None:
            return False
        self.input_scale.update(finite)
        return not finite and not self.input_scale.exhausted

    def training_state(self) -> dict[str, Any]:
        return {"input_scale": self.input_scale.state_dict() if self.input_scale is not None else {}}

    def load_training_state(self, state: dict[str, Any]) -> None:
        if self.input_scale is not None and state.get("input_scale"):
            self.input_scale.load_state_dict(state["input_scale"])

    def metadata(self) -> dict[str, str]:
        opts = self.options
        return {"task": opts.task, "steps": str(opts.steps), "grad_mode": self.model.grad_mode,
                "corruption": json.dumps(opts.corruption)}  # fmt: skip

    def nonfinite_causes(self) -> list[str]:
        causes = ["fp16 overflows at every loss scale (use --amp bf16 or none)"] if self.input_scale else []
        return causes + [
            f"the input gradient dE/dx exploded (alpha is {self.model.alpha.item():.3g}; lower --head-init-std or "
            "--alpha-init, or set --clip-grad)"
        ]

    def end_of_epoch(self, epoch: int, results: Results) -> None:
        every = self.options.vis_every
        if every > 0 and epoch % every == 0:
            self.save_grid(results, f"epoch-{epoch:03d}")

    def report(self, results: Results) -> None:
        """Restoration error (pixel tasks) and sorting accuracy on held-out images, printed and
        saved as ``restoration.json``; then the final restoration figure."""
        images, steps = results.held_out(), self.options.steps
        report = self.task.report(self.model, images, steps, results.seed)
        (results.out / "restoration.json").write_text(json.dumps({"images": len(images), "tasks": report}, indent=2))
        print(f"on {len(images)} held-out images, corrupted -> restored after K={steps} steps:")
        for task, row in report.items():
            if "sorted_accuracy" in row:
                print(f"  {task:<18} accuracy {row['shuffled_accuracy']:.3f} -> {row['sorted_accuracy']:.3f}")
            else:
                print(f"  {task:<18} MSE {row['corrupted_mse']:.4f} -> {row['restored_mse']:.4f}")
        self.save_grid(results, "final")

    def save_grid(self, results: Results, name: str) -> None:
        """Corrupted / each step / original for the first held-out images, one block per pixel task."""
        blocks = self.task.blocks(self.model, results.held_out()[:GRID_IMAGES], self.options.steps, results.seed)
        if blocks:
            path = results.out / "restorations" / f"{name}.png"
            save_restoration_grid(path, blocks, results.info.mean, results.info.std, title=name)
