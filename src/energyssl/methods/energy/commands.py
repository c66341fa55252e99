"""The ``restore`` and ``energy`` commands: look at what a pretrained energy model learned."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms

from ... import checkpoint as ckpt
from ...data import HELD_OUT_FRACTION, DataInfo, eval_transform, load_held_out
from ...errors import UserError
from ...models import create_backbone
from .corruptions import TASKS, Corruption
from .figures import auroc, psnr, save_energy_histogram, save_restoration_grid, to_pixels
from .model import EnergyModel
from .tasks import SORTING, PixelTask, pixel_corruption, restoration_blocks

MAX_RESTORE = 100  # images per restore figure: 1,000 rows passed Pillow's size limit


@dataclass
class LoadedEnergyModel:
    model: EnergyModel
    img_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    task: str
    steps: int
    corruption: dict  # the run's corruption parameters, so restorations corrupt as its training did
    val_fraction: float  # the run's held-out share of a split-less folder, so figures use unseen images


def load_energy_model(init: str) -> LoadedEnergyModel:
    """The whole energy model (backbone, head, alpha) of a pretraining run, a checkpoint folder or
    a checkpoint's ``model.safetensors``."""
    given = Path(init).expanduser()
    path = given if given.is_file() else ckpt.find_checkpoint(given) / ckpt.WEIGHTS
    meta = ckpt.read_metadata(path)
    missing = [k for k in ("model", "img_size", "in_chans", "mean", "std") if k not in meta]
    if missing or meta.get("method") != "energy":
        raise UserError(f"{path} is not an energy-model checkpoint (missing {', '.join(missing) or 'method=energy'})")
    patch = None if meta.get("patch_size") in (None, "None") else int(meta["patch_size"])
    img_size, in_chans = int(meta["img_size"]), int(meta["in_chans"])
    backbone = create_backbone(meta["model"], img_size=img_size, in_chans=in_chans, patch_size=patch)
    model = EnergyModel(backbone)
    ckpt.load_weights(model, path)
    model.eval()
    mean, std = tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"]))
    task, steps, params = meta.get("task", "mixed"), int(meta.get("steps", 2)), json.loads(meta.get("corruption", "{}"))
    val_fraction = float(meta.get("val_fraction", HELD_OUT_FRACTION))
    return LoadedEnergyModel(model, img_size, in_chans, mean, std, task, steps, params, val_fraction)


def _info(loaded: LoadedEnergyModel) -> DataInfo:
    return DataInfo(loaded.in_chans, loaded.img_size, loaded.mean, loaded.std, 0)


def read_images(files: list[str], loaded: LoadedEnergyModel) -> torch.Tensor:
    """User image files as a normalised batch of the model's size and channels: the shorter side
    resized to the model's size and the centre cropped (aspect kept), converted to the model's
    channels, each change said."""
    size, mode = loaded.img_size, "L" if loaded.in_chans == 1 else "RGB"
    resize = transforms.Compose(
        [transforms.Resize(size, transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(size)]
    )
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(loaded.mean, loaded.std)])
    batch = []
    for name in files:
        try:
            with Image.open(name) as img:
                changes = [] if img.size == (size, size) else [f"{img.size[0]}x{img.size[1]} -> centre {size}x{size}"]
                changes += [] if img.mode == mode else [f"{img.mode} -> {mode}"]
                batch.append(to_tensor(resize(img.convert(mode))))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
            raise UserError(f"cannot read image {name}: {exc}") from exc
        if changes:
            print(f"{name}: {', '.join(changes)} (the model's input)")
    return torch.stack(batch)


def dataset_images(spec: str, loaded: LoadedEnergyModel, count: int, foreign: bool = False) -> torch.Tensor:
    """The first ``count`` test images of a dataset (all images of a ``foreign`` folder), converted
    to the model's channels and size."""
    dataset = load_held_out(spec, whole_folder=foreign, val_fraction=loaded.val_fraction)
    if count > len(dataset):
        print(f"{spec}: {len(dataset)} images to take from, not {count}")
    mode = "L" if loaded.in_chans == 1 else "RGB"
    chans = len(dataset[0][0].getbands())  # the first image's; ``info`` would compute the data's statistics
    if chans != loaded.in_chans:
        print(f"{spec}: {chans}-channel images converted to the model's {loaded.in_chans} ({mode})")
    transform = transforms.Compose(
        [transforms.Lambda(lambda img: img.convert(mode)), eval_transform(_info(loaded), loaded.img_size)]
    )
    return torch.stack([transform(dataset[i][0]) for i in range(min(count, len(dataset)))])


def corruption_for(task: str, loaded: LoadedEnergyModel) -> Corruption:
    """The pixel corruption ``task`` for this model's data (sorting has no picture to show)."""
    corruption = pixel_corruption(task, loaded.corruption, loaded.in_chans, loaded.mean, loaded.std)
    if corruption is None:
        raise UserError("sorting corrupts position embeddings, not pixels: pass --task grid_mask (or another)")
    return corruption


def corruptions_for(task: str, loaded: LoadedEnergyModel) -> dict[str, Corruption]:
    return PixelTask(task, corruption_for(task, loaded)).parts()


def restore(
    init: str,
    task: str,
    out: Path,
    images: list[str] | None,
    data: str | None,
    count: int,
    steps: int | None,
    seed: int,
) -> dict:
    """Corrupt (unless ``task`` is 'none') and restore images; save the grid and PSNRs."""
    if task != "none" and task not in (*TASKS, SORTING):
        raise UserError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}, or none (restore images as given)")
    if count > MAX_RESTORE:
        raise UserError(f"--count must be <= {MAX_RESTORE} (one figure row per image and task), got {count}")
    loaded = load_energy_model(init)
    steps = steps or loaded.steps
    clean = read_images(images, loaded) if images else dataset_images(data or "embedded", loaded, count)
    corruptions: dict[str, Corruption | None] = {"none": None} if task == "none" else corruptions_for(task, loaded)
    blocks = restoration_blocks(loaded.model, corruptions, clean, steps, seed)
    report = {name: psnr_row(block, loaded) for name, block in blocks.items() if block[2] is not None}
    names = [Path(f).name for f in images] if images else None
    title = f"K={steps} steps"
    grid = save_restoration_grid(out / "restoration.png", blocks, loaded.mean, loaded.std, title=title, names=names)
    record = {"images": names or len(clean), "steps": steps, "psnr": report}
    if task == "none":
        record["psnr_note"] = "no PSNR: with --task none there is no clean image to compare with"
    (out / "restoration.json").write_text(json.dumps(record, indent=2))
    print(f"saved {grid}")
    for name, row in report.items():
        if row["images"] == 0:
            print(f"  {name:<18} leaves every image as it was: nothing to restore")
            continue
        left = f" ({row['unchanged']} image(s) it leaves as they were not counted)" if row["unchanged"] else ""
        before, after = row["psnr_corrupted"], row["psnr_restored"]
        print(f"  {name:<18} PSNR corrupted {before:.2f} dB -> restored {after:.2f} dB{left}")
    return report


def psnr_row(block: tuple, loaded: LoadedEnergyModel) -> dict:
    """Mean PSNR of the corrupted and the restored images against the originals, over the images
    the corruption changed (colorization leaves a grey image as it was: its PSNR is infinite)."""
    corrupted, restored, original = (to_pixels(x, loaded.mean, loaded.std) for x in (block[0], block[1][-1], block[2]))
    changed = (corrupted != original).flatten(1).any(dim=1)
    row: dict = {"images": int(changed.sum()), "unchanged": int((~changed).sum())}
    if changed.any():
        row["psnr_corrupted"] = psnr(corrupted[changed], original[changed]).mean().item()
        row["psnr_restored"] = psnr(restored[changed], original[changed]).mean().item()
    return row


@torch.no_grad()
def _energies(model: EnergyModel, x: torch.Tensor) -> np.ndarray:
    return torch.cat([model.energy(chunk) for chunk in x.split(256)]).cpu().numpy()


def energy_scores(
    init: str, data: str, out: Path, compare: str | None, task: str | None, count: int, seed: int
) -> dict:
    """Energy histograms of real, corrupted and one-step-restored images (and a second dataset)."""
    loaded = load_energy_model(init)
    own = pixel_corruption(loaded.task, loaded.corruption, loaded.in_chans, loaded.mean, loaded.std)
    if task is None and own is None:
        print(f"the run's task ({loaded.task}) corrupts no pixels: corrupting with grid_mask (--task to choose)")
        task = "grid_mask"
    task = task or loaded.task
    real = dataset_images(data, loaded, count)
    corrupted = corruption_for(task, loaded)(real, torch.Generator().manual_seed(seed))
    restored = torch.cat([loaded.model.restore(c, 1)[0].detach() for c in corrupted.split(256)])
    groups = {"real": _energies(loaded.model, real), f"corrupted ({task})": _energies(loaded.model, corrupted)}
    groups["restored (1 step)"] = _energies(loaded.model, restored)
    if compare:
        groups[f"other: {compare}"] = _energies(loaded.model, dataset_images(compare, loaded, count, foreign=True))
    stats = {
        name: {"mean": float(e.mean()), "std": float(e.std()), "median": float(np.median(e)), "count": len(e)}
        for name, e in groups.items()
    }
    names = list(groups)
    report = {
        "stats": stats,
        "auroc_real_vs_corrupted": auroc(groups["real"], groups[names[1]]),
        "auroc_real_vs_restored": auroc(groups["real"], groups[names[2]]),
    }
    if compare:
        report["auroc_real_vs_other"] = auroc(groups["real"], groups[names[3]])
    out.mkdir(parents=True, exist_ok=True)
    save_energy_histogram(out / "energy.png", groups, title=f"{data}: energy of {count} images")
    (out / "energy.json").write_text(json.dumps(report, indent=2))
    other = f"; real vs {compare}: {report['auroc_real_vs_other']:.3f}" if compare else ""
    print(
        f"AUROC real vs corrupted (higher energy = corrupted): {report['auroc_real_vs_corrupted']:.3f}{other}; "
        f"saved {out / 'energy.png'}"
    )
    return report
