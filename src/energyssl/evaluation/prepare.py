"""Setup shared by fine-tuning and probing: labeled data, the subset, the results record."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ..config import EvalConfig, save_yaml
from ..data import DataInfo, load_dataset
from ..distributed import World, resolve_device, seed_everything
from ..errors import UserError
from .backbone import Initialisation, build_classifier
from .results import balanced_subset, dataset_labels

VAL_SEED = 0  # the validation split never moves with --seed: every run is chosen on the same images
EVAL_SPLITS = ("val", "test")
MAIN = World()  # a plain python run: one process


@dataclass
class EvalData:
    train: Dataset  # the labeled subset, untransformed
    scored: Dataset  # the split the metrics come from: validation or test
    scored_name: str
    info: DataInfo
    img_size: int
    subset: np.ndarray  # indices of the labeled subset in the full training split
    val: np.ndarray  # indices of the validation split in the full training split


def validation_split(labels: np.ndarray, size: float) -> tuple[np.ndarray, np.ndarray]:
    """(validation, rest): a fixed class-balanced share of the training labels, and the others.
    Labeled subsets are drawn from the rest, so no image chosen on is ever trained on."""
    if size == 0:
        return np.array([], dtype=np.int64), np.arange(len(labels))
    val = balanced_subset(labels, size, VAL_SEED)
    return val, np.setdiff1d(np.arange(len(labels)), val)


def labeled_subset(labels: np.ndarray, rest: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """``fraction`` of all training labels (so 1% means the same count with or without a
    validation split), drawn class-balanced from ``rest``."""
    share = min(1.0, fraction * len(labels) / len(rest))
    return rest[balanced_subset(labels[rest], share, seed)]


def load_eval_data(
    cfg: EvalConfig,
    out: Path,
    world: World = MAIN,
    source: Callable[[bool], Dataset] | None = None,
    labels_of: Callable[[Dataset], np.ndarray] = dataset_labels,
) -> EvalData:
    """The labeled subset (indices saved in ``labeled_subset.json``) and the split to score:
    the validation split carved from the training labels, or the test split. Every process
    draws the same subset (it depends on the seed only); the main one writes and says.
    ``source(train)`` gives a split (default: ``--data``'s classification set); subsets are
    balanced over the classes ``labels_of`` reads (one class for all: a uniform draw)."""
    if cfg.eval_split not in EVAL_SPLITS:
        raise UserError(f"eval_split must be val or test, got '{cfg.eval_split}'")
    if not 0 < cfg.label_fraction <= 1:
        raise UserError(f"label fraction must be in (0, 1] (a share of the training labels), got {cfg.label_fraction}")
    if not 0 <= cfg.val_size < 1 or (cfg.eval_split == "val" and cfg.val_size == 0):
        raise UserError(f"val_size must be in [0, 1) and above 0 with --eval-split val, got {cfg.val_size}")
    source = source or (lambda train: load_dataset(cfg.data, train=train, val_fraction=cfg.val_fraction))
    train = source(True)
    labels = labels_of(train)
    val, rest = validation_split(labels, cfg.val_size)
    subset = labeled_subset(labels, rest, cfg.label_fraction, cfg.seed)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "labeled_subset.json").write_text(
            json.dumps({"label_fraction": cfg.label_fraction, "seed": cfg.seed, "indices": subset.tolist()})
        )
    if cfg.eval_split == "val":
        scored: Dataset = Subset(train, val.tolist())
        of = "of each class of the training labels" if len(np.unique(labels)) > 1 else "of the training images"
        name = f"val: a fixed {cfg.val_size:.0%} {of}"
    else:
        scored = source(False)
        labels_of(scored)
        name = getattr(scored, "split", f"test split of {cfg.data}")
    if world.is_main:
        print(f"scored on {name} ({len(scored)} images)")
    img_size = cfg.img_size or train.info.img_size
    return EvalData(Subset(train, subset.tolist()), scored, name, train.info, img_size, subset, val)


@dataclass
class EvalSetup:
    """Everything a downstream command starts from."""

    out: Path
    device: torch.device
    world: World
    data: EvalData
    model: nn.Module
    model_name: str
    init: Initialisation
    started: float


def prepare(
    cfg: EvalConfig,
    world: World = MAIN,
    saved: EvalConfig | None = None,
    load: Callable[[EvalConfig, Path, World], EvalData] = load_eval_data,
    any_size: bool = False,
    **model_args: Any,
) -> EvalSetup:
    """Seed, load the labeled data (``load``), build the classifier from ``--init`` (alike on
    every process; ``any_size``: a ViT pretrained at another image size too) and save the config
    (``saved``, when the command's own config is another)."""
    started = time.perf_counter()
    out = Path(cfg.out)
    device = resolve_device(cfg.device, world)
    seed_everything(cfg.seed)
    data = load(cfg, out, world)
    model, name, init = build_classifier(
        cfg.init,
        cfg.model,
        data.info.num_classes,
        data.info.in_chans,
        data.img_size,
        cfg.patch_size,
        any_size,
        **model_args,
    )
    if world.is_main:
        save_yaml(saved or cfg, out / "config.yaml")
    return EvalSetup(out, device, world, data, model.to(device), name, init, started)


def results_record(cfg: EvalConfig, setup: EvalSetup, protocol: str, metrics: dict[str, Any], labeled: int) -> dict:
    """The content of results.json."""
    return {
        "protocol": protocol,
        "model": setup.model_name,
        "dataset": cfg.data,
        "label_fraction": cfg.label_fraction,
        "labeled_images": labeled,
        "classes": list(setup.data.info.classes),  # names in label order: the training split's
        "eval_split": setup.data.scored_name,
        "seed": cfg.seed,
        "metrics": metrics,
        "wall_time_s": time.perf_counter() - setup.started,
        "checkpoint": setup.init.path,
        "checkpoint_sha256": setup.init.sha256,
        "loaded_tensors": setup.init.loaded_tensors,
        "config": cfg.to_dict(),
    }
