"""Setup shared by fine-tuning and probing: labeled data, the subset, the results record."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset

from ..config import EvalConfig
from ..data import DataInfo, load_dataset
from .backbone import Initialisation
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
    train = load_dataset(cfg.data, train=True)
    test = load_dataset(cfg.data, train=False)
    labels = dataset_labels(train)
    dataset_labels(test)
    subset = balanced_subset(labels, cfg.label_fraction, cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "labeled_subset.json").write_text(
        json.dumps({"label_fraction": cfg.label_fraction, "seed": cfg.seed, "indices": subset.tolist()})
    )
    info = train.info
    return EvalData(Subset(train, subset.tolist()), test, info, cfg.img_size or info.img_size, subset)


def results_record(
    cfg: EvalConfig,
    protocol: str,
    model_name: str,
    init: Initialisation,
    metrics: dict[str, Any],
    seconds: float,
    labeled: int,
) -> dict[str, Any]:
    return {
        "protocol": protocol,
        "model": model_name,
        "dataset": cfg.data,
        "label_fraction": cfg.label_fraction,
        "labeled_images": labeled,
        "seed": cfg.seed,
        "metrics": metrics,
        "wall_time_s": seconds,
        "checkpoint": init.path,
        "checkpoint_sha256": init.sha256,
        "loaded_tensors": init.loaded_tensors,
        "config": cfg.to_dict(),
    }
