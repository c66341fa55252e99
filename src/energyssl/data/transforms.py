"""Image transforms: the pretraining crop, the evaluation resize, the joint-embedding methods'
views (BYOL's augmentation, used by MoCo v3 and DINO) and the fine-tuning recipe's."""

from __future__ import annotations

from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS, _RAND_TRANSFORMS, rand_augment_transform
from torchvision import transforms

from .datasets import DataInfo


def pretrain_transform(info: DataInfo, img_size: int, crop_scale: tuple[float, float] = (0.2, 1.0)):
    """RandomResizedCrop + horizontal flip, as the paper (and MAE) pretrain."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                img_size, scale=crop_scale, interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(info.mean, info.std),
        ]
    )


def eval_transform(info: DataInfo, img_size: int):
    """Resize to ``img_size`` (no crop), then normalise."""
    return transforms.Compose(
        [
            transforms.Resize((img_size, img_size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(info.mean, info.std),
        ]
    )


def byol_view(
    info: DataInfo, size: int, scale: tuple[float, float], blur: float, solarize: float
) -> transforms.Compose:
    colour = info.in_chans == 3
    jitter = transforms.ColorJitter(0.4, 0.4, 0.2 if colour else 0.0, 0.1 if colour else 0.0)
    kernel = max(3, size // 10 * 2 + 1)  # about a tenth of the image, odd
    return transforms.Compose([
        transforms.RandomResizedCrop(size, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.RandomApply([jitter], p=0.8),
        *([transforms.RandomGrayscale(0.2)] if colour else []),
        transforms.RandomApply([transforms.GaussianBlur(kernel, (0.1, 2.0))], p=blur),
        transforms.RandomSolarize(128, p=solarize),
        transforms.ToTensor(),
        transforms.Normalize(info.mean, info.std),
    ])  # fmt: skip


def finetune_transform(
    info: DataInfo, img_size: int, crop_scale: tuple[float, float], randaug: str
) -> transforms.Compose:
    """RandomResizedCrop + flip + RandAugment (applied in RGB, so grey images work too)."""
    steps: list = [
        transforms.RandomResizedCrop(img_size, scale=crop_scale, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
    ]
    if randaug:
        mean = tuple(round(255 * m) for m in (info.mean * 3 if info.in_chans == 1 else info.mean))
        hparams = {"translate_const": int(img_size * 0.45), "img_mean": mean}
        randaug = rand_augment_transform(randaug, hparams, transforms=randaug_ops(randaug))
        mode = "L" if info.in_chans == 1 else "RGB"
        steps.append(transforms.Lambda(lambda img: randaug(img.convert("RGB")).convert(mode)))
    steps += [transforms.ToTensor(), transforms.Normalize(info.mean, info.std)]
    return transforms.Compose(steps)


def randaug_ops(spec: str) -> list[str]:
    """timm's RandAugment ops minus Posterize: with magnitude noise it asks Pillow >= 12 for
    0 bits, which Pillow rejects."""
    ops = _RAND_INCREASING_TRANSFORMS if "inc1" in spec.split("-") else _RAND_TRANSFORMS
    return [op for op in ops if not op.startswith("Posterize")]
