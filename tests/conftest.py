import sys

import pytest
import torch

from energyssl import EnergyModel, create_backbone

# Two processes on a free port (torchrun's standalone rendezvous): tests may run side by side.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def tiny_vit(dtype: torch.dtype = torch.float32) -> EnergyModel:
    """One-block ViT of width 32 on 14 px grey images (4 patches): fast enough for finite differences."""
    torch.manual_seed(0)
    backbone = create_backbone("essl_vit_micro_patch7", img_size=14, in_chans=1, patch_size=7)
    return EnergyModel(backbone).to(dtype)


def assert_ema_step(method: torch.nn.Module, teacher: torch.nn.Module, student: torch.nn.Module, momentum: float):
    """The teacher ViT starts as a frozen copy of the student; once the student has moved, one
    ``after_step`` at progress 0 puts it at ``momentum * teacher + (1 - momentum) * student``."""
    target, source = teacher.blocks[0].mlp.fc1.weight, student.blocks[0].mlp.fc1.weight
    assert not target.requires_grad and torch.equal(target, source)
    with torch.no_grad():
        source.add_(1.0)
    before = target.clone()
    method.after_step(0.0)
    torch.testing.assert_close(target, momentum * before + (1 - momentum) * source)


@pytest.fixture
def vit64() -> EnergyModel:
    return tiny_vit(torch.float64)
