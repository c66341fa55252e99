import pytest
import torch

from energyssl import EnergyModel, create_backbone


def tiny_vit(dtype: torch.dtype = torch.float32) -> EnergyModel:
    """One-block ViT of width 32 on 14 px grey images (4 patches): fast enough for finite differences."""
    torch.manual_seed(0)
    backbone = create_backbone("essl_vit_micro_patch7", img_size=14, in_chans=1, patch_size=7)
    return EnergyModel(backbone).to(dtype)


@pytest.fixture
def vit64() -> EnergyModel:
    return tiny_vit(torch.float64)
