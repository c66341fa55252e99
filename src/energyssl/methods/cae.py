"""CAE (Chen et al., Context Autoencoder): the encoder sees the visible patches (block-wise
masking, BEiT style); a latent regressor of cross-attention layers predicts the masked
patches' representations from mask queries; an alignment loss pulls them towards the
encoder's own representations of the masked patches (computed without gradient); a decoder
maps the regressed representations to pixel targets (we have no tokenizer weights here).
Loss: pixels + ``align_weight`` * alignment.

As the reference (ViT-B: 75 of 196 patches masked, regressor and decoder 4 layers each, the
encoder's width): fixed 2-D sin-cos encoder positions, Xavier initialisation, positions added
to the regressor's queries and keys at every layer (not to its values), the visible patches'
representations without the class token as context, a norm after the regressor. Scaled to the
encoder: regressor and decoder a third of its depth (1 layer each on the 4-deep mini ViT).
Left out: BEiT's layer scale and the DALL-E tokenizer's targets."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..vit_tokens import encode, install_sincos_positions, patch_positions, patch_tokens, require_vit
from .base import Check, Generator, Method, StepOutput, sizes
from .masked_image import (
    blockwise_split,
    gather,
    normalise_patches,
    patchify,
    xavier_init,
)


class RegressorBlock(nn.Module):
    """Mask queries attend to the visible patches and to themselves; positions join queries
    and keys, not values; pre-norm residual attention and MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_q, self.norm_k, self.norm_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, queries: Tensor, context: Tensor, query_pos: Tensor, context_pos: Tensor) -> Tensor:
        q, k = self.norm_q(queries + query_pos), self.norm_k(context + context_pos)
        queries = queries + self.attn(q, k, self.norm_v(context), need_weights=False)[0]
        return queries + self.mlp(self.norm_mlp(queries))


@dataclass
class CAEOptions:
    mask_ratio: float = 75 / 196  # the reference's 75 of 196 patches
    regressor_depth: int | None = None  # default: a third of the encoder's depth
    decoder_depth: int | None = None  # default: a third of the encoder's depth
    align_weight: float = 2.0
    norm_pix_loss: bool = True
    sincos_positions: bool = True

    def checks(self) -> list[Check]:
        return [(0 < self.mask_ratio < 1, f"mask_ratio must be in (0, 1), got {self.mask_ratio}"),
                (self.align_weight >= 0, f"align_weight must be >= 0, got {self.align_weight}"),
                *sizes(self, "regressor_depth", "decoder_depth")]  # fmt: skip


class CAE(Method):
    Options = CAEOptions

    def __init__(
        self, backbone: nn.Module, mask_ratio: float = 75 / 196, regressor_depth: int | None = None,
        decoder_depth: int | None = None, align_weight: float = 2.0, norm_pix_loss: bool = True,
        sincos_positions: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.backbone = vit = require_vit(backbone, "cae")
        dim, heads, third = vit.embed_dim, vit.blocks[0].attn.num_heads, max(1, round(len(vit.blocks) / 3))
        self.mask_ratio, self.align_weight, self.norm_pix_loss = mask_ratio, align_weight, norm_pix_loss
        self.mask_query = nn.Parameter(torch.zeros(1, 1, dim))
        self.regressor = nn.ModuleList([RegressorBlock(dim, heads) for _ in range(regressor_depth or third)])
        self.regressor_norm = nn.LayerNorm(dim)
        self.decoder = nn.Sequential(
            *[Block(dim, heads, qkv_bias=True) for _ in range(decoder_depth or third)], nn.LayerNorm(dim)
        )
        patch = vit.patch_embed.patch_size[0]
        self.predict = nn.Linear(dim, patch * patch * vit.patch_embed.proj.in_channels)
        xavier_init(self)
        nn.init.normal_(self.mask_query, std=0.02)
        if sincos_positions:
            install_sincos_positions(vit)

    def forward(self, views: list[Tensor], generator: Generator = None) -> StepOutput:
        images, vit = views[0], self.backbone
        tokens = patch_tokens(vit, images)
        visible, masked = blockwise_split(
            len(images), vit.patch_embed.grid_size, self.mask_ratio, generator, images.device
        )
        latent_visible = encode(vit, gather(tokens, visible))[:, 1:]
        positions = patch_positions(vit).expand(len(images), -1, -1)
        pos_visible, pos_masked = gather(positions, visible), gather(positions, masked)
        queries = self.mask_query.expand(len(images), masked.shape[1], -1)
        for block in self.regressor:
            context = torch.cat([latent_visible, queries], dim=1)
            queries = block(queries, context, pos_masked, torch.cat([pos_visible, pos_masked], dim=1))
        queries = self.regressor_norm(queries)
        with torch.no_grad():
            target_latent = encode(vit, gather(tokens, masked))[:, 1:]
        align = F.mse_loss(queries, target_latent)
        prediction = self.predict(self.decoder(queries + pos_masked))
        target = gather(patchify(images, vit.patch_embed.patch_size[0]), masked)
        if self.norm_pix_loss:
            target = normalise_patches(target)
        pixels = F.mse_loss(prediction, target)
        loss = pixels + self.align_weight * align
        return StepOutput(loss, {"pixel_loss": pixels.detach(), "align_loss": align.detach()})
