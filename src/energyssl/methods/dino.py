"""DINO (Caron et al. 2021): self-distillation without labels. A student sees 2 global and
several local crops; a teacher, the student's EMA (momentum 0.996 rising to 1 along a cosine),
sees the global ones. Both end in a projection head (3-layer MLP, L2-normalised bottleneck,
weight-normalised last layer over the prototypes); the student's softmax at temperature 0.1
matches the teacher's, centred (EMA of the teacher's batch means, 0.9) and sharpened at
temperature 0.04 (optionally warmed up from a lower one), over every (teacher, student) pair of
different crops.

Scaled to small models: the head is 2048 wide over 65536 prototypes for ViT-S and larger
(width >= 384), 512 wide over 4096 below. Local crops are half the image size (the paper's
96 px of 224 is 0.43; a half keeps whole patches on the presets: 14 px for 28, 112 for 224).
Left out: freezing the last layer during the first epoch and the weight-decay schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import DataInfo, byol_view
from ..errors import UserError
from ..schedules import cosine
from ..vit_tokens import pooled, require_vit
from .base import Check, Generator, Method, StepOutput, ema_update, frozen_copy, positive, shares, sizes


@dataclass
class DINOOptions:
    out_dim: int | None = None  # prototypes; default 65536 for width >= 384, else 4096
    hidden_dim: int | None = None  # default 2048 for width >= 384, else 512
    bottleneck_dim: int = 256
    local_crops: int = 8
    local_size: int | None = None  # default: half the image
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    teacher_temp_warmup: float = 0.0  # share of the run over which the teacher's temperature rises
    momentum: float = 0.996
    center_momentum: float = 0.9
    norm_last_layer: bool = True

    def checks(self) -> list[Check]:
        return [
            *positive(self, "student_temp", "teacher_temp", "warmup_teacher_temp"),
            *shares(self, "momentum", "center_momentum", "teacher_temp_warmup"),
            *sizes(self, "out_dim", "hidden_dim", "bottleneck_dim", "local_size"),
            (self.local_crops >= 0, f"local_crops must be >= 0, got {self.local_crops}"),
        ]  # fmt: skip


class DINOHead(nn.Module):
    """MLP (GELU) to an L2-normalised bottleneck, then a weight-normalised linear layer whose
    norms stay 1 with ``norm_last_layer`` (the paper's default, for stability)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, bottleneck: int, norm_last_layer: bool) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck)
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck))
        nn.init.trunc_normal_(self.prototypes, std=0.02)
        self.gain = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.prototypes, dim=1) * self.gain)


def dino_loss(student: list[Tensor], teacher: list[Tensor], center: Tensor, student_temp: float,
              teacher_temp: float) -> Tensor:  # fmt: skip
    """Mean over (teacher crop i, student crop j != i) of the cross-entropy between the
    teacher's centred, sharpened softmax and the student's softmax."""
    targets = [F.softmax((t - center) / teacher_temp, dim=-1) for t in teacher]
    logs = [F.log_softmax(s / student_temp, dim=-1) for s in student]
    pairs = [(-q * logs[j]).sum(-1).mean() for i, q in enumerate(targets) for j in range(len(logs)) if j != i]
    return torch.stack(pairs).mean()


class DINO(Method):
    Options = DINOOptions
    uses_crop_scale = False  # the paper's own crops

    def __init__(self, backbone: nn.Module, **options: Any) -> None:
        super().__init__()
        self.backbone = vit = require_vit(backbone, "dino")
        self.options = opts = DINOOptions(**options)
        local = opts.local_size or vit.patch_embed.img_size[0] // 2
        patch = vit.patch_embed.patch_size[0]
        if opts.local_crops and local % patch:
            raise UserError(f"dino: local crops of {local} px are not a multiple of the patch size {patch}")
        wide = vit.embed_dim >= 384
        hidden, out = opts.hidden_dim or (2048 if wide else 512), opts.out_dim or (65536 if wide else 4096)
        self.head = DINOHead(vit.embed_dim, out, hidden, opts.bottleneck_dim, opts.norm_last_layer)
        self.teacher_backbone = frozen_copy(vit)
        self.teacher_head = frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(1, out))
        self.register_buffer("progress", torch.zeros(()))  # for the temperature; saved, so resumes agree
        self.batch_center: Tensor | None = None

    @classmethod
    def transform(
        cls, info: DataInfo, img_size: int, crop_scale: tuple[float, float], options: DINOOptions
    ) -> Callable[[Any], list]:
        """Two global crops (40-100% of the image) and ``local_crops`` small ones (5-40%)."""
        local = options.local_size or img_size // 2
        first = byol_view(info, img_size, (0.4, 1.0), blur=1.0, solarize=0.0)
        second = byol_view(info, img_size, (0.4, 1.0), blur=0.1, solarize=0.2)
        small = byol_view(info, local, (0.05, 0.4), blur=0.5, solarize=0.0)
        return lambda image: [first(image), second(image), *(small(image) for _ in range(options.local_crops))]

    def teacher_temp(self) -> float:
        opts = self.options
        if opts.teacher_temp_warmup <= 0:
            return opts.teacher_temp
        share = min(1.0, float(self.progress) / opts.teacher_temp_warmup)
        return opts.warmup_teacher_temp + share * (opts.teacher_temp - opts.warmup_teacher_temp)

    def forward(self, views: list[Tensor], generator: Generator = None) -> StepOutput:
        globals_, locals_ = torch.cat(views[:2]), views[2:]
        with torch.no_grad():
            teacher = self.teacher_head(pooled(self.teacher_backbone, globals_))
        student = self.head(pooled(self.backbone, globals_)).chunk(2)
        if locals_:
            student += self.head(pooled(self.backbone, torch.cat(locals_))).chunk(len(locals_))
        loss = dino_loss(list(student), list(teacher.chunk(2)), self.center, self.options.student_temp,
                         self.teacher_temp())  # fmt: skip
        self.batch_center = teacher.mean(0, keepdim=True)
        return StepOutput(loss, {"teacher_temp": torch.tensor(self.teacher_temp())})

    def after_step(self, progress: float) -> dict[str, float]:
        """The teacher follows the student; the centre follows the teacher's outputs (averaged
        over processes)."""
        momentum = cosine(self.options.momentum, 1.0, progress)
        ema_update(self.teacher_backbone, self.backbone, momentum)
        ema_update(self.teacher_head, self.head, momentum)
        if self.batch_center is not None:
            batch = self.batch_center
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(batch)
                batch = batch / dist.get_world_size()
            m = self.options.center_momentum
            self.center.mul_(m).add_(batch, alpha=1 - m)
            self.batch_center = None
        self.progress.fill_(progress)
        return {"momentum": momentum}
