"""``energyssl segment``: semantic segmentation on a pretrained (or random) backbone, the dense
transfer of the paper's ADE20K table. Two protocols, both run by the fine-tuning loop (so they
inherit torchrun, ``--accum-iter``, atomic checkpoints, exact ``--resume`` and Ctrl-C):

* ``linear`` -- DINOv2's linear segmentation probe: the frozen backbone's last patch features
  (its final norm applied), BatchNorm and a 1x1 convolution, upsampled bilinearly to the mask;
* ``upernet`` -- the paper's setting (BEiT's and MAE's): the backbone fine-tuned under a UPerNet
  decoder on four feature levels (a ViT's blocks at 1/4, 1/2, 3/4 and all of its depth, made
  multi-scale by deconvolutions and a max-pool; a CNN's last four stages), AdamW with layer-wise
  lr decay. mmsegmentation's auxiliary FCN head is left out; BatchNorm is per process (not synced).

Both score mIoU (classes absent from both truth and prediction left out, as mmsegmentation),
per-class IoU, pixel accuracy and mean class accuracy, on the original masks' pixels."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ..config import EvalConfig, FinetuneConfig, LoopConfig, SegmentConfig
from ..data.segmentation import IGNORE, Paired, collate_masks, eval_transform, load_segmentation, train_transform
from ..distributed import World
from ..errors import UserError
from .finetune import Route, finetune, layer_decay_optimizer
from .prepare import EvalData, load_eval_data

PROTOCOLS = ("linear", "upernet")


def feature_levels(backbone: nn.Module, count: int) -> list[int]:
    """Which of timm's feature taps (``feature_info``) to take: a ViT's blocks spread evenly over
    its depth (all at one stride), else the last ``count`` stages."""
    info = getattr(backbone, "feature_info", None)
    if not hasattr(backbone, "forward_intermediates") or not info:
        raise UserError(f"{type(backbone).__name__} has no forward_intermediates in timm: segment cannot tap it")
    if single_stride(backbone):
        return [max(0, round(len(info) * (k + 1) / count) - 1) for k in range(count)]
    if len(info) < count:
        raise UserError(f"{type(backbone).__name__} has {len(info)} feature stages; --protocol upernet needs {count}")
    return list(range(len(info) - count, len(info)))


def single_stride(backbone: nn.Module) -> bool:
    """A token model (a ViT): every block's map at the patch stride, no pyramid of its own."""
    return len({tap["reduction"] for tap in backbone.feature_info}) == 1


def tap(backbone: nn.Module, images: Tensor, levels: list[int], norm: bool) -> list[Tensor]:
    """The feature maps (N, C, H, W) at ``levels`` (a level may repeat for a shallow ViT)."""
    unique = sorted(set(levels))
    maps = backbone.forward_intermediates(images, indices=unique, norm=norm, intermediates_only=True)
    return [maps[unique.index(level)] for level in levels]


class LinearSegmenter(nn.Module):
    """The frozen backbone (kept in eval mode) under BatchNorm and a 1x1 classifier."""

    def __init__(self, classifier: nn.Module, classes: int) -> None:
        super().__init__()
        self.backbone = classifier.requires_grad_(False)
        self.levels = feature_levels(classifier, 1)
        channels = classifier.feature_info[self.levels[0]]["num_chs"]
        self.norm = nn.BatchNorm2d(channels)
        self.classifier = nn.Conv2d(channels, classes, 1)

    def train(self, mode: bool = True) -> LinearSegmenter:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            features = tap(self.backbone, images, self.levels, norm=True)[0]
        logits = self.classifier(self.norm(features.float()))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def rescalers(channels: int) -> nn.ModuleList:
    """A ViT's single-stride maps made a pyramid (x4, x2, x1, x1/2), as BEiT's and MAE's UperNet."""
    up = nn.ConvTranspose2d
    return nn.ModuleList([
        nn.Sequential(up(channels, channels, 2, 2), nn.BatchNorm2d(channels), nn.GELU(), up(channels, channels, 2, 2)),
        up(channels, channels, 2, 2),
        nn.Identity(),
        nn.MaxPool2d(2),
    ])  # fmt: skip


class UperNetHead(nn.Module):
    """UPerNet's decoder (Xiao et al. 2018, as mmsegmentation's UPerHead): a pyramid pooling
    module on the coarsest level, a top-down FPN over all of them, each output upsampled to the
    finest and fused by a 3x3 convolution."""

    def __init__(self, in_channels: list[int], channels: int, classes: int, pool_scales=(1, 2, 3, 6)) -> None:
        super().__init__()
        top = in_channels[-1]
        self.pools = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvNormAct(top, channels)) for s in pool_scales
        )
        self.bottleneck = ConvNormAct(top + len(pool_scales) * channels, channels, 3)
        self.lateral = nn.ModuleList(ConvNormAct(c, channels) for c in in_channels[:-1])
        self.smooth = nn.ModuleList(ConvNormAct(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = ConvNormAct(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(channels, classes, 1)

    def forward(self, features: list[Tensor]) -> Tensor:
        top = features[-1]
        pooled = [resize(pool(top), top.shape[-2:]) for pool in self.pools]
        levels = [conv(f) for conv, f in zip(self.lateral, features[:-1], strict=True)]
        levels.append(self.bottleneck(torch.cat([top, *pooled], 1)))
        for i in range(len(levels) - 1, 0, -1):  # top-down: each level gets the coarser one added
            levels[i - 1] = levels[i - 1] + resize(levels[i], levels[i - 1].shape[-2:])
        outputs = [conv(level) for conv, level in zip(self.smooth, levels[:-1], strict=True)] + levels[-1:]
        size = outputs[0].shape[-2:]
        fused = self.fuse(torch.cat([resize(out, size) for out in outputs], 1))
        return self.classifier(self.dropout(fused))


def resize(x: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
    return x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class UperNetSegmenter(nn.Module):
    """The backbone (fine-tuned) under :class:`UperNetHead`."""

    def __init__(self, classifier: nn.Module, classes: int, channels: int | None = None) -> None:
        super().__init__()
        self.backbone = classifier
        self.levels = feature_levels(classifier, 4)
        widths = [classifier.feature_info[level]["num_chs"] for level in self.levels]
        self.rescale = rescalers(widths[0]) if single_stride(classifier) else None
        self.decoder = UperNetHead(widths, channels or min(512, widths[-1]), classes)

    def forward(self, images: Tensor) -> Tensor:
        features = tap(self.backbone, images, self.levels, norm=False)
        if self.rescale is not None:
            features = [scale(f) for scale, f in zip(self.rescale, features, strict=True)]
        return resize(self.decoder(features), images.shape[-2:])


def upernet_optimizer(model: nn.Module, cfg: FinetuneConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW; the backbone's layers with timm's layer-wise decay (where it groups layers), the
    decoder at the full lr (its last group), as BEiT's and MAE's recipe."""
    backbone = model.backbone
    skip = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else set()
    if cfg.layer_decay < 1 and hasattr(backbone, "group_matcher"):
        groups = param_groups_layer_decay(backbone, cfg.weight_decay, skip, layer_decay=cfg.layer_decay)
    else:
        groups = param_groups_weight_decay(backbone, cfg.weight_decay, skip)
    head = nn.ModuleList([m for m in (model.rescale, model.decoder) if m is not None])
    return create_optimizer_v2([*groups, *param_groups_weight_decay(head, cfg.weight_decay)], "adamw", lr=lr)


@torch.no_grad()
def confusion_counts(model: nn.Module, loader: DataLoader, device: torch.device, classes: int) -> Tensor:
    """The (truth x prediction) pixel counts, flat, over every scored mask at its own size; pixels
    marked :data:`IGNORE` are not counted."""
    model.eval()
    counts = torch.zeros(classes * classes, dtype=torch.float64)
    for images, masks in loader:
        logits = model(images.to(device)).float()
        for logit, mask in zip(logits, masks, strict=True):
            predicted = resize(logit[None], mask.shape)[0].argmax(0).cpu()
            valid = mask != IGNORE
            counts += torch.bincount(mask[valid] * classes + predicted[valid], minlength=classes * classes)
    return counts


def segmentation_metrics(counts: Tensor, classes: tuple[str, ...]) -> dict:
    """mIoU over the classes present in truth or prediction, pixel accuracy, mean class accuracy
    (over classes present in truth), and each class's IoU (None where it is absent), in %."""
    matrix = counts.view(len(classes), len(classes)).double()
    hit, truth, predicted = matrix.diag(), matrix.sum(1), matrix.sum(0)
    union = truth + predicted - hit
    iou = hit / union.clamp(min=1)
    return {
        "miou": 100 * iou[union > 0].mean().item(),
        "pixel_acc": 100 * (hit.sum() / matrix.sum().clamp(min=1)).item(),
        "macc": 100 * (hit / truth.clamp(min=1))[truth > 0].mean().item(),
        "per_class_iou": {
            name: round(100 * v, 2) if u > 0 else None
            for name, v, u in zip(classes, iou.tolist(), union.tolist(), strict=True)
        },  # fmt: skip
    }


def unlabeled(dataset: Dataset) -> np.ndarray:
    """One class for every image: labeled subsets and the validation split are uniform draws."""
    return np.zeros(len(dataset), dtype=np.int64)  # type: ignore[arg-type]


@dataclass(frozen=True)
class SegmentRoute(Route):
    """The fine-tuning loop on (image, mask) pairs: segmentation data, joint transforms, a
    per-pixel loss that skips :data:`IGNORE`, and mIoU."""

    @property
    def segment(self) -> SegmentConfig:
        """The command's own config (the one saved): its data and scale keys."""
        if not isinstance(self.saved, SegmentConfig):
            raise TypeError("a SegmentRoute saves the segment command's config")
        return self.saved

    def load_data(self, cfg: EvalConfig, out: Path, world: World) -> EvalData:
        seg = self.segment

        def source(train: bool) -> Dataset:
            return load_segmentation(seg.data, train, seg.num_classes, seg.val_fraction)

        return load_eval_data(cfg, out, world, source, unlabeled)

    def transforms(self, cfg: FinetuneConfig, data: EvalData) -> tuple[Paired, Paired]:
        augment = train_transform(data.info, data.img_size, tuple(self.segment.scale_range))
        return Paired(augment), Paired(eval_transform(data.info, data.img_size), resize_mask=False)

    def criterion_and_mixup(self, cfg: FinetuneConfig, classes: int) -> tuple[nn.Module, None]:
        return nn.CrossEntropyLoss(ignore_index=IGNORE), None

    def counts(self, model: nn.Module, loader: DataLoader, device: torch.device, classes: int) -> Tensor:
        return confusion_counts(model, loader, device, classes)

    def metrics(self, counts: Tensor, classes: tuple[str, ...]) -> dict:
        return segmentation_metrics(counts, classes)


def validate(cfg: SegmentConfig) -> None:
    if cfg.protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol '{cfg.protocol}'; choose one of: {', '.join(PROTOCOLS)}")
    if cfg.init == "pixels":
        raise UserError("--init pixels is for classification probes; segment needs a network (or --init none)")
    low, high = (cfg.scale_range + [0.0, 0.0])[:2]
    if len(cfg.scale_range) != 2 or not 0 < low <= high:
        raise UserError(f"scale_range must be two numbers 0 < low <= high, got {cfg.scale_range}")
    if cfg.num_classes is not None and not 1 <= cfg.num_classes <= IGNORE:
        raise UserError(f"num_classes must be in [1, {IGNORE}] ({IGNORE} marks ignored pixels), got {cfg.num_classes}")
    if cfg.protocol == "linear" and (cfg.drop_path or cfg.layer_decay != 1 or cfg.decoder_channels):
        raise UserError("--drop-path, --layer-decay and --decoder-channels apply to --protocol upernet only")


def segment(cfg: SegmentConfig) -> dict:
    """Train and score a segmenter with ``cfg.protocol``; returns the record of results.json."""
    validate(cfg)
    shared = {f.name: getattr(cfg, f.name) for f in fields(LoopConfig)}
    run = FinetuneConfig(**shared, layer_decay=cfg.layer_decay, drop_path=cfg.drop_path, smoothing=0.0, mixup=0.0,
                         cutmix=0.0, randaug="")  # fmt: skip
    if cfg.protocol == "linear":
        model, optimizer = (lambda c: LinearSegmenter(c, c.num_classes)), layer_decay_optimizer
    else:
        model, optimizer = (lambda c: UperNetSegmenter(c, c.num_classes, cfg.decoder_channels)), upernet_optimizer
    route = SegmentRoute(
        "segment", f"segment-{cfg.protocol}", model, optimizer, saved=cfg, primary="miou", any_size=True, joint=True,
        collate=collate_masks, scored_batch=cfg.batch_size,
    )  # fmt: skip
    return finetune(run, route)
