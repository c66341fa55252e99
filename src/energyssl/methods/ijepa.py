"""I-JEPA (Assran et al. 2023): predict the representations of image blocks from a context
block, in representation space. The context encoder (the backbone) sees the patches of one
large block (85-100% of the image) minus 4 target blocks (15-20% each, aspect 0.75-1.5); a
narrow predictor, given the context tokens and mask tokens at a target's positions, predicts
the target encoder's layer-normalised output there. The target encoder is the backbone's EMA
(momentum 0.996 rising to 1 along a cosine) and sees the whole image. Loss: squared distance,
averaged over target blocks and tokens.

As the reference code: block sizes are drawn once per batch, positions per image; context and
target index lists are trimmed to the batch's shortest so they stack; one crop (30-100%), no
flip or colour augmentation. Scaled: the predictor is half the encoder's width and depth
(ViT-H's is 384 wide and 12 deep)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torchvision import transforms

from ..data import DataInfo
from ..schedules import cosine
from ..vit_tokens import encode, patch_tokens, require_vit
from .base import Check, Generator, Method, StepOutput, ema_update, frozen_copy, shares, sizes
from .masked_image import gather, host_generator


@dataclass
class IJEPAOptions:
    target_blocks: int = 4
    target_scale: list = field(default_factory=lambda: [0.15, 0.2])
    target_aspect: list = field(default_factory=lambda: [0.75, 1.5])
    context_scale: list = field(default_factory=lambda: [0.85, 1.0])
    min_context: int = 2  # patches the context keeps at least
    predictor_dim: int | None = None  # default: half the encoder's width
    predictor_depth: int | None = None  # default: half the encoder's depth
    momentum: float = 0.996

    def checks(self) -> list[Check]:
        def interval(name: str, high: float | None = 1.0) -> Check:
            value = getattr(self, name)
            ok = len(value) == 2 and 0 < value[0] <= value[1] and (high is None or value[1] <= high)
            return ok, f"{name} must be two numbers 0 < lo <= hi{'' if high is None else ' <= 1'}, got {value}"

        return [
            interval("target_scale"), interval("context_scale"), interval("target_aspect", None),
            *sizes(self, "target_blocks", "min_context", "predictor_dim", "predictor_depth"), *shares(self, "momentum"),
        ]  # fmt: skip


def block_size(grid: tuple[int, int], scale: float, aspect: float) -> tuple[int, int]:
    """(h, w) of a block covering ``scale`` of the grid with h / w = ``aspect``, within the grid."""
    area = scale * grid[0] * grid[1]
    h = min(grid[0], max(1, round(math.sqrt(area * aspect))))
    w = min(grid[1], max(1, round(math.sqrt(area / aspect))))
    return h, w


def place(grid: tuple[int, int], size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """A boolean (rows, cols) mask of one block of ``size`` at a random position."""
    top = int(torch.randint(grid[0] - size[0] + 1, (1,), generator=generator))
    left = int(torch.randint(grid[1] - size[1] + 1, (1,), generator=generator))
    mask = torch.zeros(grid, dtype=torch.bool)
    mask[top : top + size[0], left : left + size[1]] = True
    return mask


def multiblock_masks(batch: int, grid: tuple[int, int], opts: IJEPAOptions, generator: torch.Generator
                     ) -> tuple[Tensor, list[Tensor]]:  # fmt: skip
    """(context ids (B, Nc), target ids per block [(B, Nt)]): sizes drawn once for the batch,
    positions per image; the context avoids every target; lists trimmed to the shortest."""

    def uniform(bounds: list) -> float:
        return bounds[0] + float(torch.rand((), generator=generator)) * (bounds[1] - bounds[0])

    target_size = block_size(grid, uniform(opts.target_scale), uniform(opts.target_aspect))
    context_size = block_size(grid, uniform(opts.context_scale), 1.0)
    contexts, targets = [], []
    for _ in range(batch):
        blocks = [place(grid, target_size, generator) for _ in range(opts.target_blocks)]
        context = place(grid, context_size, generator) & ~torch.stack(blocks).any(0)
        if int(context.sum()) < opts.min_context:  # too little left: keep the context block whole
            context = place(grid, context_size, generator)
        contexts.append(context.flatten().nonzero().squeeze(1))
        targets.append([b.flatten().nonzero().squeeze(1) for b in blocks])
    shortest = min(len(c) for c in contexts)
    context_ids = torch.stack([c[torch.randperm(len(c), generator=generator)[:shortest].sort().values]
                               for c in contexts])  # fmt: skip
    target_ids = [torch.stack([t[m] for t in targets]) for m in range(opts.target_blocks)]
    return context_ids, target_ids


class Predictor(nn.Module):
    """Context tokens and mask tokens at the target positions (fixed sin-cos) through a narrow
    transformer; the targets' outputs, back to the encoder's width."""

    def __init__(self, dim: int, grid: tuple[int, int], width: int, depth: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.register_buffer("positions", build_sincos2d_pos_embed(list(grid), dim=width).unsqueeze(0), False)
        self.blocks = nn.Sequential(*[Block(width, heads, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)

    def forward(self, context: Tensor, context_ids: Tensor, target_ids: Tensor) -> Tensor:
        positions = self.positions.expand(len(context), -1, -1)
        x = self.embed(context) + gather(positions, context_ids)
        queries = self.mask_token.to(x.dtype) + gather(positions, target_ids)
        x = self.norm(self.blocks(torch.cat([x, queries], dim=1)))
        return self.out(x[:, -target_ids.shape[1] :])


class IJEPA(Method):
    Options = IJEPAOptions
    uses_crop_scale = False  # the paper's own crops

    def __init__(self, backbone: nn.Module, **options: Any) -> None:
        super().__init__()
        self.backbone = vit = require_vit(backbone, "ijepa")
        self.options = opts = IJEPAOptions(**options)
        width = opts.predictor_dim or max(32, vit.embed_dim // 2)
        depth = opts.predictor_depth or max(1, len(vit.blocks) // 2)
        heads = max(1, width // 64) if width % 64 == 0 else vit.blocks[0].attn.num_heads
        heads = heads if width % heads == 0 else 1
        self.grid = tuple(vit.patch_embed.grid_size)
        self.predictor = Predictor(vit.embed_dim, self.grid, width, depth, heads)
        self.target_encoder = frozen_copy(vit)

    @classmethod
    def transform(
        cls, info: DataInfo, img_size: int, crop_scale: tuple[float, float], options: IJEPAOptions
    ) -> Callable[[Any], list]:
        """One crop of 30-100% of the image, nothing else (the reference recipe)."""
        crop = transforms.Compose([
            transforms.RandomResizedCrop(img_size, (0.3, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(info.mean, info.std),
        ])  # fmt: skip
        return lambda image: [crop(image)]

    def forward(self, views: list[Tensor], generator: Generator = None) -> StepOutput:
        images, vit = views[0], self.backbone
        context_ids, target_ids = multiblock_masks(
            len(images), self.grid, self.options, host_generator(generator, images.device)
        )
        context_ids = context_ids.to(images.device)
        prefix = vit.num_prefix_tokens
        with torch.no_grad():
            teacher = self.target_encoder
            targets = encode(teacher, patch_tokens(teacher, images))[:, prefix:]
            targets = F.layer_norm(targets, targets.shape[-1:])
        context = encode(vit, gather(patch_tokens(vit, images), context_ids))[:, prefix:]
        losses = []
        for ids in target_ids:
            ids = ids.to(images.device)
            losses.append(F.mse_loss(self.predictor(context, context_ids, ids), gather(targets, ids)))
        return StepOutput(torch.stack(losses).mean(), {"context_tokens": torch.tensor(float(context_ids.shape[1]))})

    def after_step(self, progress: float) -> dict[str, float]:
        """The target encoder follows the context encoder."""
        momentum = cosine(self.options.momentum, 1.0, progress)
        ema_update(self.target_encoder, self.backbone, momentum)
        return {"momentum": momentum}
