"""Randomness that a seed reproduces: the generator type every random draw takes, uniform draws on
a generator's device, and the per-step generator of training (a resumed run draws as the original)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Generator = torch.Generator | None


def uniform(shape: Sequence[int], generator: Generator, device: torch.device) -> Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, then moved (CPU generators work anywhere)."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=gen_device).to(device)


def step_generator(seed: int, rank: int, step: int, device: torch.device | None = None) -> torch.Generator:
    """A generator fixed by (seed, rank, step): a resumed run corrupts and masks exactly as the
    original. It lives on the batch's device, so methods draw their noise there (no host copy)."""
    return torch.Generator(device=device or "cpu").manual_seed(seed * 1_000_003 + rank * 7_919 + step)
