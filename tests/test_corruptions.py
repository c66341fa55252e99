import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from energyssl.errors import UserError
from energyssl.methods.energy.corruptions import (
    BlockMask,
    Colorize,
    Denoise,
    GridMask,
    Mixed,
    SuperResolution,
    build_corruption,
    task_corruptions,
)


def images(chans=1, batch=16, size=28, seed=0):
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(seed)) + 3.0


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.7, 0.9])
def test_grid_mask_blanks_whole_cells_at_the_ratio(ratio):
    x = images()
    out = GridMask(cell=4, ratio=ratio)(x, gen())
    blank = out == 0
    assert blank.float().mean(dim=(1, 2, 3)).sub(ratio).abs().max() <= 0.5 / 49 + 1e-6
    cells = blank.view(16, 1, 7, 4, 7, 4).float().mean(dim=(3, 5))
    assert set(cells.unique().tolist()) <= {0.0, 1.0}, "cells must be blanked whole"
    assert torch.equal(out[~blank], x[~blank])


def test_grid_mask_differs_per_image_and_is_seeded():
    x = images()
    a, b = GridMask()(x, gen(1)), GridMask()(x, gen(1))
    assert torch.equal(a, b)
    assert not torch.equal((a[0] == 0), (a[1] == 0))
    assert not torch.equal(a, GridMask()(x, gen(2)))


@pytest.mark.parametrize("preset,low,high", [("small", 0.2, 0.5), ("large", 0.25, 0.65)])
def test_block_mask_presets_cover_a_plausible_fraction(preset, low, high):
    out = BlockMask(**BlockMask.PRESETS[preset])(images(batch=64), gen())
    fraction = (out == 0).float().mean().item()
    assert low < fraction < high


def test_block_mask_blocks_are_rectangles_of_the_requested_size():
    mask = BlockMask(count=1, scale=(0.1, 0.1), aspect=(1.0, 1.0)).mask(32, 28, 28, gen(), torch.device("cpu"))
    for m in mask[:, 0]:
        rows, cols = m.any(dim=1).sum().item(), m.any(dim=0).sum().item()
        assert rows * cols == m.sum().item()  # a filled rectangle
        assert rows == cols == round((0.1 * 784) ** 0.5)


@pytest.mark.parametrize("factor", [2, 4])
def test_super_resolution_is_nearest_up_of_bicubic_down(factor):
    x = images()
    expected = F.interpolate(F.interpolate(x, scale_factor=1 / factor, mode="bicubic"), size=(28, 28), mode="nearest")
    torch.testing.assert_close(SuperResolution(factor)(x), expected)
    out = SuperResolution(factor)(x)
    assert torch.equal(out[..., ::factor, ::factor].repeat_interleave(factor, 2).repeat_interleave(factor, 3), out)


def test_denoise_follows_the_diffusion_formula():
    x = images()
    out = Denoise(gamma=(0.36, 0.36))(x, gen(3))
    noise = (out - 0.6 * x) / 0.8
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05
    varied = Denoise(gamma=(0.0, 1.0))(x, gen(3))
    per_image = (varied - x).pow(2).mean(dim=(1, 2, 3))
    assert per_image.std() > 0.1, "gamma must be drawn per image"


def test_colorization_gives_equal_channels_and_refuses_grey():
    x = images(chans=3)
    out = Colorize()(x)
    pixels = out * torch.tensor(Colorize.std).view(1, 3, 1, 1) + torch.tensor(Colorize.mean).view(1, 3, 1, 1)
    torch.testing.assert_close(pixels[:, 0], pixels[:, 1])
    torch.testing.assert_close(pixels[:, 1], pixels[:, 2])
    with pytest.raises(UserError, match="3-channel"):
        Colorize()(images(chans=1))
    with pytest.raises(UserError, match="3-channel"):
        build_corruption("colorize", in_chans=1)


def test_mixed_applies_one_corruption_per_image_with_weights():
    x = images(chans=3, batch=200)
    parts = {"super_resolution": SuperResolution(2), "colorize": Colorize()}
    out = Mixed(parts, weights=[3.0, 1.0])(x, gen())
    is_sr = torch.isclose(out, parts["super_resolution"](x)).flatten(1).all(1)
    is_colour = torch.isclose(out, parts["colorize"](x)).flatten(1).all(1)
    assert torch.all(is_sr ^ is_colour)
    assert 0.65 < is_sr.float().mean().item() < 0.85


def test_build_corruption_reads_parameters_and_rejects_unknown_ones():
    grid = build_corruption("grid_mask", {"grid_mask": {"cell": 7, "ratio": 0.5}})
    assert (grid.cell, grid.ratio) == (7, 0.5)
    mixed = build_corruption("mixed", {"mixed": {"tasks": ["grid_mask", "block_mask_large"]}}, in_chans=1)
    assert list(task_corruptions(mixed, "mixed")) == ["grid_mask", "block_mask_large"]
    assert mixed.corruptions["block_mask_large"].count == 25
    assert "colorize" not in task_corruptions(build_corruption("mixed", in_chans=1), "mixed")
    masking = build_corruption("masking", {"masking": {"weights": [2, 1, 1]}, "grid_mask": {"cell": 7}}, in_chans=1)
    assert list(task_corruptions(masking, "masking")) == ["grid_mask", "block_mask", "block_mask_large"]
    assert masking.weights == [2, 1, 1] and masking.corruptions["grid_mask"].cell == 7
    with pytest.raises(UserError, match="cannot contain a mixture"):
        build_corruption("mixed", {"mixed": {"tasks": ["grid_mask", "masking"]}})
    with pytest.raises(UserError, match="unknown parameter"):
        build_corruption("grid_mask", {"grid_mask": {"size": 3}})
    with pytest.raises(UserError, match="unknown task"):
        build_corruption("inpaint")


class LargestTensor(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any op creates."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("task", ["grid_mask", "block_mask", "block_mask_large", "denoise", "colorize", "mixed"])
def test_corruptions_at_224_px_allocate_no_more_than_the_batch(task):
    """O(B x H x W) memory: no intermediate bigger than the image batch (a per-block mask of
    B x count x H x W would be 25 to 75 times bigger at 224 px)."""
    x = images(chans=3, batch=4, size=224)
    corruption = build_corruption(task, {}, in_chans=3)
    with LargestTensor() as largest:
        corruption(x, torch.Generator().manual_seed(0))
    assert largest.bytes <= x.numel() * x.element_size()
