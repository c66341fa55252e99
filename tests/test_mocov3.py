"""MoCo v3: the loss on a fixed input, the momentum update and schedule, the frozen patch
projection, two views from the data, and a 5-step run that exports a plain timm backbone."""

import math

import pytest
import torch
from PIL import Image

from conftest import assert_ema_step
from energyssl import create_backbone
from energyssl.cli import main
from energyssl.data import DataInfo
from energyssl.methods import method_for
from energyssl.methods.mocov3 import MoCoV3, contrastive_loss


def test_contrastive_loss_matches_a_hand_computation():
    """Two orthogonal unit queries, keys equal to them: logit 1/T for the positive, 0 for the
    negative, so each row's loss is log(1 + exp(-1/T)), times 2T."""
    q = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # normalised inside
    t = 0.2
    expected = math.log(1 + math.exp(-1 / t)) * 2 * t
    assert contrastive_loss(q, q.clone(), t).item() == pytest.approx(expected, rel=1e-6)
    swapped = contrastive_loss(q, q.flip(0), t).item()  # positives now orthogonal: a large loss
    assert swapped == pytest.approx(math.log(1 + math.exp(1 / t)) * 2 * t, rel=1e-6)


def test_momentum_encoder_follows_with_a_momentum_rising_to_one():
    torch.manual_seed(0)
    method = method_for("mocov3", create_backbone("essl_vit_micro_patch7"))
    assert_ema_step(method, method.momentum_backbone, method.backbone, 0.99)  # 0.99 at the start
    target = method.momentum_backbone.blocks[0].mlp.fc1.weight
    method.after_step(1.0)  # 1 at the end: the momentum encoder no longer moves
    after = target.clone()
    method.after_step(1.0)
    assert torch.equal(target, after)
    assert not method.backbone.patch_embed.proj.weight.requires_grad  # the random patch projection trick


def test_two_asymmetric_views_of_each_image():
    info = DataInfo(1, 28, (0.5,), (0.5,), 10)
    views = MoCoV3.transform(info, 28, (0.2, 1.0), MoCoV3.Options())(Image.new("L", (28, 28), 128))
    assert len(views) == 2 and all(v.shape == (1, 28, 28) for v in views)


def test_five_steps_then_fine_tune_and_probe(tmp_path):
    run = tmp_path / "run"
    args = ["pretrain", "--method", "mocov3", "--model", "essl_vit_micro_patch7", "--batch-size", "16"]
    assert main([*args, "--max-steps", "5", "--no-tensorboard", "--out", str(run)]) == 0
    ft = ["finetune", "--init", str(run), "--epochs", "1", "--label-fraction", "0.05", "--no-tensorboard"]
    assert main([*ft, "--out", str(tmp_path / "ft")]) == 0
    assert main(["probe", "--init", str(run), "--protocol", "knn", "--out", str(tmp_path / "knn")]) == 0
    assert main([*args, "--task", "denoise", "--max-steps", "1", "--out", str(tmp_path / "bad")]) == 2


def test_the_momentum_follows_the_learning_rates_clock(tmp_path):
    """One clock: with --max-steps far below the schedule's length the momentum is still near
    its start (it used to reach 1 at --max-steps while the lr was still warming up), and a
    resumed run continues it; both are logged."""
    from energyssl.metrics import read_metrics
    from energyssl.schedules import cosine

    run = tmp_path / "run"
    args = ["pretrain", "--method", "mocov3", "--model", "essl_vit_micro_patch7", "--batch-size", "16"]
    args += ["--epochs", "10", "--log-every", "1", "--no-tensorboard", "--out", str(run)]
    assert main([*args, "--max-steps", "3"]) == 0
    assert main([*args, "--max-steps", "5", "--resume"]) == 0
    records = read_metrics(run / "metrics.jsonl")
    total = 10 * (4000 // 16)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for r in records:
        assert r["momentum"] == pytest.approx(cosine(0.99, 1.0, r["step"] / total))
    assert records[2]["momentum"] < 0.9901 and records[2]["lr"] < 1e-4  # both at the schedule's start
