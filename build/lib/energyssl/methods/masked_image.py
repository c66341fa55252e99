"""Pieces the masked-image methods share (MAE, CAE, AE + task, I-JEPA): patches, masks, MAE's
positions and initialisation, and a light transformer decoder."""

from __future__ import annotations

import math

import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from ..rng import Generator, uniform


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, N, patch * patch * C), patches in row-major order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def normalise_patches(patches: Tensor) -> Tensor:
    """Per-patch zero mean and unit variance (MAE's normalised pixel target)."""
    mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + 1e-6).sqrt()


def gather(x: Tensor, ids: Tensor) -> Tensor:
    """Rows ``ids`` (B, M) of ``x`` (B, N, D)."""
    return x.gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def random_split(batch: int, n: int, ratio: float, generator: Generator, device: torch.device) -> tuple[Tensor, Tensor]:
    """(visible ids, masked ids), each sorted, with round(ratio * n) masked per image."""
    masked = min(n - 1, max(1, round(ratio * n)))
    order = uniform((batch, n), generator, device).argsort(dim=1)
    return order[:, masked:].sort(dim=1).values, order[:, :masked].sort(dim=1).values


def host_generator(generator: Generator, device: torch.device) -> torch.Generator | None:
    """A CPU generator for masks drawn in Python loops, seeded from ``generator`` (which may
    live on the GPU); None stays None (the global random state)."""
    if generator is None or generator.device.type == "cpu":
        return generator
    return torch.Generator().manual_seed(int(uniform((1,), generator, device).item() * 2**62))


def blockwise_split(
    batch: int, grid: tuple[int, int], ratio: float, generator: Generator, device: torch.device
) -> tuple[Tensor, Tensor]:
    """BEiT-style block-wise masking: rectangles of random area and aspect ratio are masked
    until round(ratio * n) patches are, then trimmed or filled at random to that count."""
    rows, cols = grid
    n = rows * cols
    generator = host_generator(generator, device)  # the loop below draws on the host
    target = min(n - 1, max(1, round(ratio * n)))
    masks = []
    for _ in range(batch):
        mask = torch.zeros(rows, cols, dtype=torch.bool)
        for _attempt in range(10 * n):
            if int(mask.sum()) >= target:
                break
            u = torch.rand(4, generator=generator)
            area = max(1.0, float(u[0]) * (target - int(mask.sum())) + 1)
            aspect = math.exp(math.log(0.3) + float(u[1]) * (math.log(1 / 0.3) - math.log(0.3)))
            h = min(rows, max(1, round(math.sqrt(area * aspect))))
            w = min(cols, max(1, round(math.sqrt(area / aspect))))
            top, left = int(float(u[2]) * (rows - h + 1)), int(float(u[3]) * (cols - w + 1))
            mask[top : top + h, left : left + w] = True
        flat = mask.flatten()
        noise = torch.rand(n, generator=generator)
        order = torch.argsort(noise + 2.0 * flat.float(), descending=True)  # masked first, random within
        extra = int(flat.sum()) - target
        if extra > 0:  # trim at random among the masked
            flat[order[target : target + extra]] = False
        elif extra < 0:  # fill at random among the visible
            flat[order[int(mask.sum()) : target]] = True
        masks.append(flat)
    stacked = torch.stack(masks).to(device)
    ids = torch.arange(n, device=device).expand(batch, -1)
    return ids[~stacked].view(batch, -1), ids[stacked].view(batch, -1)


def xavier_init(module: nn.Module) -> None:
    """MAE's initialisation: Xavier-uniform linear layers and patch projection (as a linear
    map), zero biases, unit norms, tokens N(0, 0.02)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, VisionTransformer):
            nn.init.xavier_uniform_(m.patch_embed.proj.weight.view(m.embed_dim, -1))
            nn.init.normal_(m.cls_token, std=0.02)


class LightDecoder(nn.Module):
    """Linear embedding, learned mask token, fixed sin-cos positions (optional), a few transformer
    blocks and a linear prediction: MAE's decoder, sized down."""

    def __init__(
        self, in_dim: int, grid: tuple[int, int], out_dim: int, dim: int = 128, depth: int = 2, heads: int = 4,
        positions: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.num_patches = grid[0] * grid[1]
        table = build_sincos2d_pos_embed(list(grid), dim=dim).unsqueeze(0) if positions else None
        self.register_buffer("positions", table, persistent=False)
        self.blocks = nn.Sequential(*[Block(dim, heads, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.predict = nn.Linear(dim, out_dim)

    def forward(self, latent: Tensor, visible: Tensor | None = None) -> Tensor:
        """``latent`` (B, 1 + M, in_dim) from :func:`encode` for the patches ``visible`` (B, M):
        all N patches get a prediction, the missing ones from the mask token (B, N, out_dim).
        Without ``visible`` the M given tokens are decoded as they are (B, M, out_dim)."""
        x = self.embed(latent)
        cls, tokens = x[:, :1], x[:, 1:]
        if visible is not None:
            full = self.mask_token.to(tokens.dtype).expand(len(x), self.num_patches, -1)  # bf16 under autocast
            tokens = full.scatter(1, visible.unsqueeze(-1).expand(-1, -1, x.shape[-1]), tokens)
        if self.positions is not None:
            tokens = tokens + self.positions
        x = torch.cat([cls, tokens], dim=1)
        return self.predict(self.norm(self.blocks(x)))[:, 1:]
