"""``--grad-checkpointing``: the same parameter gradients as without (float64), for the energy
method's double backward (each restoration step recomputed), its fast mode, and a token method
(MAE, through ``vit_tokens.encode``); one error for a model without it."""

import pytest
import torch
from torch import nn

from energyssl import create_backbone
from energyssl.cli import main
from energyssl.errors import UserError
from energyssl.methods import method_for
from energyssl.models import enable_grad_checkpointing


def gradients(model: str, method: str, checkpointed: bool, **options) -> list[torch.Tensor]:
    torch.manual_seed(0)
    backbone = create_backbone(model, img_size=28, in_chans=1).double()
    built = method_for(method, backbone, 1, (0.3,), (0.3,), **options).double()
    if checkpointed:
        built.set_grad_checkpointing(model)
    images = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    built(([images]), torch.Generator().manual_seed(0)).loss.backward()
    return [p.grad for p in built.parameters() if p.grad is not None]


@pytest.mark.parametrize(
    ("model", "method", "options"),
    [
        ("essl_vit_micro_patch7", "energy", {"steps": 2, "grad_mode": "exact", "task": "mixed"}),
        ("essl_vit_micro_patch7", "energy", {"steps": 2, "grad_mode": "exact", "task": "sorting"}),
        ("essl_resnet_tiny", "energy", {"steps": 2, "grad_mode": "exact", "task": "grid_mask"}),  # BatchNorm
        ("essl_vit_micro_patch7", "energy", {"steps": 2, "grad_mode": "fast", "task": "grid_mask"}),
        ("essl_vit_micro_patch7", "mae", {}),
    ],
)
def test_gradients_equal_those_without(model, method, options):
    plain, checkpointed = gradients(model, method, False, **options), gradients(model, method, True, **options)
    assert len(plain) == len(checkpointed) > 2
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_each_restoration_step_is_recomputed_in_the_backward():
    """Exact mode under checkpointing runs the backbone again in the backward pass (K times
    more forward passes there), which is what frees each step's graph in the forward."""
    calls = []
    torch.manual_seed(0)
    backbone = create_backbone("essl_vit_micro_patch7", img_size=28, in_chans=1)
    backbone.blocks.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    method = method_for("energy", backbone, steps=2, grad_mode="exact", task="grid_mask")
    method.set_grad_checkpointing("essl_vit_micro_patch7")
    loss = method([torch.randn(4, 1, 28, 28)], torch.Generator().manual_seed(0)).loss
    forward = len(calls)
    loss.backward()
    assert len(calls) - forward == 2  # the two steps' forward passes, again


def test_a_model_without_it_is_one_error():
    with pytest.raises(UserError, match="no gradient checkpointing"):
        enable_grad_checkpointing(nn.Linear(2, 2), "linear")


def test_pretrain_and_finetune_run_with_it(tmp_path, capsys):
    tiny = ["--model", "essl_vit_micro_patch7", "--batch-size", "16", "--no-tensorboard", "--max-steps", "2"]
    run = tmp_path / "run"
    assert (
        main(["pretrain", *tiny, "--grad-mode", "exact", "--steps", "2", "--grad-checkpointing", "--out", str(run)])
        == 0
    )
    assert "each restoration step's graph is recomputed" in capsys.readouterr().out
    args = ["--grad-checkpointing", "--label-fraction", "0.05", "--epochs", "1", "--max-steps", "2"]
    assert main(["finetune", "--init", str(run), *args, "--no-tensorboard", "--out", str(tmp_path / "ft")]) == 0
