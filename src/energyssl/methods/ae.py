"""The paper's "AE + task" baselines: an MAE-style encoder sees the whole corrupted image and a
light decoder reconstructs the clean pixels. For sorting, the encoder has no position
embedding (kept at zero, as the paper's baseline, so fine-tuning starts from zeros) and the
decoder classifies each patch's position, with the same regularisers as energy sorting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..vit_tokens import encode, patch_tokens, require_vit
from .base import BuildContext, Check, Generator, Method, StepOutput, sizes
from .energy.corruptions import build_corruption
from .energy.sorting import PatchSorting, edge_masked_patch_tokens
from .energy.tasks import check_task_parameters, corruption_option, task_option
from .masked_image import LightDecoder, gather, patchify


@dataclass
class AEOptions:
    task: str = task_option()  # the energy method's pretext tasks
    corruption: dict = corruption_option()
    decoder_dim: int = 128
    decoder_depth: int = 2

    def checks(self) -> list[Check]:
        check_task_parameters(self.task, self.corruption)
        return sizes(self, "decoder_dim", "decoder_depth")


class AutoencoderTask(Method):
    Options = AEOptions
    resume_keys = ("task",)

    @classmethod
    def build(cls, backbone: nn.Module, context: BuildContext, options: AEOptions) -> AutoencoderTask:
        info = context.info
        return cls(backbone, params=options.corruption, in_chans=info.in_chans, mean=info.mean, std=info.std,
                   **{k: v for k, v in vars(options).items() if k != "corruption"})  # fmt: skip

    def __init__(
        self, backbone: nn.Module, task: str, params: dict[str, Any], in_chans: int, mean, std,
        decoder_dim: int = 128, decoder_depth: int = 2,
    ) -> None:  # fmt: skip
        super().__init__()
        self.backbone = vit = require_vit(backbone, "ae")
        self.sorting: PatchSorting | None = None
        grid, patch = vit.patch_embed.grid_size, vit.patch_embed.patch_size[0]
        if task == "sorting":
            self.sorting = PatchSorting(**params.get("sorting", {}))
            self.sorting.edge_choices(patch)  # refuse a kernel it would zero, up front
            with torch.no_grad():
                vit.pos_embed.zero_()
            vit.pos_embed.requires_grad_(False)
            out = grid[0] * grid[1]  # one class per position
        else:
            self.corruption = build_corruption(task, params, in_chans=in_chans, mean=mean, std=std)
            out = patch * patch * in_chans
        self.decoder = LightDecoder(
            vit.embed_dim, grid, out, decoder_dim, decoder_depth, positions=self.sorting is None
        )
        self.task = task

    def metadata(self) -> dict[str, str]:
        return {"task": self.task}

    def forward(self, views: list[Tensor], generator: Generator = None) -> StepOutput:
        images, vit = views[0], self.backbone
        if self.sorting is None:
            corrupted = self.corruption(images, generator)
            prediction = self.decoder(encode(vit, patch_tokens(vit, corrupted)))
            target = patchify(images, vit.patch_embed.patch_size[0])
            loss = F.mse_loss(prediction, target)
            corrupted_loss = F.mse_loss(patchify(corrupted, vit.patch_embed.patch_size[0]), target).detach()
            return StepOutput(loss, {"corrupted_loss": corrupted_loss})
        return self._sorting(images, generator)

    def _sorting(self, images: Tensor, generator: Generator) -> StepOutput:
        vit, sorting = self.backbone, self.sorting
        assert sorting is not None
        patch = vit.patch_embed.patch_size[0]
        edge = sorting.edge_widths(len(images), patch, generator, images.device) if self.training else None
        tokens = edge_masked_patch_tokens(vit, images, edge)
        n = tokens.shape[1]
        positions = torch.arange(n, device=images.device).expand(len(images), -1)
        kept = sorting.kept_tokens(len(images), n, generator, images.device) if self.training else None
        if kept is not None:
            tokens, positions = gather(tokens, kept), positions.gather(1, kept)
        logits = self.decoder(encode(vit, tokens))
        loss = F.cross_entropy(logits.flatten(0, 1), positions.flatten())
        return StepOutput(loss)
