"""Training compute counted in FLOPs, so that budgets do not depend on a machine's speed.

Counts use ``torch.utils.flop_counter``'s formulas (matrix products, convolutions, attention;
elementwise ops count zero, as in the field's FLOP tables) for every op dispatched: forward,
backward, and the energy method's double backward or its finite-difference passes alike.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from .config import PretrainConfig
from .data import load_dataset
from .distributed import World
from .engine import accumulated_step
from .models import create_backbone, default_patch_size


class FlopCount(TorchDispatchMode):
    """Sums the FLOP formulas over every op dispatched. (FlopCounterMode itself tracks modules
    with backward hooks, which ``autograd.grad`` on an input refuses.)"""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func._overloadpacket in flop_registry:
            self.total += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        return out


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn``."""
    with FlopCount() as counter:
        fn()
    return counter.total


def pretrain_step_flops(cfg: PretrainConfig, device: torch.device | None = None) -> int:
    """FLOPs of one training step of the run ``cfg`` describes (its model, method, task, K,
    gradient mode and batch), counted on a batch of its own data. The model is built as the
    run would build it; nothing is saved."""
    from .pretrain import example_views, setup_model, training_data  # keep this module light to import

    cfg = copy.deepcopy(cfg)
    device = device or torch.device("cpu")
    dataset = load_dataset(cfg.data, train=True, val_fraction=cfg.val_fraction)
    img_size = cfg.img_size or dataset.info.img_size
    train_set, _, _ = training_data(cfg, dataset, dataset.info, img_size, World(), device)
    batch = example_views(train_set, device, cfg.batch_size)
    setup = setup_model(cfg, dataset.info, img_size, [view[:8] for view in batch], device, World())
    optimizer = torch.optim.AdamW([p for p in setup.method.parameters() if p.requires_grad], lr=0.0)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    step = lambda: accumulated_step(setup.method, [(batch, generator)], optimizer, setup.precision, None, World(), 0)  # noqa: E731
    return count_flops(step) * cfg.accum_iter  # a step is accum_iter micro-batches


def supervised_step_flops(
    model: str, img_size: int, in_chans: int, batch_size: int, classes: int, patch_size: int | None = None
) -> int:
    """FLOPs of one supervised step (forward and backward of the classifier): the unit budgets
    are counted in ("supervised epochs")."""
    patch_size = patch_size or default_patch_size(model, img_size, announce=False)
    net = create_backbone(model, img_size=img_size, in_chans=in_chans, patch_size=patch_size)
    net.reset_classifier(classes)
    images = torch.randn(batch_size, in_chans, img_size, img_size)
    labels = torch.randint(0, classes, (batch_size,))
    return count_flops(lambda: F.cross_entropy(net(images), labels).backward())
