"""MAE, AE + task and CAE: masks, learning on a fixed batch, export to a plain timm model."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from energyssl import create_backbone
from energyssl.cli import main
from energyssl.errors import UserError
from energyssl.methods import method_for
from energyssl.methods.masked_image import blockwise_split, patchify, random_split


def vit(patch=4):
    torch.manual_seed(0)
    return create_backbone("essl_vit_micro_patch7", img_size=28, in_chans=1, patch_size=patch)


def test_random_masking_has_the_ratio_and_differs_per_image():
    visible, masked = random_split(8, 49, 0.75, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert masked.shape == (8, 37) and visible.shape == (8, 12)
    both = torch.cat([visible, masked], dim=1).sort(dim=1).values
    assert torch.equal(both, torch.arange(49).expand(8, -1))
    assert not torch.equal(masked[0], masked[1])


def test_blockwise_masking_masks_contiguous_blocks():
    visible, masked = blockwise_split(16, (7, 7), 0.4, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert masked.shape == (16, 20) and visible.shape == (16, 29)
    grid = torch.zeros(16, 49, dtype=torch.bool).scatter(1, masked, True).view(16, 7, 7)
    # block-wise: masked patches mostly have a masked 4-neighbour (random masks rarely would)
    padded = torch.nn.functional.pad(grid.float(), (1, 1, 1, 1))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    assert (neighbours[grid] > 0).float().mean() > 0.85


def test_patchify_round_trips_patch_order():
    images = torch.arange(2 * 16, dtype=torch.float).view(2, 1, 4, 4)
    patches = patchify(images, 2)
    assert patches.shape == (2, 4, 4)
    assert patches[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]


@pytest.mark.parametrize("method,task", [("mae", None), ("ae", "grid_mask"), ("ae", "sorting"), ("cae", None)])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(method, task):
    model = method_for(method, vit(), mean=(0.3,), std=(0.35,), **({} if task is None else {"task": task}))
    images = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(15):
        loss = model([images], torch.Generator().manual_seed(0)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_mae_follows_the_paper_scaled_to_the_encoder():
    """ViT-B gets the paper's decoder (512 wide, 8 deep, 16 heads); the mini ViT 2/3 of its
    width and depth. The encoder's positions are fixed 2-D sin-cos and stay so in training."""
    from timm.layers import build_sincos2d_pos_embed

    base = method_for("mae", timm.create_model("vit_base_patch16_224"), in_chans=3)
    block = base.decoder.blocks[0]
    assert (base.decoder.embed.out_features, len(base.decoder.blocks), block.attn.num_heads) == (512, 8, 16)
    mae = method_for("mae", create_backbone("essl_vit_mini_patch7"))
    assert (mae.decoder.embed.out_features, len(mae.decoder.blocks)) == (96, 3)
    pos = mae.backbone.pos_embed
    torch.testing.assert_close(pos[0, 1:], build_sincos2d_pos_embed([4, 4], dim=128))
    assert not pos.requires_grad and not pos[0, 0].any()
    qkv = mae.backbone.blocks[0].attn.qkv.weight  # Xavier-uniform: bound sqrt(6 / (fan_in + fan_out))
    assert qkv.abs().max() <= (6 / (128 + 384)) ** 0.5 and qkv.std() > 0.8 * (2 / (128 + 384)) ** 0.5
    optimizer = torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=1e-2)
    before, qkv_before = pos.clone(), qkv.detach().clone()
    mae([torch.randn(4, 1, 28, 28)], torch.Generator().manual_seed(0)).loss.backward()
    optimizer.step()
    assert torch.equal(pos, before) and not torch.equal(qkv, qkv_before)


def test_cae_follows_the_reference_scaled_to_the_encoder():
    """ViT-B gets the reference's regressor and decoder (4 layers each) and masks 75 of 196
    patches; the mini ViT gets a third of its depth. Positions are fixed 2-D sin-cos; the
    regressor's context is the visible patches without the class token, then its own queries."""
    base = method_for("cae", timm.create_model("vit_base_patch16_224"), in_chans=3)
    assert (len(base.regressor), len(base.decoder) - 1, round(base.mask_ratio * 196)) == (4, 4, 75)
    cae = method_for("cae", create_backbone("essl_vit_mini_patch7"))
    assert (len(cae.regressor), len(cae.decoder) - 1) == (1, 1)
    assert not cae.backbone.pos_embed.requires_grad and not cae.backbone.pos_embed[0, 0].any()
    seen = []
    cae.regressor[0].register_forward_hook(lambda m, args, out: seen.append([a.shape for a in args]))
    cae([torch.randn(2, 1, 28, 28)], torch.Generator().manual_seed(0))
    masked = round(75 / 196 * 16)  # 16 patches on the mini ViT
    queries, context, query_pos, context_pos = seen[0]
    assert queries == query_pos == (2, masked, 128) and context == context_pos == (2, 16, 128)


def test_baselines_need_a_vit():
    with pytest.raises(UserError, match="needs a ViT"):
        method_for("mae", create_backbone("essl_resnet_tiny", in_chans=1))
    with pytest.raises(UserError, match=r"unknown option\(s\) for mae: mask_raito \(valid: mask_ratio, decoder_dim"):
        method_for("mae", vit(), method_options={"mask_raito": 0.5})
    with pytest.raises(UserError, match="option 'mask_ratio' must be a number, got 'high'"):
        method_for("mae", vit(), method_options={"mask_ratio": "high"})


@pytest.mark.parametrize("method", ["mae", "ae", "cae"])
def test_pretrain_exports_an_encoder_that_fine_tunes_and_probes(tmp_path, method):
    out = tmp_path / method
    args = ["pretrain", "--method", method, "--model", "essl_vit_micro_patch7"]
    args += ["--task", "grid_mask"] if method == "ae" else []  # MAE and CAE mask patches themselves
    assert main([*args, "--max-steps", "3", "--batch-size", "16", "--no-tensorboard", "--out", str(out)]) == 0
    meta_model = "essl_vit_micro_patch7"
    exported = load_file(out / "backbone.safetensors")
    assert not any(k.startswith(("decoder", "regressor", "mask_query")) for k in exported)
    plain = timm.create_model(meta_model, num_classes=10, in_chans=1, img_size=28)
    missing, unexpected = plain.load_state_dict(exported, strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected
    probe = tmp_path / f"{method}-probe"
    assert main(["probe", "--protocol", "knn", "--init", str(out), "--out", str(probe)]) == 0
    assert json.loads((probe / "results.json").read_text())["loaded_tensors"] == len(exported)


def test_the_readmes_example_method_is_one_file_and_one_registry_line(tmp_path, monkeypatch):
    """The README's smallest method, loaded as a module of energyssl.methods and registered
    with one line, pretrains through the CLI."""
    import re
    import sys
    import types
    from pathlib import Path

    from energyssl import methods

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"### Adding a method.*?```python\n(.*?)```", readme, re.S).group(1)
    module = types.ModuleType("energyssl.methods.denoise_ae")
    module.__package__ = "energyssl.methods"
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, "README.md", "exec"), module.__dict__)  # noqa: S102
    monkeypatch.setitem(methods.REGISTRY, "denoise_ae", "denoise_ae:DenoisingAE")
    args = ["pretrain", "--method", "denoise_ae", "--method-options", "{noise: 0.3}", "--max-steps", "2"]
    assert main([*args, "--model", "essl_vit_micro_patch7", "--batch-size", "8", "--out", str(tmp_path)]) == 0
    assert "noisy_loss" in (tmp_path / "metrics.jsonl").read_text()
