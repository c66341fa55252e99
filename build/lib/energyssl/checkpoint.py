"""Checkpoints: weights in safetensors, training state (optimizer, step, RNG) beside
them, both written atomically into ``checkpoint-STEP/`` and published by rewriting
the one-line pointer file ``latest`` (temp file + rename), so a killed run never
leaves a half-written checkpoint behind the pointer.

Exported backbones are plain timm state dicts (``backbone.safetensors``) with the
model name and size arguments in the file's metadata.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .errors import UserError

LATEST = "latest"
WEIGHTS = "model.safetensors"
STATE = "training_state.pt"
BACKBONE = "backbone.safetensors"


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)``, then rename onto ``path`` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _state_dict_for_save(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_checkpoint(
    out: Path, model: nn.Module, training_state: dict[str, Any], metadata: dict[str, str], keep: int = 2
) -> Path:
    """Write ``out/checkpoint-STEP`` and point ``out/latest`` at it; keep the newest ``keep``."""
    step = int(training_state["step"])
    folder = out / f"checkpoint-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    meta = {**metadata, "step": str(step)}
    atomic_write(folder / WEIGHTS, lambda p: save_file(_state_dict_for_save(model), str(p), metadata=meta))
    atomic_write(folder / STATE, lambda p: torch.save(training_state, p))
    atomic_write(out / LATEST, lambda p: p.write_text(folder.name + "\n"))
    old = sorted(out.glob("checkpoint-*"))[:-keep]
    for stale in old:
        if stale != folder:
            shutil.rmtree(stale, ignore_errors=True)
    return folder


def find_checkpoint(path: Path) -> Path:
    """A checkpoint folder from a run folder (via ``latest``) or the folder itself."""
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not (path / WEIGHTS).is_file():
        raise UserError(f"no checkpoint found at {path} (expected {WEIGHTS} or a '{LATEST}' file)")
    return path


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise UserError(f"cannot read checkpoint {path}: {exc}") from exc


def load_weights(model: nn.Module, path: Path, expect: dict[str, str] | None = None) -> dict[str, str]:
    """Load safetensors weights into ``model``; any mismatch is a clear error naming it."""
    metadata = read_metadata(path)
    for key, value in (expect or {}).items():
        if key in metadata and metadata[key] != value:
            raise UserError(f"checkpoint {path} was made with {key}={metadata[key]}, this run uses {key}={value}")
    state = load_file(str(path))
    problem = describe_mismatch(model.state_dict(), state)
    if problem:
        raise UserError(f"checkpoint {path} does not match the model: {problem}")
    model.load_state_dict(state)
    return metadata


def describe_mismatch(
    own: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], ignore: frozenset[str] | set[str] = frozenset()
) -> str:
    """What differs between a model's state dict and saved tensors ('' when they fit)."""
    missing = sorted(set(own) - set(saved) - ignore)
    unexpected = sorted(set(saved) - set(own) - ignore)
    mismatched = sorted(k for k in (set(own) & set(saved)) - ignore if own[k].shape != saved[k].shape)
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} tensor(s) e.g. {missing[:3]}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} tensor(s) e.g. {unexpected[:3]}")
    if mismatched:
        k = mismatched[0]
        shapes = f"{tuple(saved[k].shape)} saved vs {tuple(own[k].shape)} in the model"
        parts.append(f"{len(mismatched)} shape mismatch(es) e.g. {k}: {shapes}")
    return "; ".join(parts)


def load_training_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / STATE, map_location="cpu", weights_only=True)


def export_backbone(path: Path, backbone: nn.Module, model_name: str, model_kwargs: dict[str, Any]) -> None:
    """Save the backbone alone as a timm state dict: ``timm.create_model(name, num_classes=N,
    **kwargs).load_state_dict(load_file(path), strict=False)`` restores it (the head is new)."""
    metadata = {"model": model_name, "model_kwargs": json.dumps(model_kwargs), "format": "timm"}
    atomic_write(path, lambda p: save_file(_state_dict_for_save(backbone), str(p), metadata=metadata))
