"""CAE (Chen et al., Context Autoencoder): the encoder sees the visible patches (block-wise
masking, BEiT style); a latent regressor of cross-attention blocks predicts the masked
patches' representations from mask queries; an alignment loss pulls them towards the
encoder's own representations of the masked patches (computed without gradient); a decoder
maps the regressed representations to pixel targets (we have no tokenizer weights here).
Loss: pixels + ``align_weight`` * alignment."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from ..vit_tokens import encode, patch_positions, patch_tokens
from .base import Generator, Method, StepOutput
from .common import (
    blockwise_split,
    gather,
    normalise_patches,
    patchify,
    require_vit,
)


class CrossAttentionBlock(nn.Module):
    """Queries attend to keys/values; pre-norm residual attention and MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, queries: Tensor, context: Tensor) -> Tensor:
        kv = self.norm_kv(context)
        queries = queries + self.attn(self.norm_q(queries), kv, kv, need_weights=False)[0]
        return queries + self.mlp(self.norm_mlp(queries))


@dataclass
class CAEOptions:
    mask_ratio: float = 0.5
    regressor_depth: int = 2
    decoder_depth: int = 2
    align_weight: float = 2.0
    norm_pix_loss: bool = True


class CAE(Method):
    Options = CAEOptions

    def __init__(
        self, backbone: nn.Module, mask_ratio: float = 0.5, regressor_depth: int = 2, decoder_depth: int = 2,
        align_weight: float = 2.0, norm_pix_loss: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.backbone = vit = require_vit(backbone, "cae")
        dim, heads = vit.embed_dim, vit.blocks[0].attn.num_heads
        self.mask_ratio, self.align_weight, self.norm_pix_loss = mask_ratio, align_weight, norm_pix_loss
        self.mask_query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_query, std=0.02)
        self.regressor = nn.ModuleList([CrossAttentionBlock(dim, heads) for _ in range(regressor_depth)])
        self.decoder = nn.Sequential(
            *[Block(dim, heads, qkv_bias=True) for _ in range(decoder_depth)], nn.LayerNorm(dim)
        )
        patch = vit.patch_embed.patch_size[0]
        self.predict = nn.Linear(dim, patch * patch * vit.patch_embed.proj.in_channels)

    def forward(self, views: list[Tensor], generator: Generator = None) -> StepOutput:
        images, vit = views[0], self.backbone
        tokens = patch_tokens(vit, images)
        visible, masked = blockwise_split(
            len(images), vit.patch_embed.grid_size, self.mask_ratio, generator, images.device
        )
        latent_visible = encode(vit, gather(tokens, visible))
        positions = gather(patch_positions(vit).expand(len(images), -1, -1), masked)
        queries = self.mask_query + positions
        for block in self.regressor:
            queries = block(queries, torch.cat([latent_visible, queries], dim=1))
        with torch.no_grad():
            target_latent = encode(vit, gather(tokens, masked))[:, 1:]
        align = F.mse_loss(queries, target_latent)
        prediction = self.predict(self.decoder(queries + positions))
        target = gather(patchify(images, vit.patch_embed.patch_size[0]), masked)
        if self.norm_pix_loss:
            target = normalise_patches(target)
        pixels = F.mse_loss(prediction, target)
        loss = pixels + self.align_weight * align
        return StepOutput(loss, {"pixel_loss": pixels.detach(), "align_loss": align.detach()})
