"""Baselines trained in the same harness as the energy method: MAE, AE + task, CAE.

Each is an ``nn.Module`` with a ``backbone`` (the timm ViT that is exported and fine-tuned)
plus auxiliary parts (decoder, regressor) dropped on export, and a
``forward(images, generator, steps, grad_scale) -> Restoration`` like the energy objective.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import UserError

METHODS = ("energy", "mae", "ae", "cae")


def build_baseline(
    method: str,
    backbone: nn.Module,
    task: str,
    params: dict[str, Any],
    options: dict[str, Any],
    in_chans: int,
    mean,
    std,
) -> nn.Module:
    """The baseline ``method`` around ``backbone``; ``params`` are the corruption parameters
    (for AE + task), ``options`` the method's own (mask ratio, decoder depth, ...)."""
    from .ae import AutoencoderTask
    from .cae import CAE
    from .mae import MAE

    classes = {"mae": MAE, "ae": AutoencoderTask, "cae": CAE}
    if method not in classes:
        raise UserError(f"unknown method '{method}'; choose one of: {', '.join(METHODS)}")
    cls = classes[method]
    try:
        if method == "ae":
            return cls(backbone, task, params, in_chans, mean, std, **options)
        return cls(backbone, **options)
    except TypeError as exc:
        raise UserError(f"bad method option for {method}: {exc}") from exc
