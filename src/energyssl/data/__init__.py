"""Data: datasets by ``--data`` spec (:mod:`.datasets`), seeded augmentation and its sampler
(:mod:`.sampling`), and every image transform (:mod:`.transforms`)."""

from .datasets import (
    HELD_OUT_FRACTION,
    ArrayDataset,
    DataInfo,
    ImageFolderDataset,
    load_dataset,
    load_held_out,
)
from .sampling import EpochSampler, SeededAugmentation, TransformedDataset, skip_batches
from .transforms import byol_view, eval_transform, finetune_transform, pretrain_transform

__all__ = [
    "HELD_OUT_FRACTION", "ArrayDataset", "DataInfo", "EpochSampler", "ImageFolderDataset", "SeededAugmentation",
    "TransformedDataset", "byol_view", "eval_transform", "finetune_transform", "load_dataset", "load_held_out",
    "pretrain_transform", "skip_batches",
]  # fmt: skip
