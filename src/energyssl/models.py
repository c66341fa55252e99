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

DEFAULT_MODEL = "essl_vit_mini_patch7"
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


def enable_grad_checkpointing(model: nn.Module, name: str) -> None:
    """timm's activation checkpointing of the blocks (non-reentrant, its default): memory for a
    second forward pass in the backward; one clear error where the model has none."""
    try:
        model.set_grad_checkpointing(True)
    except (AttributeError, AssertionError, NotImplementedError) as exc:
        raise UserError(f"{name} has no gradient checkpointing in timm; leave --grad-checkpointing off") from exc


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
        model = timm.create_model(name, pretrained=False, **overrides)
    except TypeError as exc:
        raise UserError(f"model '{name}' rejected its arguments {sorted(overrides)}: {exc}") from exc
    if img_size is not None:
        check_patch_grid(model, name, img_size)
    return model


def check_patch_grid(model: nn.Module, name: str, img_size: int) -> None:
    """Refuse an image size the patch size does not divide: a ViT would silently never see the
    last rows and columns, and patch-based methods could not cut the image into patches."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        return
    patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
    if img_size % patch:
        fits = [p for p in range(2, min(img_size, 32) + 1) if img_size % p == 0]
        hint = f"--patch-size {min(fits, key=lambda p: abs(p - patch))} or " if fits else ""
        raise UserError(
            f"image size {img_size} is not a multiple of {name}'s patch size {patch}: "
            f"use {hint}--img-size {max(patch, img_size // patch * patch)}"
        )


def default_patch_size(name: str, img_size: int, announce: bool = True) -> int | None:
    """The default model's patch 7 suits 28 px images; for a size 7 does not divide it keeps the
    same 4 x 4 grid where that is exact (32 px: patch 8). None: keep the model's own."""
    if name != DEFAULT_MODEL or img_size % 7 == 0 or img_size % 4:
        return None
    patch = img_size // 4
    if announce:
        print(f"note: {name} takes patch size {patch} for {img_size} px images (a 4 x 4 grid; --patch-size overrides)")
    return patch


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
