"""The energy method (Wang et al., ICLR 2023), whole: a backbone plus a one-output head is an
energy E(x); a corrupted input is restored by K gradient steps ``x <- x - alpha dE/dx`` and the
loss is each step's distance to the clean input, so the forward pass is the encoder and the
backward pass the decoder.

Read in this order:

* :mod:`.method` -- :class:`EnergyMethod`, the method interface: options, precision, start, report;
* :mod:`.model` -- :class:`EnergyModel`: the energy, the restoration, exact and fast gradients;
* :mod:`.tasks` -- the pretext tasks, pixel corruptions and patch sorting alike, and their reports;
* :mod:`.corruptions`, :mod:`.sorting` -- the corruptions, and sorting's shuffles and regularisers;
* :mod:`.precision` -- fp16's scale for dE/dx, fast mode's float32, the ``--grad-mode auto`` rule;
* :mod:`.figures`, :mod:`.commands` -- restoration grids and energy histograms; ``restore`` and ``energy``.
"""

from .method import EnergyMethod, EnergyOptions
from .model import EnergyModel, Restoration
from .tasks import PretextTask, build_task

__all__ = ["EnergyMethod", "EnergyModel", "EnergyOptions", "PretextTask", "Restoration", "build_task"]
