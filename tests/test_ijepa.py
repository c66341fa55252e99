"""I-JEPA: the multi-block masking geometry, the loss against targets computed independently
(timm's own forward on the whole image), the EMA target encoder, and a 5-step run that exports
a plain timm backbone."""

import torch
import torch.nn.functional as F

from conftest import assert_ema_step
from energyssl import create_backbone
from energyssl.cli import main
from energyssl.methods import method_for
from energyssl.methods.ijepa import IJEPAOptions, multiblock_masks
from energyssl.methods.masked_image import gather


def test_multiblock_masks_follow_the_papers_geometry():
    grid, opts = (14, 14), IJEPAOptions()
    for seed in range(5):
        context, targets = multiblock_masks(8, grid, opts, torch.Generator().manual_seed(seed))
        assert len(targets) == 4 and context.shape[0] == 8 and context.shape[1] >= opts.min_context
        assert torch.equal(context, context.sort(dim=1).values)
        for ids in targets:
            rows, cols = ids // 14, ids % 14
            h = rows.max(1).values - rows.min(1).values + 1
            w = cols.max(1).values - cols.min(1).values + 1
            assert torch.equal(h * w, torch.full((8,), ids.shape[1]))  # full rectangles, one size per batch
            assert 0.1 * 196 <= ids.shape[1] <= 0.25 * 196 and 0.5 <= (h[0] / w[0]).item() <= 2.0
            for b in range(8):
                assert not set(context[b].tolist()) & set(ids[b].tolist())  # the context never sees a target


def test_loss_is_the_distance_to_the_target_encoders_normalised_output():
    torch.manual_seed(0)
    ijepa = method_for("ijepa", create_backbone("essl_vit_micro_patch7", patch_size=4)).eval()
    images = torch.randn(4, 1, 28, 28)
    loss = ijepa([images], torch.Generator().manual_seed(3)).loss
    context_ids, target_ids = multiblock_masks(4, (7, 7), ijepa.options, torch.Generator().manual_seed(3))
    teacher = ijepa.target_encoder.forward_features(images)[:, 1:]  # timm's own forward, whole image
    teacher = F.layer_norm(teacher, teacher.shape[-1:])
    vit = ijepa.backbone
    tokens = vit.patch_embed(images) + vit.pos_embed[:, 1:]
    context = vit.norm(vit.blocks(torch.cat([vit.cls_token.expand(4, -1, -1) + vit.pos_embed[:, :1],
                                             gather(tokens, context_ids)], 1)))[:, 1:]  # fmt: skip
    expected = torch.stack([F.mse_loss(ijepa.predictor(context, context_ids, ids), gather(teacher, ids))
                            for ids in target_ids]).mean()  # fmt: skip
    torch.testing.assert_close(loss, expected)


def test_target_encoder_is_the_backbones_ema():
    ijepa = method_for("ijepa", create_backbone("essl_vit_micro_patch7"))
    assert_ema_step(ijepa, ijepa.target_encoder, ijepa.backbone, 0.996)


def test_five_steps_then_fine_tune_and_probe(tmp_path):
    run = tmp_path / "run"
    args = ["pretrain", "--method", "ijepa", "--model", "essl_vit_micro_patch7", "--patch-size", "4"]
    assert main([*args, "--batch-size", "16", "--max-steps", "5", "--no-tensorboard", "--out", str(run)]) == 0
    ft = ["finetune", "--init", str(run), "--epochs", "1", "--label-fraction", "0.05", "--no-tensorboard"]
    assert main([*ft, "--out", str(tmp_path / "ft")]) == 0
    assert main(["probe", "--init", str(run), "--protocol", "knn", "--out", str(tmp_path / "knn")]) == 0
