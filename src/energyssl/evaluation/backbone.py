"""Build a classifier from a pretrained checkpoint (or from scratch) and check the load.

Accepted ``--init``: a pretraining run folder (its ``backbone.safetensors``, else its latest
checkpoint), a checkpoint folder, or a ``.safetensors`` file of either kind. Only the
classifier may be missing after the load; anything else is an error that names it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from ..checkpoint import BACKBONE, LATEST, WEIGHTS, describe_mismatch, find_checkpoint, read_metadata
from ..errors import UserError
from ..models import DEFAULT_MODEL, backbone_kwargs, create_backbone, default_patch_size

ENERGY_PREFIX = "backbone."


@dataclass
class Initialisation:
    """Where the weights came from, for results.json."""

    path: str | None
    sha256: str | None
    loaded_tensors: int


def resolve_init(init: str) -> Path:
    path = Path(init).expanduser()
    if path.is_dir():
        if (path / BACKBONE).is_file():
            return path / BACKBONE
        if (path / LATEST).is_file() or (path / WEIGHTS).is_file():
            return find_checkpoint(path) / WEIGHTS
        raise UserError(f"--init {init}: no {BACKBONE}, checkpoint or '{LATEST}' file in that folder")
    if path.is_file():
        return path
    raise UserError(f"--init {init}: no such file or folder")


def backbone_state(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The backbone's tensors (energy-model checkpoints lose their ``backbone.`` prefix and head)."""
    metadata = read_metadata(path)
    state = load_file(str(path))
    if metadata.get("format") != "timm":  # a full energy-model checkpoint
        state = {k[len(ENERGY_PREFIX) :]: v for k, v in state.items() if k.startswith(ENERGY_PREFIX)}
    if not state:
        raise UserError(f"{path} holds no backbone weights")
    return state, metadata


class Pixels(nn.Module):
    """The image itself as the feature: the floor a learned representation must beat
    (``probe --init pixels``)."""

    num_prefix_tokens = 0

    def forward_features(self, images: Tensor) -> Tensor:
        return images

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        return features.flatten(1)


def build_classifier(
    init: str,
    model_name: str | None,
    num_classes: int,
    in_chans: int,
    img_size: int,
    patch_size: int | None = None,
    any_size: bool = False,
    **model_args: Any,
) -> tuple[nn.Module, str, Initialisation]:
    """A timm classifier with ``num_classes`` outputs, initialised from ``init`` (or 'none'; or
    'pixels', no network at all, for probes). ``any_size``: a ViT pretrained at another image
    size is built at ``img_size``, its position embedding resampled (dense tasks' larger crops)."""
    if init == "pixels":
        return Pixels(), "pixels", Initialisation(None, None, 0)
    if init == "none":
        name = model_name or DEFAULT_MODEL
        patch_size = patch_size or default_patch_size(name, img_size)
        model = create_backbone(name, img_size=img_size, in_chans=in_chans, patch_size=patch_size, **model_args)
        model.reset_classifier(num_classes)
        return model, name, Initialisation(None, None, 0)

    path = resolve_init(init)
    state, metadata = backbone_state(path)
    saved_name = metadata.get("model")
    if model_name and saved_name and model_name != saved_name:
        raise UserError(f"checkpoint {path} is a {saved_name}, but --model is {model_name}")
    name = model_name or saved_name
    if not name:
        raise UserError(f"checkpoint {path} does not record its model; pass --model")
    saved_kwargs = json.loads(metadata["model_kwargs"]) if "model_kwargs" in metadata else {}
    if not saved_kwargs and "in_chans" in metadata:
        saved_patch = None if metadata.get("patch_size") in (None, "None") else int(metadata["patch_size"])
        saved_kwargs = backbone_kwargs(name, int(metadata["img_size"]), int(metadata["in_chans"]), saved_patch)
    kwargs = {**saved_kwargs, **backbone_kwargs(name, img_size, in_chans, patch_size)}
    differing = {k: (saved_kwargs[k], v) for k, v in kwargs.items()
                 if k in saved_kwargs and saved_kwargs[k] != v and not (any_size and k == "img_size")}  # fmt: skip
    if differing:
        detail = ", ".join(f"{k}: checkpoint {a} vs data {b}" for k, (a, b) in differing.items())
        raise UserError(f"checkpoint {path} does not fit this data ({detail})")
    model = create_backbone(name, **kwargs, **model_args)
    model.reset_classifier(num_classes)
    load_backbone_weights(model, fit_positions(state, model) if any_size else state, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return model, name, Initialisation(str(path), digest, len(state))


def fit_positions(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """A ViT's absolute position embedding resampled (timm's bicubic resampling) to the model's
    patch grid, when it was trained on another; any other state as it is."""
    saved, wanted = state.get("pos_embed"), model.state_dict().get("pos_embed")
    if saved is None or wanted is None or saved.shape == wanted.shape:
        return state
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    grid = list(model.patch_embed.grid_size)
    return {**state, "pos_embed": resample_abs_pos_embed(saved, grid, num_prefix_tokens=prefix)}


def classifier_keys(model: nn.Module) -> set[str]:
    head = model.get_classifier()
    prefix = next(name for name, module in model.named_modules() if module is head)
    return {f"{prefix}.{k}" for k in head.state_dict()}


def load_backbone_weights(model: nn.Module, state: dict[str, Any], path: Path) -> None:
    """Load every backbone tensor; only the new classifier may stay missing."""
    head = classifier_keys(model)
    problem = describe_mismatch(model.state_dict(), state, ignore=head)
    if problem:
        raise UserError(f"checkpoint {path} does not match the model: {problem}")
    model.load_state_dict({k: v for k, v in state.items() if k not in head}, strict=False)
