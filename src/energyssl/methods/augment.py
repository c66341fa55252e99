"""The augmentation of the joint-embedding methods (BYOL's, used by MoCo v3 and DINO): a random
crop, flip, colour jitter and grey, then blur and solarize with per-view probabilities. On
one-channel images the jitter keeps brightness and contrast only."""

from __future__ import annotations

from torchvision import transforms

from ..data import DataInfo


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
