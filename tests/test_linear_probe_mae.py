"""MAE's linear probe (``probe --recipe mae``): its defaults, LARS's update as MAE writes it, a
frozen backbone, learning, torchrun, and an exact resume after SIGKILL."""

import signal
import subprocess

import pytest
import torch
from torch import nn

from conftest import TORCHRUN
from energyssl.cli import main, parse_config
from energyssl.config import FinetuneConfig
from energyssl.evaluation.finetune import LinearProbe, lars_optimizer
from test_eval_scale import ENV, cli, losses, top1

RUN = ["probe", "--protocol", "linear", "--recipe", "mae", "--model", "essl_vit_micro_patch7", "--seed", "1"]
RUN += ["--label-fraction", "0.05", "--epochs", "3", "--warmup-epochs", "1", "--blr", "400", "--batch-size", "16"]
RUN += ["--log-every", "1", "--no-tensorboard"]


def test_the_recipe_sets_maes_defaults_and_flags_still_override():
    cached, mae = parse_config("probe", []), parse_config("probe", ["--recipe", "mae"])
    assert (cached.epochs, cached.blr, cached.warmup_epochs) == (50, 1e-2, 1.0)
    assert (mae.epochs, mae.blr, mae.warmup_epochs, mae.weight_decay) == (90, 0.1, 10.0, 0.0)
    given = parse_config("probe", ["--recipe", "mae", "--epochs", "5", "--set", "blr=0.2"])
    assert (given.epochs, given.blr, given.warmup_epochs) == (5, 0.2, 10.0)


def mae_lars_step(w: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, lr: float, wd: float) -> torch.Tensor:
    """One step of MAE's util/lars.py, written out: weight decay and the trust ratio on
    parameters of more than one dimension, momentum 0.9, trust coefficient 0.001."""
    dp = grad.clone()
    if w.ndim > 1:
        dp = dp + wd * w
        ratio = 0.001 * w.norm() / dp.norm() if w.norm() > 0 and dp.norm() > 0 else torch.tensor(1.0)
        dp = dp * ratio
    buf.mul_(0.9).add_(dp)
    return w - lr * buf


def test_lars_updates_weights_and_biases_as_maes_lars():
    torch.manual_seed(0)
    layer = nn.Linear(6, 3).double()
    reference = [p.detach().clone() for p in layer.parameters()]
    buffers = [torch.zeros_like(p) for p in reference]
    optimizer = lars_optimizer(layer, FinetuneConfig(weight_decay=0.0), lr=2.0)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in reference]
        for p, g in zip(layer.parameters(), grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
        reference = [mae_lars_step(w, g, b, 2.0, 0.0) for w, g, b in zip(reference, grads, buffers, strict=True)]
    for p, expected in zip(layer.parameters(), reference, strict=True):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-9)  # timm adds eps=1e-8 to the norm


def test_the_backbone_stays_frozen_and_in_eval_mode():
    """Only the head trains; a CNN backbone's BatchNorm statistics do not move."""
    from energyssl.evaluation.backbone import build_classifier

    classifier = build_classifier("none", "essl_resnet_tiny", 10, 1, 28)[0]
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    probe = LinearProbe(classifier).train()
    optimizer = lars_optimizer(probe, FinetuneConfig(weight_decay=0.0), lr=1.0)
    for _ in range(2):
        loss = nn.functional.cross_entropy(probe(torch.randn(8, 1, 28, 28)), torch.randint(0, 10, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert all(torch.equal(before[k], v) for k, v in classifier.state_dict().items())
    assert not probe.backbone.training and probe.norm.training


def test_lars_fits_a_linear_head_at_maes_learning_rate():
    """The trust ratio moves the weights by about lr / 1000 of their norm a step: MAE's lr (6.4
    at batch 16384) fits separable features in a few hundred steps."""
    torch.manual_seed(0)
    centres = 3 * torch.randn(4, 16)
    labels = torch.randint(0, 4, (512,))
    features = centres[labels] + torch.randn(512, 16)
    head = nn.Sequential(nn.BatchNorm1d(16, affine=False), nn.Linear(16, 4))
    optimizer = lars_optimizer(head, FinetuneConfig(weight_decay=0.0), lr=6.4)
    for _ in range(300):
        loss = nn.functional.cross_entropy(head(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (head.eval()(features).argmax(1) == labels).float().mean() > 0.95


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    out = tmp_path_factory.mktemp("lp") / "whole"
    done = cli(*RUN, "--out", str(out))
    assert done.returncode == 0, done.stderr[-1500:]
    return out


def test_it_learns_and_writes_its_own_config(whole):
    assert top1(whole) > 15  # chance is 10
    assert "recipe: mae" in (whole / "config.yaml").read_text()


def test_a_killed_probe_resumes_exactly_with_the_probe_command(whole, tmp_path):
    out = tmp_path / "run"
    args = [*RUN, "--save-every", "5", "--out", str(out)]
    killed = cli(*args, signal_at=("SIGKILL", 13))  # 12 steps an epoch: in epoch 1, after step 10's checkpoint
    assert killed.returncode == -signal.SIGKILL
    resumed = cli("probe", "--config", str(out / "config.yaml"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-1500:]
    assert "at step 12 (epoch 1)" in resumed.stdout
    assert losses(out) == losses(whole) and top1(out) == top1(whole)


def test_under_torchrun_it_writes_once(tmp_path):
    done = subprocess.run([*TORCHRUN, "-m", "energyssl", *RUN, "--batch-size", "8", "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=300, env=ENV)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("linear-mae | ") == 1 and "2 process(es)" in done.stdout
    assert top1(tmp_path / "two") > 12  # chance: 10 +- 0.95 on 1,000 images


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--recipe", "mae", "--protocol", "knn"], "--recipe mae is a linear probe"),
        (["--recipe", "mae", "--init", "pixels"], "--recipe mae is a linear probe"),
        (["--accum-iter", "2"], "apply to --recipe mae only"),
        (["--recipe", "lars"], "unknown recipe 'lars'"),
    ],
)
def test_options_that_do_not_apply_are_refused(tmp_path, capsys, flags, message):
    assert main(["probe", *flags, "--out", str(tmp_path / "p")]) == 2
    assert message in capsys.readouterr().err
