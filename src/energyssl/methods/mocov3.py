"""MoCo v3 (Chen, Xie and He 2021): two augmented views; a base encoder (backbone, projector,
predictor) predicts the momentum encoder's projection of the other view, with InfoNCE over the
batch (the keys of every process under DDP) at temperature 0.2, scaled by 2 x temperature.
The momentum rises from 0.99 to 1 along a cosine. As the paper's ViT recipe: fixed 2-D sin-cos
positions and, optionally (on by default), a frozen random patch projection for stability.

Scaled to small models: the MLPs are 4096 wide for a 768-wide ViT-B, here 16/3 of the width
(a multiple of 64); the output is 256 as in the paper. Augmentation: the paper's asymmetric
pair (blur always on view 1, solarize sometimes on view 2), colour jitter reduced to
brightness and contrast for one-channel images."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import DataInfo, byol_view
from ..schedules import cosine
from ..vit_tokens import install_sincos_positions, pooled, require_vit
from .base import Check, Generator, Method, StepOutput, ema_update, frozen_copy, positive, shares, sizes


@dataclass
class MoCoV3Options:
    temperature: float = 0.2
    momentum: float = 0.99  # at the start; it rises to 1 along a cosine
    mlp_dim: int | None = None  # default: 4096 x width / 768, a multiple of 64
    out_dim: int = 256
    frozen_patch_projection: bool = True
    sincos_positions: bool = True

    def checks(self) -> list[Check]:
        return [*positive(self, "temperature"), *shares(self, "momentum"), *sizes(self, "mlp_dim", "out_dim")]


def mlp(layers: int, in_dim: int, hidden: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """Linear-BN-ReLU blocks and a last linear layer, optionally followed by BN without affine."""
    modules: list[nn.Module] = []
    for i in range(layers):
        last = i == layers - 1
        modules.append(nn.Linear(in_dim if i == 0 else hidden, out_dim if last else hidden, bias=False))
        if not last:
            modules += [nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        elif last_bn:
            modules.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*modules)


def contrastive_loss(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """InfoNCE of queries ``q`` against keys ``k`` (normalised; the positive of query i is
    key i of this process), times 2 x temperature as the paper. Under DDP every process's keys
    are negatives."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    offset = 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [torch.empty_like(k) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, k.contiguous())
        k, offset = torch.cat(gathered), len(q) * dist.get_rank()
    logits = q @ k.T / temperature
    labels = torch.arange(len(q), device=q.device) + offset
    return F.cross_entropy(logits, labels) * 2 * temperature


class MoCoV3(Method):
    Options = MoCoV3Options
    uses_crop_scale = False  # the paper's own crops

    def __init__(
        self, backbone: nn.Module, temperature: float = 0.2, momentum: float = 0.99, mlp_dim: int | None = None,
        out_dim: int = 256, frozen_patch_projection: bool = True, sincos_positions: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.backbone = vit = require_vit(backbone, "mocov3")
        if sincos_positions:
            install_sincos_positions(vit)
        if frozen_patch_projection:
            vit.patch_embed.requires_grad_(False)
        self.temperature, self.start_momentum = temperature, momentum
        hidden = mlp_dim or max(64, 64 * round(4096 * vit.embed_dim / 768 / 64))
        self.projector = mlp(3, vit.embed_dim, hidden, out_dim, last_bn=True)
        self.predictor = mlp(2, out_dim, hidden, out_dim, last_bn=False)
        self.momentum_backbone = frozen_copy(vit)
        self.momentum_projector = frozen_copy(self.projector)

    @classmethod
    def transform(
        cls, info: DataInfo, img_size: int, crop_scale: tuple[float, float], options: MoCoV3Options
    ) -> Callable[[Any], list]:
        """Two views: crops of 8-100% of the image, flip, jitter, grey, then blur and solarize
        applied asymmetrically (crop_scale's lower end is the paper's 0.08, not --crop-scale)."""

        first = byol_view(info, img_size, (0.08, 1.0), blur=1.0, solarize=0.0)
        second = byol_view(info, img_size, (0.08, 1.0), blur=0.1, solarize=0.2)
        return lambda image: [first(image), second(image)]

    def _query(self, images: Tensor) -> Tensor:
        return self.predictor(self.projector(pooled(self.backbone, images)))

    @torch.no_grad()
    def _key(self, images: Tensor) -> Tensor:
        return self.momentum_projector(pooled(self.momentum_backbone, images))

    def forward(self, views: list[Tensor], generator: Generator = None) -> StepOutput:
        first, second = views
        q1, q2 = self._query(first), self._query(second)
        k1, k2 = self._key(first), self._key(second)
        loss = contrastive_loss(q1, k2, self.temperature) + contrastive_loss(q2, k1, self.temperature)
        return StepOutput(loss)

    def after_step(self, progress: float) -> dict[str, float]:
        """The momentum encoder follows the base encoder, with a momentum rising to 1 (a
        function of progress alone, so a resumed run follows the same schedule)."""
        momentum = cosine(self.start_momentum, 1.0, progress)
        ema_update(self.momentum_backbone, self.backbone, momentum)
        ema_update(self.momentum_projector, self.projector, momentum)
        return {"momentum": momentum}
