"""Pretraining methods behind one interface (:mod:`.base`), named for ``--method``.

Adding a method is a file here with a :class:`~.base.Method` subclass, its test, and one line
in ``REGISTRY``; the energy method, this project's own, is the package :mod:`.energy`.
"""

from __future__ import annotations

import importlib
from dataclasses import fields
from typing import Any

from torch import nn

from ..config import Flag, check_types, flags_of
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

__all__ = [
    "METHODS", "REGISTRY", "BuildContext", "Method", "StepOutput", "build_method", "method_class", "method_flags",
    "method_for", "method_options",
]  # fmt: skip


def method_class(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise UserError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def method_flags() -> list[Flag]:
    """The options that methods give as ``pretrain`` flags (``--task``, ``--steps``, ...), once
    each, their help naming the methods that take them."""
    flags: dict[str, Flag] = {}
    users: dict[str, list[str]] = {}
    for name in METHODS:
        for flag in flags_of(method_class(name).Options, marked_only=True):
            flags.setdefault(flag.name, flag)
            users.setdefault(flag.name, []).append(name)
    return [flag._replace(help=f"({', '.join(users[flag.name])}) {flag.help}") for flag in flags.values()]


def method_options(name: str, options: dict[str, Any]) -> Any:
    """``options`` as the method's ``Options`` dataclass: an unknown key or a value of the wrong
    type is one error line naming the valid keys. A flag of another method at its default (an
    older run's config.yaml records every flag) is dropped; set to anything else, it is refused."""
    cls = method_class(name).Options
    known = [f.name for f in fields(cls)]
    others = {flag.name: flag for flag in method_flags() if flag.name not in known}
    options = {k: v for k, v in options.items() if k not in others or v != others[k].default}
    refused = sorted(set(options) & set(others))
    if refused:
        flags = ", ".join("--" + key.replace("_", "-") for key in refused)
        verb = "does" if len(refused) == 1 else "do"
        raise UserError(f"{flags} {verb} not apply to {name}, whose options are: {', '.join(known) or 'none'}")
    unknown = sorted(set(options) - set(known))
    if unknown:
        valid = ", ".join(known) if known else "none"
        raise UserError(f"unknown option(s) for {name}: {', '.join(unknown)} (valid: {valid})")
    parsed = cls(**options)
    try:
        check_types(parsed)
        for ok, message in parsed.checks() if hasattr(parsed, "checks") else []:
            if not ok:
                raise UserError(message)
    except UserError as exc:
        raise UserError(f"{name}: {exc}".replace("config key", "option")) from exc
    return parsed


def build_method(name: str, backbone: nn.Module, context: BuildContext) -> Method:
    return method_class(name).build(backbone, context, method_options(name, context.cfg.method_options))


def method_for(name: str, backbone: nn.Module, in_chans: int = 1, mean=(0.5,), std=(0.5,), **settings: Any) -> Method:
    """``name`` around ``backbone`` outside a run (tests, benchmarks): ``settings`` are
    :class:`~energyssl.config.PretrainConfig` keys or the method's options (``task``, ``steps``,
    ``grad_mode``, ...). The method trains in float32."""
    from ..config import PretrainConfig
    from ..data import DataInfo

    info = DataInfo(in_chans, 0, tuple(mean), tuple(std), 0)
    own = {f.name for f in fields(PretrainConfig)}
    cfg = {k: v for k, v in settings.items() if k in own}
    options = {**cfg.pop("method_options", {}), **{k: v for k, v in settings.items() if k not in own}}
    config = PretrainConfig(method=name, method_options=options, **cfg)
    method = build_method(name, backbone, BuildContext(config, info))
    method.configure_precision("none", next(backbone.parameters()).device, {})
    return method
