"""The energy method's numeric choices: fp16's own loss scale for dE/dx, true float32 for fast
mode's finite difference, and the rule behind ``--grad-mode auto``.

Why the inner gradient has its own scale in fp16: GradScaler's scale (65536 at the start) is
larger than fp16's largest number (65504), so backpropagating ``E * 65536`` through fp16
activations gives ``inf`` before the scaler could ever back off. dE/dx is a gradient like any
other, so it gets a loss scale of its own, small, halved when dE/dx overflows (the step is
then skipped) and doubled after a run of good steps, as GradScaler does for the parameters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from ...precision import amp_dtype_for


@dataclass
class InputGradScale:
    """Dynamic loss scale of dE/dx under fp16 (see the module docstring)."""

    scale: float = 2.0**8
    growth_interval: int = 200
    max_scale: float = 2.0**14  # with |dE/dx| near 1 this stays 4x below fp16's overflow
    min_scale: float = 2.0**-16  # below this no scale helps: the loss itself is not finite
    good_steps: int = 0

    def update(self, finite: bool) -> None:
        """Halve after an overflow; double after ``growth_interval`` finite steps in a row."""
        if not finite:
            self.scale, self.good_steps = self.scale / 2, 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale, self.good_steps = min(self.scale * 2, self.max_scale), 0

    @property
    def exhausted(self) -> bool:
        return self.scale < self.min_scale

    def state_dict(self) -> dict[str, float]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


@contextmanager
def full_float32() -> Iterator[None]:
    """Run a block in true float32: TF32 off for matmuls and cuDNN convolutions (on by default
    for convolutions on GPUs), restored after. Fast mode differences two gradients that differ
    by ~1e-3 relative; TF32's ~5e-4 rounding would swamp that difference."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


# ``--grad-mode auto --amp auto`` on a GPU: the faster of (exact, bf16) and (fast, float32) per
# training image, as benchmarks/gpu_check.py measured it (ViT-B/16, 224 px, batch 64, one H200):
# exact bf16 387 img/s vs fast float32 182 at K=1, 200 vs 93 at K=2.
GPU_AUTO: tuple[str, str] = ("exact", "bf16")
GPU_AUTO_WHY = "2.1x the images per second of fast float32 on an H200 (benchmarks/results/gpu_check.md)"


def choose_precision(
    grad_mode: str, amp: str, kinked: list[str], device: torch.device
) -> tuple[str, torch.dtype | None, str]:
    """(grad mode, autocast dtype, why) of the energy method. Fast mode needs a smooth
    backbone and float32; ``auto`` takes it where it applies and costs less."""
    if grad_mode != "auto":
        return grad_mode, None if grad_mode == "fast" else amp_dtype_for(amp, device), "as asked"
    if kinked:
        why = f"the backbone has {', '.join(kinked)}, where fast mode's finite difference is wrong"
        return "exact", amp_dtype_for(amp, device), why
    if amp in ("bf16", "fp16"):
        return "exact", amp_dtype_for(amp, device), f"--amp {amp} asks for half precision; fast mode needs float32"
    if amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        mode, dtype = GPU_AUTO
        return mode, amp_dtype_for(dtype, device), GPU_AUTO_WHY
    return "fast", None, "float32: fast mode costs less time and memory than exact (benchmarks/results/step_cost.md)"
