"""Datasets by specification string.

``--data`` accepts:

* ``embedded`` -- 4,000 Fashion-MNIST training images (1,000 test) shipped with the package;
* ``fashion-mnist`` or ``fashion-mnist:DIR`` -- the original idx files, searched in DIR,
  then where Debian's ``dataset-fashion-mnist`` installs them, then torchvision's download;
* ``cifar10:DIR`` / ``cifar100:DIR`` -- the CIFAR python format (``data_batch_*`` or ``train``);
* ``torchvision:NAME:DIR`` -- any torchvision dataset class taking ``root, train`` (e.g. MNIST);
* a folder path -- an image folder: class-per-subfolder, or a flat folder of unlabeled images;
  with ``train/`` and ``test/`` (or ``val/``) subfolders, each split is such a folder; without
  them, a fixed share of each class (``--val-fraction``, 10%) is held out for evaluation and
  never trained on.

Every dataset yields ``(PIL image, label)`` with label -1 when unknown.
"""

from __future__ import annotations

import copy
import gzip
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import UserError
from .index import index_folder

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
HELD_OUT_FRACTION = 0.1  # of a folder without its own test/ or val/ split, kept for evaluation
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about the data."""

    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    classes: tuple[str, ...] = ()  # class names in label order


class ArrayDataset(Dataset):
    """Images held in one uint8 array (N, H, W) or (N, H, W, C), with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
        self.images, self.labels, self.num_classes = images, labels.astype(np.int64), num_classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index])

    @property
    def info(self) -> DataInfo:
        pixels = self.images[: min(len(self.images), 10_000)].astype(np.float64) / 255.0
        chans = 1 if pixels.ndim == 3 else pixels.shape[-1]
        axes = (0, 1, 2)
        mean = pixels.mean(axis=axes) if chans > 1 else [pixels.mean()]
        std = pixels.std(axis=axes) if chans > 1 else [pixels.std()]
        classes = tuple(str(i) for i in range(self.num_classes))
        return DataInfo(chans, self.images.shape[1], tuple(map(float, mean)), tuple(map(float, std)), self.num_classes,
                        classes)  # fmt: skip


class ImageFolderDataset(Dataset):
    """Class-per-subfolder images, or a flat folder of unlabeled images (label -1).

    Unreadable files are skipped with a count at scan time; they never stop a run. ``classes``
    (the training split's, for an evaluation split) fixes the label of each class name, so that
    a split lacking a class numbers the others as training did; a class it adds is refused.
    """

    def __init__(self, root: Path, classes: list[str] | None = None) -> None:
        self.root, self.split = root, str(root)
        flat = [p for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS]
        found = [] if flat else class_folders(root)
        if classes is not None and classes:
            unknown = [name for name in found if name not in classes]
            if unknown:
                raise UserError(
                    f"{root} has class folder(s) the training split lacks: {', '.join(unknown)} "
                    f"(training classes: {', '.join(classes)})"
                )
        self.classes = list(classes) if classes else found
        candidates = [(p, -1) for p in flat] + [
            (p, self.classes.index(name)) for name in found for p in _images_in(root / name)
        ]
        index = index_folder(root, [p for p, _ in candidates]) if candidates else None
        if index is None:
            raise UserError(f"no readable images in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        self.samples = [sample for sample, ok in zip(candidates, index.readable, strict=True) if ok]
        self.skipped = len(candidates) - len(self.samples)
        self.num_classes = len(self.classes)
        if self.skipped:
            print(f"warning: skipped {self.skipped} unreadable image(s) in {root}")
        self._mode, self._size = index.mode, index.size

    def __len__(self) -> int:
        return len(self.samples)

    def held_out_split(self, train: bool, fraction: float = HELD_OUT_FRACTION) -> ImageFolderDataset:
        """This folder has no train/test split of its own: keep a fixed, class-stratified
        ``fraction`` apart (the same for every command and seed), so that nothing is evaluated on
        images it was trained on. Returns the training part or the held-out part."""
        generator = torch.Generator().manual_seed(0)
        held: set[int] = set()
        for label in sorted({label for _, label in self.samples}):
            members = [i for i, (_, lab) in enumerate(self.samples) if lab == label]
            count = max(round(fraction * len(members)), int(len(members) > 1))  # each class is evaluated
            held.update(members[j] for j in torch.randperm(len(members), generator=generator)[:count].tolist())
        if not held and len(self.samples) > 1:
            held = {len(self.samples) - 1}
        kept = [sample for i, sample in enumerate(self.samples) if (i in held) != train]
        if not kept:
            raise UserError(f"{self.root} holds too few images to keep {fraction:.0%} apart for evaluation")
        part = copy.copy(self)
        part.samples = kept
        of = "of each class" if self.classes else "of the images"
        part.split = f"{'all but ' if train else ''}a fixed {fraction:.0%} {of} of {self.root}"
        return part

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                return img.convert(self._mode), label
        except (OSError, ValueError, Image.DecompressionBombError) as exc:  # passed the scan, fails to decode
            raise UserError(f"cannot decode {path} ({exc}): remove it, then run again (or --resume)") from exc

    @property
    def info(self) -> DataInfo:
        return folder_info(self._mode, self._size, tuple(self.classes))


def folder_info(mode: str, size: int, classes: tuple[str, ...]) -> DataInfo:
    """A folder's images come in any size and colour: normalise with timm's ImageNet defaults
    (0.5 for grey)."""
    chans = 1 if mode == "L" else 3
    mean, std = ((0.5,), (0.5,)) if chans == 1 else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return DataInfo(chans, size, mean, std, len(classes), classes)


def class_folders(root: Path) -> list[str]:
    """The class names of a class-per-subfolder split: its subfolders holding images, sorted."""
    return [d.name for d in sorted(p for p in root.iterdir() if p.is_dir()) if any(_images_in(d))]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).exists():
            return folder / name
    return None


def load_fashion_mnist(root: str | None, train: bool) -> ArrayDataset:
    prefix = "train" if train else "t10k"
    if root and not Path(root).expanduser().is_dir():  # never train on another copy than the one named
        raise UserError(f"fashion-mnist:{root}: no such folder")
    folders = [Path(root).expanduser()] if root else [DEBIAN_FASHION_MNIST]
    for folder in folders:
        images = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
        labels = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            return ArrayDataset(_read_idx(images), _read_idx(labels), 10)
    download_root = Path(root or "~/.cache/energyssl").expanduser()
    try:
        from torchvision.datasets import FashionMNIST

        ds = FashionMNIST(str(download_root), train=train, download=True)
    except Exception as exc:  # noqa: BLE001 -- offline: explain where we looked
        looked = ", ".join(str(f) for f in folders)
        raise UserError(
            f"Fashion-MNIST idx files not found in {looked} and download failed ({type(exc).__name__}); "
            "install Debian's dataset-fashion-mnist or pass fashion-mnist:DIR"
        ) from exc
    return ArrayDataset(ds.data.numpy(), ds.targets.numpy(), 10)


def load_embedded(train: bool) -> ArrayDataset:
    with resources.files(__package__).joinpath("fashion_mnist_subset.npz").open("rb") as f:
        arrays = np.load(f)
        split = "train" if train else "test"
        return ArrayDataset(arrays[f"{split}_images"], arrays[f"{split}_labels"], 10)


def load_cifar(root: str, train: bool, classes: int) -> ArrayDataset:
    folder = Path(root)
    if classes == 10:
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        sub, key = "cifar-10-batches-py", b"labels"
    else:
        names = ["train" if train else "test"]
        sub, key = "cifar-100-python", b"fine_labels"
    if (folder / sub).is_dir():
        folder = folder / sub
    paths = [folder / n for n in names]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UserError(f"CIFAR-{classes} files not found: {', '.join(missing)}")
    images, labels = [], []
    for path in paths:
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")  # the official format is pickled
            images.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(batch[key]))
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path} is not a CIFAR-{classes} batch file of the python version: {exc!r}") from exc
    return ArrayDataset(np.concatenate(images), np.concatenate(labels), classes)


def load_torchvision(name: str, root: str, train: bool) -> ArrayDataset:
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if cls is None:
        raise UserError(f"torchvision has no dataset '{name}'")
    try:
        ds = cls(root, train=train, download=False)
    except (RuntimeError, FileNotFoundError) as exc:
        raise UserError(
            f"torchvision {name} not found under {root} (energyssl does not download it: put its files there)"
        ) from exc
    data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
    targets = np.asarray(ds.targets.numpy() if isinstance(ds.targets, torch.Tensor) else ds.targets)
    return ArrayDataset(data, targets, len(getattr(ds, "classes", [])) or int(targets.max()) + 1)


def load_dataset(
    spec: str, train: bool = True, val_fraction: float = HELD_OUT_FRACTION
) -> ArrayDataset | ImageFolderDataset:
    """The dataset named by ``spec`` (see the module docstring), training or test split; a folder
    without its own split keeps ``val_fraction`` of each class apart as its test split."""
    kind, _, rest = spec.partition(":")
    if spec == "embedded":
        return load_embedded(train)
    if kind == "fashion-mnist":
        return load_fashion_mnist(rest or None, train)
    if kind in ("cifar10", "cifar100"):
        if not rest:
            raise UserError(f"{kind} needs a folder: {kind}:DIR")
        return load_cifar(rest, train, 10 if kind == "cifar10" else 100)
    if kind == "torchvision":
        name, _, root = rest.partition(":")
        return load_torchvision(name, root or ".", train)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(
            f"data '{spec}' not found: give an existing folder, 'embedded', 'fashion-mnist[:DIR]', "
            "'cifar10:DIR', 'cifar100:DIR' or 'torchvision:NAME:DIR'"
        )
    if not path.is_dir():
        raise UserError(f"data '{spec}' is a file; give the folder that holds the images")
    if (path / "train").is_dir() and not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir()):
        splits = ["train"] if train else ["test", "val"]
        found = [path / s for s in splits if (path / s).is_dir()]
        if not found:  # never read the split folders themselves as classes
            raise UserError(f"{path} has train/ but no test/ or val/ split")
        return ImageFolderDataset(found[0], None if train else class_folders(path / "train"))
    return ImageFolderDataset(path).held_out_split(train, val_fraction)


def load_held_out(
    spec: str, whole_folder: bool = False, val_fraction: float = HELD_OUT_FRACTION
) -> ArrayDataset | ImageFolderDataset:
    """The test split of ``spec``, or its training split when it has none (reports, figures);
    with ``whole_folder``, all of a split-less folder (another domain, never trained on)."""
    path = Path(spec).expanduser()
    if whole_folder and path.is_dir() and not (path / "train").is_dir():
        return ImageFolderDataset(path)
    try:
        return load_dataset(spec, train=False, val_fraction=val_fraction)
    except UserError:
        return load_dataset(spec, train=True, val_fraction=val_fraction)
