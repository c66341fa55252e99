"""MAE (He et al. 2022): the encoder sees only the visible patches (random 75% masked), a light
decoder with mask tokens predicts the pixels, and the loss counts the masked patches.

As the paper: fixed 2-D sin-cos positions in the encoder, Xavier initialisation, normalised
pixel targets, and a decoder sized as ViT-B's (512 wide, 8 deep, 32-dim heads for a 768-wide,
12-deep encoder), scaled to the encoder: 2/3 of its width (a multiple of 32) and of its depth.
On the 128-wide, 4-deep mini ViT that is 96 wide and 3 deep."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..vit_tokens import encode, install_sincos_positions, patch_tokens, require_vit
from .base import Check, Generator, Method, StepOutput, sizes
from .masked_image import (
    LightDecoder,
    gather,
    normalise_patches,
    patchify,
    random_split,
    xavier_init,
)

HEAD_DIM = 32  # MAE's decoder heads: 512 / 16


@dataclass
class MAEOptions:
    mask_ratio: float = 0.75
    decoder_dim: int | None = None  # default: 2/3 of the encoder's width, a multiple of 32
    decoder_depth: int | None = None  # default: 2/3 of the encoder's depth
    norm_pix_loss: bool = True
    sincos_positions: bool = True

    def checks(self) -> list[Check]:
        return [(0 < self.mask_ratio < 1, f"mask_ratio must be in (0, 1), got {self.mask_ratio}"),
                *sizes(self, "decoder_dim", "decoder_depth")]  # fmt: skip


class MAE(Method):
    Options = MAEOptions

    def __init__(
        self, backbone: nn.Module, mask_ratio: float = 0.75, decoder_dim: int | None = None,
        decoder_depth: int | None = None, norm_pix_loss: bool = True, sincos_positions: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.backbone = vit = require_vit(backbone, "mae")
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        dim = decoder_dim or max(HEAD_DIM, HEAD_DIM * round(vit.embed_dim * 2 / 3 / HEAD_DIM))
        depth = decoder_depth or max(1, round(len(vit.blocks) * 2 / 3))
        heads = dim // HEAD_DIM if dim % HEAD_DIM == 0 else 4 if dim % 4 == 0 else 1
        patch = vit.patch_embed.patch_size[0]
        out = patch * patch * vit.patch_embed.proj.in_channels
        self.decoder = LightDecoder(vit.embed_dim, vit.patch_embed.grid_size, out, dim, depth, heads)
        xavier_init(self)
        nn.init.normal_(self.decoder.mask_token, std=0.02)
        if sincos_positions:
            install_sincos_positions(vit)

    def forward(self, views: list[Tensor], generator: Generator = None) -> StepOutput:
        images, vit = views[0], self.backbone
        tokens = patch_tokens(vit, images)
        visible, masked = random_split(len(images), tokens.shape[1], self.mask_ratio, generator, images.device)
        prediction = self.decoder(encode(vit, gather(tokens, visible)), visible)
        target = patchify(images, vit.patch_embed.patch_size[0])
        if self.norm_pix_loss:
            target = normalise_patches(target)
        loss = ((gather(prediction, masked) - gather(target, masked)) ** 2).mean()
        return StepOutput(loss)
