"""Pretraining methods behind one interface (:mod:`.base`), named for ``--method``.

Adding a method is a file here with a :class:`~.base.Method` subclass, its test, and one line
in ``REGISTRY``.
"""

from __future__ import annotations

import importlib
from dataclasses import fields
from typing import Any

from torch import nn

from ..config import check_types
from ..errors import UserError
from .base import BuildContext, Method, StepOutput

REGISTRY = {
    "energy": "energy:EnergyMethod",
    "mae": "mae:MAE",
    "ae": "ae:AutoencoderTask",
    "cae": "cae:CAE",
    "mocov3": "mocov3:MoCoV3",
    "dino": "dino:DINO",
    "ijepa": "ijepa:IJEPA",
}
METHODS = tuple(REGISTRY)

__all__ = ["METHODS", "REGISTRY", "BuildContext", "Method", "StepOutput", "build_method", "method_class", "method_for"]


def method_class(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise UserError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def method_options(name: str, options: dict[str, Any]) -> Any:
    """``options`` as the method's ``Options`` dataclass: an unknown key or a value of the wrong
    type is one error line naming the valid keys."""
    cls = method_class(name).Options
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        valid = ", ".join(known) if known else "none"
        raise UserError(f"unknown option(s) for {name}: {', '.join(unknown)} (valid: {valid})")
    parsed = cls(**options)
    try:
        check_types(parsed)
    except UserError as exc:
        raise UserError(f"--method-options for {name}: {exc}".replace("config key", "option")) from exc
    return parsed


def build_method(name: str, backbone: nn.Module, context: BuildContext) -> Method:
    return method_class(name).build(backbone, context, method_options(name, context.cfg.method_options))


def method_for(
    name: str, backbone: nn.Module, in_chans: int = 1, mean=(0.5,), std=(0.5,), input_scale: Any = None, **cfg: Any
) -> Method:
    """``name`` around ``backbone`` outside a run (tests, benchmarks): ``cfg`` sets
    :class:`~energyssl.config.PretrainConfig` keys (``task``, ``steps``, ``grad_mode``, ...)."""
    from ..config import PretrainConfig
    from ..data import DataInfo

    info = DataInfo(in_chans, 0, tuple(mean), tuple(std), 0)
    config = PretrainConfig(method=name, **cfg)
    grad_mode = "exact" if config.grad_mode == "auto" else config.grad_mode
    return build_method(name, backbone, BuildContext(config, info, grad_mode, input_scale))
