"""FLOP counting: hand-computed products, backward and double backward counted, budgets per step."""

import pytest
import torch
from torch import nn

from energyssl.config import PretrainConfig
from energyssl.flops import count_flops, pretrain_step_flops, supervised_step_flops


def test_a_matrix_product_is_two_flops_per_multiply_add():
    a, b = torch.randn(3, 5), torch.randn(5, 7)
    assert count_flops(lambda: a @ b) == 2 * 3 * 5 * 7


def test_backward_counts_the_input_and_weight_gradients():
    layer, x = nn.Linear(5, 7), torch.randn(3, 5, requires_grad=True)
    forward = 2 * 3 * 5 * 7
    assert count_flops(lambda: layer(x).sum().backward()) == 3 * forward  # forward, dL/dx, dL/dW


def test_double_backward_is_counted():
    """dE/dx of a two-layer energy, then the loss of a step on x backpropagated to the weights:
    more products than one forward and backward of the same network."""
    energy, x = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1)), torch.randn(3, 5, requires_grad=True)

    def step() -> None:
        (grad,) = torch.autograd.grad(energy(x).sum(), x, create_graph=True)
        (x - 0.1 * grad).pow(2).sum().backward()

    assert count_flops(step) > 1.5 * count_flops(lambda: energy(x).sum().backward())


@pytest.mark.parametrize("grad_mode", ["exact", "fast"])
def test_step_flops_grow_with_k_and_the_energy_costs_more_than_a_supervised_step(grad_mode):
    base = dict(model="essl_vit_micro_patch7", batch_size=8)
    options = dict(grad_mode=grad_mode, task="grid_mask")
    supervised = supervised_step_flops("essl_vit_micro_patch7", 28, 1, 8, 10)
    one, two = (pretrain_step_flops(PretrainConfig(**base, method_options={**options, "steps": k})) for k in (1, 2))
    assert 1.8 < two / one < 2.2  # each restoration step costs the same
    assert one > supervised  # the second-order (or finite-difference) passes are in
    mae = pretrain_step_flops(PretrainConfig(model="essl_vit_micro_patch7", batch_size=8, method="mae"))
    assert 0 < mae < one
