"""Setup shared by fine-tuning and probing: labeled data, the subset, the results record."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ..config import EvalConfig, save_yaml
from ..data import DataInfo, ImageFolderDataset, load_dataset
from ..distributed import World, resolve_device, seed_everything
from .backbone import Initialisation, build_classifier
from .results import balanced_subset, dataset_labels


@dataclass
class EvalData:
    train: Dataset  # the labeled subset, untransformed
    test: Dataset
    info: DataInfo
    img_size: int
    subset: np.ndarray  # indices of the labeled subset in the full training split


def load_eval_data(cfg: EvalConfig, out: Path) -> EvalData:
    """Training split reduced to a class-balanced ``label_fraction`` (indices saved in
    ``labeled_subset.json``), and the test split."""
    train = load_dataset(cfg.data, train=True, val_fraction=cfg.val_fraction)
    test = load_dataset(cfg.data, train=False, val_fraction=cfg.val_fraction)
    labels = dataset_labels(train)
    dataset_labels(test)
    subset = balanced_subset(labels, cfg.label_fraction, cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "labeled_subset.json").write_text(
        json.dumps({"label_fraction": cfg.label_fraction, "seed": cfg.seed, "indices": subset.tolist()})
    )
    info = train.info
    if isinstance(test, ImageFolderDataset):
        print(f"test split: {test.split} ({len(test)} images)")
    return EvalData(Subset(train, subset.tolist()), test, info, cfg.img_size or info.img_size, subset)


@dataclass
class EvalSetup:
    """Everything a downstream command starts from."""

    out: Path
    device: torch.device
    data: EvalData
    model: nn.Module
    model_name: str
    init: Initialisation
    started: float


def prepare(cfg: EvalConfig, **model_args: Any) -> EvalSetup:
    """Seed, load the labeled data, build the classifier from ``--init`` and save the config."""
    started = time.perf_counter()
    out = Path(cfg.out)
    device = resolve_device(cfg.device, World())
    seed_everything(cfg.seed)
    data = load_eval_data(cfg, out)
    model, name, init = build_classifier(
        cfg.init, cfg.model, data.info.num_classes, data.info.in_chans, data.img_size, cfg.patch_size, **model_args
    )
    save_yaml(cfg, out / "config.yaml")
    return EvalSetup(out, device, data, model.to(device), name, init, started)


def results_record(cfg: EvalConfig, setup: EvalSetup, protocol: str, metrics: dict[str, Any], labeled: int) -> dict:
    """The content of results.json."""
    return {
        "protocol": protocol,
        "model": setup.model_name,
        "dataset": cfg.data,
        "label_fraction": cfg.label_fraction,
        "labeled_images": labeled,
        "test_split": getattr(setup.data.test, "split", cfg.data),
        "seed": cfg.seed,
        "metrics": metrics,
        "wall_time_s": time.perf_counter() - setup.started,
        "checkpoint": setup.init.path,
        "checkpoint_sha256": setup.init.sha256,
        "loaded_tensors": setup.init.loaded_tensors,
        "config": cfg.to_dict(),
    }
