"""One token path through a timm ViT, built from its public pieces (``patch_embed``'s projection
and norm, ``pos_embed``, ``cls_token``/``reg_token``, ``pos_drop``, ``norm_pre``, ``blocks``,
``norm``), for the methods that work on tokens: a subset of them (MAE, CAE, I-JEPA), other
positions (patch sorting), another image size (DINO's local crops). With every token of an
image of the model's own size it equals ``forward_features``.
"""

from __future__ import annotations

import torch
from timm.layers import build_sincos2d_pos_embed, resample_abs_pos_embed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from .errors import UserError


def require_vit(backbone: nn.Module, user: str, class_token: bool = True) -> VisionTransformer:
    """The backbone as a timm ViT with a fixed absolute position embedding (and, where the
    user's heads read it, one class token and no registers), or one clear error."""
    vit = backbone
    if not isinstance(vit, VisionTransformer) or vit.pos_embed is None or vit.dynamic_img_size:
        raise UserError(f"{user} needs a ViT with a fixed absolute position embedding, not {type(vit).__name__}")
    if class_token and (vit.cls_token is None or vit.num_prefix_tokens != 1):
        raise UserError(f"{user} needs a ViT with one class token and no register tokens")
    return vit


def patch_embeddings(vit: VisionTransformer, images: Tensor, weight: Tensor | None = None) -> Tensor:
    """(B, N, D) patch embeddings without positions, for any image size the patch divides;
    ``weight`` replaces the projection's kernel (patch sorting masks its edges)."""
    proj = vit.patch_embed.proj
    x = torch.nn.functional.conv2d(
        images, proj.weight if weight is None else weight, proj.bias, stride=proj.stride, padding=proj.padding
    )
    return vit.patch_embed.norm(x.flatten(2).transpose(1, 2))


def patch_grid(vit: VisionTransformer, images: Tensor) -> tuple[int, int]:
    patch = vit.patch_embed.patch_size
    return images.shape[-2] // patch[0], images.shape[-1] // patch[1]


def patch_positions(vit: VisionTransformer, grid: tuple[int, int] | None = None) -> Tensor:
    """(1, N, D) position embeddings of the patch tokens, resampled to ``grid`` if it differs."""
    positions = vit.pos_embed[:, 0 if vit.no_embed_class else vit.num_prefix_tokens :]
    own = tuple(vit.patch_embed.grid_size)
    if grid is not None and tuple(grid) != own:
        positions = resample_abs_pos_embed(positions, list(grid), list(own), num_prefix_tokens=0)
    return positions


def install_sincos_positions(vit: VisionTransformer, trainable: bool = False) -> Tensor:
    """Write fixed 2-D sin-cos values into the patch positions of ``pos_embed`` (prefix tokens
    get zeros), as MAE's encoder, MoCo v3 and patch sorting use them; fine-tuning starts from
    them with a trainable embedding. Returns the (N, D) table."""
    table = build_sincos2d_pos_embed(list(vit.patch_embed.grid_size), dim=vit.embed_dim).to(vit.pos_embed)
    with torch.no_grad():
        vit.pos_embed.zero_()
        patch_positions(vit).copy_(table.unsqueeze(0))
    vit.pos_embed.requires_grad_(trainable)
    return table


def patch_tokens(vit: VisionTransformer, images: Tensor) -> Tensor:
    """(B, N, D) patch embeddings plus their positions."""
    return patch_embeddings(vit, images) + patch_positions(vit, patch_grid(vit, images))


def encode(vit: VisionTransformer, tokens: Tensor) -> Tensor:
    """The prefix tokens (class, registers) and the given patch tokens (B, M, D), positions
    included, through the blocks and final norm: (B, prefix + M, D)."""
    prefix = [t.expand(len(tokens), -1, -1) for t in (vit.cls_token, vit.reg_token) if t is not None]
    if prefix:
        start = torch.cat(prefix, dim=1)
        if not vit.no_embed_class:
            start = start + vit.pos_embed[:, : vit.num_prefix_tokens]
        tokens = torch.cat([start, tokens], dim=1)
    tokens = vit.norm_pre(vit.pos_drop(tokens))
    if vit.grad_checkpointing and torch.is_grad_enabled():  # --grad-checkpointing, as forward_features
        return vit.norm(checkpoint_seq(vit.blocks, tokens))
    return vit.norm(vit.blocks(tokens))


def features(vit: VisionTransformer, images: Tensor) -> Tensor:
    """``forward_features`` for any image size the patch divides."""
    return encode(vit, patch_tokens(vit, images))


def pooled(vit: VisionTransformer, images: Tensor) -> Tensor:
    """The pooled feature a classifier would see (class token or average, as the model pools)."""
    return vit.forward_head(features(vit, images), pre_logits=True)
