"""Fast gradient mode: its finite-difference parameter gradient must agree with the exact
(double backward) one, replay dropout masks, and refuse backbones where it cannot work."""

import pytest
import torch

from conftest import tiny_vit
from energyssl import EnergyModel, create_backbone
from energyssl.methods.base import freeze_unreached_parameters
from energyssl.methods.energy import EnergyMethod
from energyssl.methods.energy.model import non_smooth_layers


def _gradients(objective, images, seed=0):
    """Flat parameter gradient (alpha apart) and alpha's gradient, from one loss backward."""
    objective.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # dropout masks, if any
    out = objective([images], torch.Generator().manual_seed(1))
    out.loss.backward()
    model = objective.model
    flat = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.grad is not None and n != "log_alpha"])
    return flat.double(), model.log_alpha.grad.item(), out.loss.item()


def _exact_and_fast(model, task):
    objective = EnergyMethod.around(model, task, steps=2)
    images = torch.randn(8, 1, 14, 14, generator=torch.Generator().manual_seed(2))
    freeze_unreached_parameters(objective, [images[:2]])
    exact = _gradients(objective, images)
    model.grad_mode = "fast"
    return exact, _gradients(objective, images)


@pytest.mark.parametrize("task", ["grid_mask", "mixed", "sorting"])
def test_fast_gradient_matches_exact_in_float32(task):
    (exact, exact_alpha, exact_loss), (fast, fast_alpha, fast_loss) = _exact_and_fast(tiny_vit(), task)
    assert torch.nn.functional.cosine_similarity(fast, exact, dim=0) >= 0.999
    assert (fast - exact).norm() / exact.norm() < 0.05
    assert fast_alpha == pytest.approx(exact_alpha, rel=1e-4)
    assert fast_loss == pytest.approx(exact_loss, rel=1e-6)


def test_fast_mode_replays_dropout_masks_in_its_second_pass():
    torch.manual_seed(0)
    backbone = create_backbone(
        "essl_vit_micro_patch7", img_size=14, in_chans=1, patch_size=7, drop_path_rate=0.3, proj_drop_rate=0.3
    )
    (exact, *_), (fast, *_) = _exact_and_fast(EnergyModel(backbone), "grid_mask")
    assert torch.nn.functional.cosine_similarity(fast, exact, dim=0) >= 0.999


def test_kinked_layers_are_named():
    assert non_smooth_layers(create_backbone("essl_resnet_tiny", in_chans=1)) == ["MaxPool2d", "ReLU"]
    assert non_smooth_layers(tiny_vit()) == []
