"""The restoration objective's parameter gradient, checked against finite differences."""

import pytest
import torch

from conftest import tiny_vit
from energyssl import EnergyModel, create_backbone
from energyssl.methods.base import freeze_unreached_parameters
from energyssl.methods.energy import EnergyMethod
from energyssl.methods.energy.corruptions import build_corruption


def _batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(3, 1, 14, 14, generator=g, dtype=dtype)
    corrupted = clean.clone()
    corrupted[:, :, :7] = 0.0  # mask the top half
    return clean, corrupted


def _finite_difference(model, param, index, clean, corrupted, eps=1e-6, steps=2):
    """Central difference of the stop-gradient objective: each step starts from the input
    the unperturbed model produced, and only the step itself sees the perturbed parameter."""
    starts = [corrupted, *model.restore(corrupted, steps)[:-1]]

    def loss() -> float:
        return sum(torch.nn.functional.mse_loss(x - model.alpha * model.energy_grad(x), clean).item() for x in starts)

    with torch.no_grad():
        original = param[index].item()
        param[index] = original + eps
        plus = loss()
        param[index] = original - eps
        minus = loss()
        param[index] = original
    return (plus - minus) / (2 * eps)


def _probe_indices(param, count=4):
    g = torch.Generator().manual_seed(0)
    flat = torch.randint(0, param.numel(), (count,), generator=g)
    return [tuple(int(i) for i in idx) for idx in zip(*torch.unravel_index(flat, param.shape), strict=True)]


@pytest.mark.parametrize(
    "name", ["backbone.patch_embed.proj.weight", "backbone.blocks.0.attn.qkv.weight", "head.weight"]
)
def test_parameter_gradient_matches_finite_differences(vit64, name):
    clean, corrupted = _batch()
    param = dict(vit64.named_parameters())[name]
    vit64.zero_grad()
    vit64(clean, corrupted).loss.backward()
    assert param.grad is not None and param.grad.abs().max() > 0, "no gradient reached " + name
    for index in _probe_indices(param):
        numeric = _finite_difference(vit64, param, index, clean, corrupted)
        analytic = param.grad[index].item()
        rel = abs(analytic - numeric) / max(abs(numeric), 1e-8)
        assert rel < 1e-4, f"{name}{index}: analytic {analytic} vs numeric {numeric}"


def test_alpha_gradient_matches_finite_differences(vit64):
    clean, corrupted = _batch()
    vit64.zero_grad()
    vit64(clean, corrupted).loss.backward()
    numeric = _finite_difference(vit64, vit64.log_alpha, (), clean, corrupted)
    assert abs(vit64.log_alpha.grad.item() - numeric) / abs(numeric) < 1e-4


def test_without_create_graph_the_first_layer_gets_no_true_gradient(vit64):
    """The bug this guards against: dE/dx taken without create_graph is a constant for autograd,
    so the first layer's gradient is missing and disagrees with finite differences."""
    clean, corrupted = _batch()
    param = vit64.backbone.patch_embed.proj.weight
    vit64.zero_grad()
    restored = vit64.restore(corrupted, steps=2, create_graph=False)
    loss = sum(torch.nn.functional.mse_loss(x, clean) for x in restored)
    loss.backward()
    index = _probe_indices(param, 1)[0]
    numeric = _finite_difference(vit64, param, index, clean, corrupted)
    analytic = 0.0 if param.grad is None else param.grad[index].item()
    assert abs(numeric) > 1e-6
    assert abs(analytic - numeric) / abs(numeric) > 1e-2


def test_restore_steps_change_the_input_and_move_downhill():
    model = tiny_vit()
    clean, corrupted = _batch(torch.float32)
    restored = model.restore(corrupted, steps=3)
    assert len(restored) == 3
    assert not any(torch.equal(a, b) for a, b in zip([corrupted, *restored], restored, strict=False))
    # a small step along -dE/dx lowers the energy
    model.log_alpha.data.fill_(-8.0)
    small = model.restore(corrupted, steps=1)[0]
    assert model.energy(small).sum() < model.energy(corrupted).sum()
    assert all(not x.requires_grad for x in model(clean, corrupted).steps)


def test_batchnorm_energy_is_per_image():
    torch.manual_seed(0)
    model = EnergyModel(create_backbone("essl_resnet_tiny", in_chans=1)).train()
    x = torch.randn(4, 1, 28, 28)
    other = x.clone()
    other[1:] = torch.randn(3, 1, 28, 28)
    grad_a = model.restore(x, steps=1)[0][0]
    grad_b = model.restore(other, steps=1)[0][0]
    torch.testing.assert_close(grad_a, grad_b)
    assert model.backbone.bn1.training, "BatchNorm must be back in train mode after restoring"


def test_unreached_parameters_are_frozen():
    model = tiny_vit()
    method = EnergyMethod.around(model, "grid_mask")
    dead = freeze_unreached_parameters(method, [torch.randn(2, 1, 14, 14)])
    assert dead == ["model.backbone.norm.bias"]
    assert not model.backbone.norm.bias.requires_grad and model.backbone.norm.weight.requires_grad


def test_energy_shape_and_positive_alpha():
    model = tiny_vit()
    assert model.energy(torch.randn(5, 1, 14, 14)).shape == (5,)
    model.log_alpha.data.fill_(-50.0)
    assert model.alpha.item() > 0
    with pytest.raises(ValueError):
        EnergyModel(model.backbone, alpha_init=0.0)


def test_convnext_starts_with_a_usable_input_gradient_on_masked_images():
    """Masked pixels are 0: a zero-bias convolution before a LayerNorm made dE/dx about 1e9."""
    torch.manual_seed(0)
    model = EnergyModel(create_backbone("essl_convnext_tiny", in_chans=1), head_init_std=10.0)
    images = torch.randn(8, 1, 28, 28)
    masked = build_corruption("grid_mask", {}, in_chans=1)(images, torch.Generator().manual_seed(0))
    assert model.energy_grad(masked).pow(2).mean().sqrt() < 100


def test_batchnorm_is_primed_with_the_datas_statistics_before_alpha_is_sized():
    torch.manual_seed(0)
    model = EnergyModel(create_backbone("essl_resnet_tiny", in_chans=1))
    images = 3.0 + 2.0 * torch.randn(16, 1, 28, 28)
    model.prime_batchnorm(images)
    first = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert first.momentum == 0.1 and not torch.allclose(first.running_var, torch.ones_like(first.running_var))
