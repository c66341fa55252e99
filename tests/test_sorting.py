"""Patch sorting: permutations, regularisers, gradients through the embedding restoration, accuracy."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_vit
from energyssl import EnergyModel, create_backbone
from energyssl.cli import main
from energyssl.errors import UserError
from energyssl.evaluation.backbone import build_classifier
from energyssl.methods.energy.sorting import (
    PatchSorting,
    edge_masked_kernel,
    energy_with_positions,
    sort_positions,
    sorting_accuracy,
)
from energyssl.methods.energy.tasks import build_task, split_sorting
from energyssl.vit_tokens import install_sincos_positions


def sincos_table(vit):
    """The 2-D sin-cos positions of ``vit``'s patches, (N, D), as timm builds them."""
    from timm.layers import build_sincos2d_pos_embed

    return build_sincos2d_pos_embed(list(vit.patch_embed.grid_size), dim=vit.embed_dim, temperature=10000.0)


def test_shuffles_are_permutations_and_partial_shuffles_move_a_share():
    g = torch.Generator().manual_seed(0)
    perm = PatchSorting().permutation(64, 16, g, torch.device("cpu"))
    assert torch.equal(perm.sort(dim=1).values, torch.arange(16).repeat(64, 1))
    assert (perm == torch.arange(16)).float().mean() < 0.2
    partial = PatchSorting(shuffle_fraction=0.25).permutation(64, 16, g, torch.device("cpu"))
    assert torch.equal(partial.sort(dim=1).values, torch.arange(16).repeat(64, 1))
    assert (partial != torch.arange(16)).sum(dim=1).max() <= 4


def test_edge_mask_zeroes_the_border_of_each_patch_kernel_in_the_forward_pass():
    weight = torch.ones(8, 1, 7, 7)
    for width in (1, 2):
        masked = edge_masked_kernel(weight, width)
        assert masked[..., :width, :].abs().sum() == 0 and masked[..., :, -width:].abs().sum() == 0
        assert masked[..., width:-width, width:-width].eq(1).all()
    model = tiny_vit()
    vit = model.backbone
    table = install_sincos_positions(vit, trainable=False)
    images = torch.randn(2, 1, 14, 14)
    border = images.clone()
    border[..., 0, :] += 5.0  # change only pixels on the outer row of the top patches
    positions = table.expand(2, -1, -1)
    same = energy_with_positions(model, images, positions, edge=torch.tensor([1, 1]))
    assert torch.allclose(same, energy_with_positions(model, border, positions, edge=torch.tensor([1, 1])))
    assert not torch.allclose(same, energy_with_positions(model, border, positions, edge=None))
    per_image = energy_with_positions(model, border, positions, edge=torch.tensor([1, 0]))  # each its own width
    assert torch.allclose(per_image[0], same[0]) and not torch.allclose(per_image[1], same[1])


@pytest.mark.parametrize("patch,widths", [(16, {1, 2}), (32, {2, 4}), (7, {1}), (4, {1})])
def test_edge_width_is_a_sixteenth_or_an_eighth_of_the_patch_drawn_per_image(patch, widths):
    drawn = PatchSorting().edge_widths(256, patch, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert set(drawn.tolist()) == widths
    if len(widths) == 2:
        assert 0.4 < (drawn == min(widths)).float().mean() < 0.6


def test_edge_masking_that_would_zero_the_kernel_is_refused():
    with pytest.raises(UserError, match="zero the whole 2x2 patch kernel"):
        PatchSorting().edge_choices(2)
    assert PatchSorting(edge_mask=False).edge_widths(4, 2, None, torch.device("cpu")) is None


def test_token_drop_keeps_half_the_patches():
    kept = PatchSorting(token_drop=0.5).kept_tokens(32, 16, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert kept.shape == (32, 8)
    assert all(len(set(row.tolist())) == 8 for row in kept)
    assert kept.unique().numel() == 16  # different patches are dropped in different images


def test_embedding_restoration_gradient_matches_finite_differences():
    model = tiny_vit(torch.float64)
    table = install_sincos_positions(model.backbone, trainable=False).double()
    images = torch.randn(2, 1, 14, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    shuffled = table[torch.tensor([[1, 0, 3, 2], [3, 2, 1, 0]])]
    param = model.backbone.blocks[0].attn.qkv.weight
    model.zero_grad()
    sort_positions(model, table, images, shuffled, steps=1).loss.backward()
    assert param.grad.abs().max() > 0
    assert model.backbone.patch_embed.proj.weight.grad.abs().max() > 0
    largest = param.grad.abs().flatten().topk(3).indices  # entries well above finite-difference noise
    for index in [tuple(int(i) for i in torch.unravel_index(flat, param.shape)) for flat in largest]:
        with torch.no_grad():
            original = param[index].item()
            param[index] = original + 1e-6
            plus = sort_positions(model, table, images, shuffled, steps=1).loss.item()
            param[index] = original - 1e-6
            minus = sort_positions(model, table, images, shuffled, steps=1).loss.item()
            param[index] = original
        numeric = (plus - minus) / 2e-6
        assert abs(param.grad[index].item() - numeric) / max(abs(numeric), 1e-8) < 1e-4


def test_accuracy_counts_nearest_embeddings():
    table = sincos_table(tiny_vit().backbone)
    assert sorting_accuracy(table.expand(3, -1, -1), table) == 1.0
    swapped = table[[1, 0, 2, 3]].expand(1, -1, -1)
    assert sorting_accuracy(swapped, table) == 0.5


def test_sorting_needs_a_vit_with_position_embedding():
    model = EnergyModel(create_backbone("essl_resnet_tiny", in_chans=1))
    with pytest.raises(UserError, match="needs a ViT"):
        build_task("sorting", {}, model.backbone, 1, (0.5,), (0.5,))


def test_sorting_joins_mixed_with_its_weight():
    task, params, share = split_sorting("mixed", {"mixed": {"tasks": ["grid_mask", "sorting"], "weights": [3, 1]}})
    assert task == "mixed" and params["mixed"] == {"tasks": ["grid_mask"], "weights": [3]} and share == 0.25
    assert split_sorting("grid_mask", {}) == ("grid_mask", {}, 0.0)


def test_sorting_pretraining_sorts_and_fine_tunes_from_sincos(tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--model", "essl_vit_micro_patch7", "--task", "sorting", "--max-steps", "4", "--steps", "2"]
    assert main([*args, "--batch-size", "16", "--no-tensorboard", "--out", str(out)]) == 0
    report = json.loads((out / "restoration.json").read_text())["tasks"]["sorting"]
    assert 0 <= report["shuffled_accuracy"] < 0.5 and "step2_accuracy" in report
    backbone = load_file(out / "backbone.safetensors")
    model, _, _ = build_classifier(str(out), None, 10, 1, 28)
    torch.testing.assert_close(model.pos_embed[0, 1:], sincos_table(model))
    assert model.pos_embed.requires_grad and torch.equal(model.pos_embed, backbone["pos_embed"])


def test_mixed_with_sorting_runs(tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--model", "essl_vit_micro_patch7", "--max-steps", "3", "--batch-size", "16", "--task", "mixed"]
    args += ["--set", "corruption.mixed.tasks=[grid_mask, denoise, sorting]", "--no-tensorboard", "--out", str(out)]
    assert main(args) == 0
    assert set(json.loads((out / "restoration.json").read_text())["tasks"]) == {"grid_mask", "denoise", "sorting"}
