"""DINO: the loss on a fixed input, the teacher's EMA and the centre, the multi-crop views,
the teacher temperature's warmup, and a 5-step run that exports a plain timm backbone."""

import math

import pytest
import torch
from PIL import Image

from conftest import assert_ema_step
from energyssl import create_backbone
from energyssl.cli import main
from energyssl.data import DataInfo
from energyssl.methods import method_for
from energyssl.methods.dino import DINO, dino_loss


def test_loss_matches_a_hand_computation():
    """Teacher softmaxes [.5, .5] and [.75, .25]; students [.5, .5], [.25, .75], [.5, .5];
    pairs of different crops: (t1, s2), (t1, s3), (t2, s1), (t2, s3)."""
    ln3 = math.log(3)
    teacher = [torch.tensor([[0.0, 0.0]]), torch.tensor([[ln3, 0.0]])]
    student = [torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, ln3]]), torch.tensor([[0.0, 0.0]])]
    t1_s2 = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    expected = (t1_s2 + 3 * math.log(2)) / 4
    loss = dino_loss(student, teacher, torch.zeros(1, 2), student_temp=1.0, teacher_temp=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    centred = dino_loss(student, teacher, torch.tensor([[ln3, 0.0]]), student_temp=1.0, teacher_temp=1.0)
    assert centred.item() != pytest.approx(expected)  # the centre shifts the teacher's targets


def test_teacher_follows_the_student_and_the_centre_the_teacher():
    torch.manual_seed(0)
    dino = method_for("dino", create_backbone("essl_vit_micro_patch7"), method_options={"local_crops": 2})
    views = [torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28), torch.randn(4, 1, 14, 14), torch.randn(4, 1, 14, 14)]
    out = dino(views)
    out.loss.backward()
    with torch.no_grad():
        teacher_out = dino.teacher_head(dino.teacher_backbone.forward_head(
            dino.teacher_backbone.forward_features(torch.cat(views[:2])), pre_logits=True))  # fmt: skip
    assert_ema_step(dino, dino.teacher_backbone, dino.backbone, 0.996)
    torch.testing.assert_close(dino.center, 0.1 * teacher_out.mean(0, keepdim=True))
    assert not dino.head.gain.requires_grad and dino.head.prototypes.shape == (4096, 256)


def test_multi_crop_views_and_the_temperature_warmup():
    info = DataInfo(1, 28, (0.5,), (0.5,), 10)
    views = DINO.transform(info, 28, (0.2, 1.0), DINO.Options(local_crops=3))(Image.new("L", (28, 28), 128))
    assert [tuple(v.shape) for v in views] == [(1, 28, 28)] * 2 + [(1, 14, 14)] * 3
    options = {"warmup_teacher_temp": 0.02, "teacher_temp": 0.06, "teacher_temp_warmup": 0.5}
    dino = method_for("dino", create_backbone("essl_vit_micro_patch7"), method_options=options)
    temps = []
    for progress in (0.0, 0.25, 0.5, 1.0):
        dino.progress.fill_(progress)
        temps.append(dino.teacher_temp())
    assert temps == pytest.approx([0.02, 0.04, 0.06, 0.06])
    with pytest.raises(Exception, match="not a multiple of the patch size 7"):
        method_for("dino", create_backbone("essl_vit_micro_patch7"), method_options={"local_size": 12})


def test_five_steps_then_fine_tune_and_probe(tmp_path):
    run = tmp_path / "run"
    args = ["pretrain", "--method", "dino", "--model", "essl_vit_micro_patch7", "--batch-size", "16"]
    assert main([*args, "--method-options", "{local_crops: 2}", "--max-steps", "5", "--out", str(run)]) == 0
    ft = ["finetune", "--init", str(run), "--epochs", "1", "--label-fraction", "0.05", "--no-tensorboard"]
    assert main([*ft, "--out", str(tmp_path / "ft")]) == 0
    assert main(["probe", "--init", str(run), "--protocol", "knn", "--out", str(tmp_path / "knn")]) == 0
