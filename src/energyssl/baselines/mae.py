"""MAE (He et al. 2022): the encoder sees only the visible patches (random 75% masked), a light
decoder with mask tokens predicts the pixels, and the loss counts the masked patches."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..energy import Restoration
from .common import (
    LightDecoder,
    embed_patches,
    encode,
    gather,
    normalise_patches,
    patchify,
    random_split,
    require_vit,
)


class MAE(nn.Module):
    def __init__(
        self, backbone: nn.Module, mask_ratio: float = 0.75, decoder_dim: int = 128, decoder_depth: int = 2,
        norm_pix_loss: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.backbone = require_vit(backbone, "mae")
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        patch = self.backbone.patch_embed.patch_size[0]
        out = patch * patch * self.backbone.patch_embed.proj.in_channels
        self.decoder = LightDecoder(
            self.backbone.embed_dim, self.backbone.patch_embed.grid_size, out, decoder_dim, decoder_depth
        )

    def forward(
        self, images: Tensor, generator: torch.Generator | None = None, steps: int = 1, grad_scale: float = 1.0
    ) -> Restoration:
        vit = self.backbone
        tokens = embed_patches(vit, images)
        visible, masked = random_split(len(images), tokens.shape[1], self.mask_ratio, generator, images.device)
        prediction = self.decoder(encode(vit, gather(tokens, visible)), visible)
        target = patchify(images, vit.patch_embed.patch_size[0])
        if self.norm_pix_loss:
            target = normalise_patches(target)
        loss = ((gather(prediction, masked) - gather(target, masked)) ** 2).mean()
        return Restoration(loss, [loss], [])
