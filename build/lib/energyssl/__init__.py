"""energyssl: energy-inspired self-supervised pretraining for any timm vision backbone."""

from . import models as _models  # noqa: F401 -- registers the CPU-sized presets with timm
from .methods.energy import EnergyModel
from .methods.energy.corruptions import build_corruption
from .models import create_backbone

__version__ = "0.1.0"
__all__ = ["EnergyModel", "build_corruption", "create_backbone", "__version__"]
