"""Semantic segmentation data: (image, mask) pairs, a mask holding one class index per pixel and
:data:`IGNORE` where no class is given.

``segment --data`` accepts:

* ``embedded`` -- garments of the embedded Fashion-MNIST images placed on a 56 px canvas, the
  mask their class where a garment is and background elsewhere (built deterministically);
* an ADE20K folder -- ``images/{training,validation}`` and ``annotations/{training,validation}``
  of index PNGs; label 0 ("other") is ignored and the rest shift down by one, as the standard
  ADE20K loaders (mmsegmentation's ``reduce_zero_label``) do: 150 classes;
* a generic folder -- ``images/`` and ``masks/`` with matching stems (label 0 is a class), either
  flat (a fixed share kept apart as the test split) or split into ``train/`` and ``val/`` (or
  ``test/``) subfolders of each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..errors import UserError
from .datasets import HELD_OUT_FRACTION, IMAGE_EXTENSIONS, DataInfo, folder_info, load_embedded
from .index import first_image

IGNORE = 255  # the mask value of pixels that belong to no class: neither trained on nor scored
CANVAS = 56  # side of the embedded set's images: two garments wide
ADE20K_CLASSES = 150
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


class SegmentationDataset(Dataset):
    """Image and mask files in pairs. Sizes are checked at once (the files' headers); labels as
    each mask is read (one ``error:`` line naming the file). ``shift``: ADE20K's label 0 is
    ignored and the others move down by one."""

    def __init__(self, pairs: list[tuple[Path, Path]], num_classes: int, split: str, shift: bool = False) -> None:
        self.pairs, self.num_classes, self.split, self.shift = pairs, num_classes, split, shift
        for image, mask in pairs:
            with Image.open(image) as a, Image.open(mask) as b:
                if a.size != b.size:
                    raise UserError(f"mask {mask} is {b.size[0]}x{b.size[1]}, its image {a.size[0]}x{a.size[1]}")
        self.mode, self.size = first_image(pairs[0][0])

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image_path, mask_path = self.pairs[index]
        with Image.open(image_path) as image, Image.open(mask_path) as mask:
            image, labels = image.convert(self.mode), np.array(mask)
        if labels.ndim != 2:
            raise UserError(f"mask {mask_path} is not an index image (one class per pixel, e.g. a mode-L PNG)")
        return image, self.check(shift_labels(labels) if self.shift else labels, mask_path)

    def check(self, labels: np.ndarray, where: Path | str) -> np.ndarray:
        labels = labels.astype(np.int64)
        wrong = labels[(labels != IGNORE) & ((labels < 0) | (labels >= self.num_classes))]
        if wrong.size:
            raise UserError(
                f"mask {where} has label {int(wrong.max())}, above the {self.num_classes} classes "
                f"(0-{self.num_classes - 1}, {IGNORE} ignored): pass --num-classes"
            )
        return labels

    @property
    def info(self) -> DataInfo:
        return folder_info(self.mode, self.size, tuple(map(str, range(self.num_classes))))


def shift_labels(labels: np.ndarray) -> np.ndarray:
    """ADE20K's convention: 0 ("other objects") becomes ignored, class k becomes k - 1."""
    shifted = labels.astype(np.int64) - 1
    shifted[labels == 0] = IGNORE
    return shifted


class ArraySegmentation(SegmentationDataset):
    """Images (N, H, W) and masks (N, H, W) held in arrays."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, classes: tuple[str, ...], split: str) -> None:
        self.images, self.masks, self.classes, self.split = images, masks, classes, split
        self.num_classes, self.mode, self.size = len(classes), "L", images.shape[1]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, np.ndarray]:
        return Image.fromarray(self.images[index]), self.masks[index].astype(np.int64)

    @property
    def info(self) -> DataInfo:
        pixels = self.images.astype(np.float64) / 255.0
        return DataInfo(1, self.size, (float(pixels.mean()),), (float(pixels.std()),), self.num_classes, self.classes)


def garment_canvases(train: bool, per_canvas: int = 3, seed: int = 0) -> ArraySegmentation:
    """The embedded set: each canvas holds ``per_canvas`` garments of the embedded Fashion-MNIST
    split at random places (later ones in front); a pixel brighter than a tenth of white is the
    garment's, the rest background (class 0). Deterministic: the same canvases on every machine."""
    source = load_embedded(train)
    rng = np.random.default_rng(seed + (0 if train else 1))
    order = rng.permutation(len(source.images))
    count = len(order) // per_canvas
    images = np.zeros((count, CANVAS, CANVAS), np.uint8)
    masks = np.zeros((count, CANVAS, CANVAS), np.uint8)
    side = source.images.shape[1]
    for canvas, picks in enumerate(order[: count * per_canvas].reshape(count, per_canvas)):
        for pick in picks:
            top, left = rng.integers(0, CANVAS - side + 1, size=2)
            garment = source.images[pick]
            where = garment > 25
            images[canvas, top : top + side, left : left + side][where] = garment[where]
            masks[canvas, top : top + side, left : left + side][where] = source.labels[pick] + 1
    split = f"embedded garment canvases ({'training' if train else 'test'} garments)"
    return ArraySegmentation(images, masks, ("background", *FASHION_CLASSES), split)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else []


def paired(images: Path, masks: Path) -> list[tuple[Path, Path]]:
    """Each image with the mask of the same stem; an image without one is an error."""
    found = _images(images)
    if not found:
        raise UserError(f"no images in {images}")
    by_stem = {p.stem: p for p in _images(masks)}
    missing = [p.name for p in found if p.stem not in by_stem]
    if missing:
        raise UserError(f"{len(missing)} image(s) in {images} without a mask in {masks}, e.g. {missing[0]}")
    return [(p, by_stem[p.stem]) for p in found]


def max_label(pairs: list[tuple[Path, Path]], shift: bool) -> int:
    """The largest class index in the masks (read once, when --num-classes is not given)."""
    top = -1
    for _, mask in pairs:
        with Image.open(mask) as m:
            labels = np.array(m)
        labels = shift_labels(labels) if shift else labels.astype(np.int64)
        valid = labels[labels != IGNORE]
        top = max(top, int(valid.max()) if valid.size else -1)
    return top


def folder_split(root: Path, train: bool, val_fraction: float) -> tuple[list[tuple[Path, Path]], bool, str]:
    """(pairs, shift, name) of an ADE20K or a generic folder's split."""
    if (root / "images" / "training").is_dir():
        split = "training" if train else "validation"
        return paired(root / "images" / split, root / "annotations" / split), True, f"{root} ({split})"
    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise UserError(
            f"{root} is not a segmentation folder: give images/training + annotations/training (ADE20K) "
            "or images/ + masks/ with matching file names"
        )
    if (root / "images" / "train").is_dir():
        names = ["train"] if train else [n for n in ("val", "test") if (root / "images" / n).is_dir()]
        if not names:
            raise UserError(f"{root}/images has train/ but no val/ or test/ split")
        return paired(root / "images" / names[0], root / "masks" / names[0]), False, f"{root} ({names[0]})"
    pairs = paired(root / "images", root / "masks")
    held = set(np.random.default_rng(0).permutation(len(pairs))[: max(1, round(val_fraction * len(pairs)))])
    kept = [pair for i, pair in enumerate(pairs) if (i in held) != train]
    if not kept:
        raise UserError(f"{root} holds too few images to keep {val_fraction:.0%} apart for evaluation")
    return kept, False, f"{'all but ' if train else ''}a fixed {val_fraction:.0%} of {root}"


def load_segmentation(
    spec: str, train: bool = True, num_classes: int | None = None, val_fraction: float = HELD_OUT_FRACTION
) -> SegmentationDataset:
    """The segmentation set ``spec`` names (see the module docstring), training or test split."""
    if spec == "embedded":
        data = garment_canvases(train)
        if num_classes not in (None, data.num_classes):
            raise UserError(f"the embedded set has {data.num_classes} classes, not --num-classes {num_classes}")
        return data
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise UserError(f"segmentation data '{spec}' not found: give 'embedded' or a folder")
    pairs, shift, name = folder_split(root, train, val_fraction)
    if num_classes is None:
        num_classes = ADE20K_CLASSES if shift else max_label(pairs, shift) + 1
        if num_classes < 1:
            raise UserError(f"the masks in {root} hold no labeled pixel")
    return SegmentationDataset(pairs, num_classes, name, shift)


def train_transform(info: DataInfo, crop: int, scale: tuple[float, float]) -> v2.Compose:
    """mmsegmentation's recipe for ADE20K, scaled: the shorter side resized to ``scale`` times the
    crop, a random crop (padded, the mask with :data:`IGNORE`), a horizontal flip."""
    return v2.Compose([
        v2.RandomResize(max(1, round(scale[0] * crop)), max(2, round(scale[1] * crop)) + 1, antialias=True),
        v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}),
        v2.RandomHorizontalFlip(),
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
        v2.Normalize(info.mean, info.std),
    ])  # fmt: skip


def eval_transform(info: DataInfo, size: int) -> v2.Compose:
    """The image resized to ``size`` x ``size``; the mask kept at its own size (predictions are
    resized to it, so scores are on the original pixels)."""
    return v2.Compose([
        v2.Resize((size, size), antialias=True),
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
        v2.Normalize(info.mean, info.std),
    ])  # fmt: skip


class Paired:
    """A v2 transform applied to an (image, mask) pair: the image as a tensor image, the mask as
    a mask (nearest-neighbour resizing, padding with :data:`IGNORE`)."""

    def __init__(self, transform: v2.Transform, resize_mask: bool = True) -> None:
        self.transform, self.resize_mask = transform, resize_mask

    def __call__(self, image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = tv_tensors.Image(v2.functional.pil_to_tensor(image))
        labels = tv_tensors.Mask(torch.from_numpy(np.asarray(mask, np.int64))[None])
        if not self.resize_mask:
            return self.transform(pixels), labels[0].as_subclass(torch.Tensor)
        pixels, labels = self.transform(pixels, labels)
        return pixels.as_subclass(torch.Tensor), labels[0].as_subclass(torch.Tensor)


def collate_masks(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Images stacked; masks kept apart (each at its image's own size)."""
    return torch.stack([image for image, _ in batch]), [mask for _, mask in batch]
