"""Backbones by name: any timm model, plus CPU-sized presets registered with timm.

Presets are registered in timm's registry when energyssl is imported, so an exported
backbone loads with ``timm.create_model(name, num_classes=N)`` like any timm model.
"""

from __future__ import annotations

from typing import Any

import timm
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXt
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .errors import UserError

PRESETS = (
    "essl_vit_tiny_patch4",
    "essl_vit_mini_patch7",
    "essl_vit_micro_patch7",
    "essl_resnet_tiny",
    "essl_convnext_tiny",
)
# timm reads a module's `default_cfgs` at registration; no pretrained weights exist for presets.
default_cfgs = generate_default_cfgs(
    {name: {"num_classes": 0, "input_size": (1, 28, 28), "mean": (0.5,), "std": (0.5,)} for name in PRESETS}
)


def _register_preset(name: str, model_cls: type[nn.Module], **defaults: Any) -> None:
    """Register ``name`` in timm's registry, built by timm's own ``build_model_with_cfg``."""

    def factory(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if model_cls is not VisionTransformer:
            kwargs.pop("img_size", None)  # convolutional: any input size works
        return build_model_with_cfg(model_cls, name, pretrained=False, **{**defaults, **kwargs})

    factory.__name__ = name
    factory.__doc__ = f"CPU-sized {model_cls.__name__} preset: {defaults}."
    register_model(factory)


# ViTs for 28-32 px images. "patch4" gives a 7x7 grid on 28 px, "patch7" a 4x4 grid.
_register_preset(
    "essl_vit_tiny_patch4",
    VisionTransformer,
    img_size=28,
    patch_size=4,
    embed_dim=192,
    depth=6,
    num_heads=3,
    in_chans=1,
)
_register_preset(
    "essl_vit_mini_patch7",
    VisionTransformer,
    img_size=28,
    patch_size=7,
    embed_dim=128,
    depth=4,
    num_heads=4,
    in_chans=1,
)
_register_preset(
    "essl_vit_micro_patch7",
    VisionTransformer,
    img_size=28,
    patch_size=7,
    embed_dim=32,
    depth=1,
    num_heads=2,
    in_chans=1,
)
# A ResNet with one BasicBlock per stage and a 3x3 stem without max-pool (small images).
_register_preset(
    "essl_resnet_tiny",
    ResNet,
    block=BasicBlock,
    layers=(1, 1, 1, 1),
    stem_width=32,
    stem_type="deep",
    in_chans=1,
    channels=(32, 64, 128, 256),
)
# A stem of patch 1 so four stages fit a 28 px image (28 -> 28 -> 14 -> 7 -> 3).
_register_preset("essl_convnext_tiny", ConvNeXt, depths=(1, 1, 2, 1), dims=(24, 48, 96, 192), patch_size=1, in_chans=1)


def create_backbone(
    name: str,
    *,
    img_size: int | None = None,
    in_chans: int | None = None,
    patch_size: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A timm model without classifier (``num_classes=0``): its forward returns pooled features.

    ``img_size`` and ``patch_size`` are passed only to models that take them (ViTs and
    other token models); convolutional models accept any size.
    """
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f" Similar: {', '.join(close)}." if close else ""
        raise UserError(f"unknown model '{name}'. Presets: {', '.join(PRESETS)}.{hint}")
    overrides = {"num_classes": 0, **backbone_kwargs(name, img_size, in_chans, patch_size), **kwargs}
    try:
        return timm.create_model(name, pretrained=False, **overrides)
    except TypeError as exc:
        raise UserError(f"model '{name}' rejected its arguments {sorted(overrides)}: {exc}") from exc


def _takes_argument(name: str, key: str) -> bool:
    """Whether timm's model ``name`` understands ``key`` (token models do, CNNs mostly do not)."""
    if name.startswith("essl_resnet") or name.startswith("essl_convnext"):
        return False
    arch = name.split("_")[0]
    return arch in {
        "essl",
        "vit",
        "deit",
        "deit3",
        "beit",
        "eva",
        "swin",
        "swinv2",
        "cait",
        "xcit",
        "flexivit",
    } or (key == "img_size" and arch in {"maxvit", "coatnet", "mvitv2"})


def backbone_kwargs(name: str, img_size: int | None, in_chans: int | None, patch_size: int | None) -> dict[str, Any]:
    """The size arguments ``name`` understands; saved with exported weights to rebuild it."""
    out: dict[str, Any] = {}
    if in_chans is not None:
        out["in_chans"] = in_chans
    for key, value in (("img_size", img_size), ("patch_size", patch_size)):
        if value is not None and _takes_argument(name, key):
            out[key] = value
    return out
