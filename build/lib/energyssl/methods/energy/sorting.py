"""Patch sorting (ViT only): the image stays whole, the position embeddings are shuffled among
its patches, and the energy restores them by gradient steps on the embedding,
``p <- p - alpha * dE/dp``, with the loss ``sum_k ||p_k - p||^2``.

Two regularisers keep the network from sorting by patch borders alone (paper, appendix A.2):
the border of the patch-embedding kernel is zeroed in the forward pass, 1/16 or 2/16 of the
patch wide (50% / 50%, drawn per image, at least 1 pixel; the paper's 1 or 2 pixels of 16), and
half of the patch tokens are dropped before the transformer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from ...errors import UserError
from ...rng import Generator, uniform
from ...vit_tokens import encode, patch_embeddings, require_vit
from .corruptions import require
from .model import EnergyModel, Restoration


@dataclass
class PatchSorting:
    """Parameters of the sorting task (``--set corruption.sorting.KEY=V``)."""

    shuffle_fraction: float = 1.0  # share of patches whose embeddings are permuted among themselves
    edge_mask: bool = True
    token_drop: float = 0.5

    def __post_init__(self) -> None:
        require(
            0 <= self.shuffle_fraction <= 1, f"sorting: shuffle_fraction must be in [0, 1], got {self.shuffle_fraction}"
        )
        require(0 <= self.token_drop < 1, f"sorting: token_drop must be in [0, 1), got {self.token_drop}")

    def permutation(self, batch: int, n: int, generator: Generator, device: torch.device) -> Tensor:
        """(B, N): the index of the position embedding each patch receives; a permutation per image."""
        moved = round(self.shuffle_fraction * n)
        chosen = uniform((batch, n), generator, device).argsort(dim=1)[:, :moved]
        shuffled = chosen.gather(1, uniform((batch, moved), generator, device).argsort(dim=1))
        perm = torch.arange(n, device=device).repeat(batch, 1)
        return perm.scatter(1, chosen, shuffled)

    def kept_tokens(self, batch: int, n: int, generator: Generator, device: torch.device) -> Tensor | None:
        """(B, n_keep) sorted indices of the patch tokens that enter the transformer."""
        if self.token_drop <= 0:
            return None
        keep = max(1, round((1 - self.token_drop) * n))
        return uniform((batch, n), generator, device).argsort(dim=1)[:, :keep].sort(dim=1).values

    def edge_choices(self, patch: int) -> tuple[int, int]:
        """The two border widths for a patch of ``patch`` pixels: 1/16 and 2/16 of it, at least 1;
        refused where they would leave no pixel of the kernel."""
        narrow, wide = max(1, patch // 16), max(1, patch // 8)
        if self.edge_mask and 2 * wide >= patch:
            raise UserError(
                f"edge masking would zero the whole {patch}x{patch} patch kernel: use a patch of 3 px or more, "
                "or --set corruption.sorting.edge_mask=false"
            )
        return narrow, wide

    def edge_widths(self, batch: int, patch: int, generator: Generator, device: torch.device) -> Tensor | None:
        """(B,) border width of each image's kernel, narrow or wide with equal odds; None when off."""
        if not self.edge_mask:
            return None
        narrow, wide = self.edge_choices(patch)
        return torch.where(uniform((batch,), generator, device) < 0.5, narrow, wide)


def edge_masked_kernel(weight: Tensor, width: int) -> Tensor:
    """The patch-embedding kernel with its outermost ``width`` pixels zeroed."""
    if width <= 0:
        return weight
    mask = torch.zeros_like(weight)
    mask[..., width:-width, width:-width] = 1
    return weight * mask


def edge_masked_patch_tokens(vit: VisionTransformer, images: Tensor, widths: Tensor | None) -> Tensor:
    """The ViT's patch embedding (B, N, D), each image's computed with the outermost
    ``widths[b]`` pixels of the kernel zeroed (None: the whole kernel); no position embedding."""
    weight = vit.patch_embed.proj.weight
    if widths is None:
        return patch_embeddings(vit, images)
    tokens = torch.zeros(())
    for width in widths.unique().tolist():
        embedded = patch_embeddings(vit, images, edge_masked_kernel(weight, int(width)))
        tokens = torch.where((widths == width).view(-1, 1, 1), embedded, tokens)
    return tokens


def energy_with_positions(
    model: EnergyModel, images: Tensor, positions: Tensor, kept: Tensor | None = None, edge: Tensor | None = None
) -> Tensor:
    """E of ``images`` when patch i carries position embedding ``positions[:, i]`` (B, N, D)."""
    vit = require_vit(model.backbone, "patch sorting", class_token=False)
    tokens = edge_masked_patch_tokens(vit, images, edge) + positions
    if kept is not None:
        tokens = tokens.gather(1, kept.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return model.head(vit.forward_head(encode(vit, tokens), pre_logits=True)).squeeze(-1)


def sorting_accuracy(positions: Tensor, table: Tensor, kept: Tensor | None = None) -> float:
    """Share of patches whose embedding is nearest (L2) to the embedding of their true position."""
    nearest = torch.cdist(positions.float(), table.float().expand(len(positions), -1, -1)).argmin(dim=-1)
    correct = nearest == torch.arange(table.shape[0], device=positions.device)
    if kept is not None:
        correct = correct.gather(1, kept)
    return correct.float().mean().item()


def shuffle_and_sort(
    model: EnergyModel,
    sorting: PatchSorting,
    table: Tensor,
    images: Tensor,
    generator: Generator,
    steps: int,
    grad_scale: float = 1.0,
) -> Restoration:
    """Shuffle the embeddings and restore them; the regularisers act only in training mode."""
    batch, n = len(images), table.shape[0]
    shuffled = table[sorting.permutation(batch, n, generator, images.device)]
    kept = sorting.kept_tokens(batch, n, generator, images.device) if model.training else None
    patch = require_vit(model.backbone, "patch sorting", class_token=False).patch_embed.patch_size[0]
    edge = sorting.edge_widths(batch, patch, generator, images.device) if model.training else None
    return sort_positions(model, table, images, shuffled, steps, kept, edge, grad_scale)


def sort_positions(
    model: EnergyModel,
    table: Tensor,
    images: Tensor,
    shuffled: Tensor,
    steps: int,
    kept: Tensor | None = None,
    edge: Tensor | None = None,
    grad_scale: float = 1.0,
) -> Restoration:
    """K gradient steps on the position embeddings; the loss counts the tokens the transformer saw."""

    def energy_fn(positions: Tensor) -> Tensor:
        return energy_with_positions(model, images, positions, kept, edge)

    target = table.expand(len(images), -1, -1)

    def seen(x: Tensor) -> Tensor:
        return x if kept is None else x.gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

    def target_loss(positions: Tensor) -> Tensor:
        return F.mse_loss(seen(positions), seen(target))

    return model.restoration_loss(shuffled, target_loss, steps, grad_scale, energy_fn)


def sorting_report(
    model: EnergyModel, sorting: PatchSorting, table: Tensor, images: Tensor, steps: int, seed: int = 0
) -> dict[str, float]:
    """Sorting accuracy on held-out images: share of patches whose embedding is nearest to their
    true position's, for the shuffled input and after each step (no regularisers)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    table = table.to(images)
    totals = torch.zeros(steps + 1, dtype=torch.float64)
    for start in range(0, len(images), 128):
        batch = images[start : start + 128]
        shuffled = table[sorting.permutation(len(batch), table.shape[0], generator, batch.device)]
        with torch.no_grad():  # no graph of the parameters: the input gradient alone is needed
            out = sort_positions(model, table, batch, shuffled, steps)
        for k, positions in enumerate([shuffled, *out.steps]):
            totals[k] += sorting_accuracy(positions, table) * len(batch)
    acc = (totals / len(images)).tolist()
    steps_accuracy = {f"step{k}_accuracy": v for k, v in enumerate(acc[1:], 1)}
    return {"shuffled_accuracy": acc[0], **steps_accuracy, "sorted_accuracy": acc[-1]}
