"""Numeric precision of a training step: the autocast dtype of ``--amp``, GradScaler under fp16,
and channels-last for convolutional backbones on GPUs. (A method's own numeric choices, such as
the energy method's gradient mode and its scale for dE/dx, are the method's.)"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

AMP_CHOICES = ("auto", "bf16", "fp16", "none")


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp`` on ``device`` (``auto``: bf16 on a GPU that has it)."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def channels_last_if_cnn(model: nn.Module, device: torch.device) -> nn.Module:
    """Channels-last memory format for a model around a convolutional backbone, on GPUs (faster
    cuDNN kernels); token models (a ``patch_embed``) gain nothing from it."""
    backbone = getattr(model, "backbone", model)
    if device.type == "cuda" and not hasattr(backbone, "patch_embed"):
        return model.to(memory_format=torch.channels_last)
    return model


@dataclass
class Precision:
    """How a training step computes: autocast dtype (None: float32) and, under fp16 only,
    GradScaler for the parameter gradients."""

    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def build(cls, dtype: torch.dtype | None, device: torch.device) -> Precision:
        return cls(dtype, torch.amp.GradScaler(device.type) if dtype == torch.float16 else None)

    def autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def backward_and_step(
        self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip_grad: float | None = None,
        parameters: Iterable[nn.Parameter] = (),
    ) -> None:  # fmt: skip
        """Backward, then :meth:`step`."""
        self.backward(loss)
        self.step(optimizer, clip_grad, parameters)

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss`` added to the parameters' (scaled by GradScaler under fp16)."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(
        self, optimizer: torch.optim.Optimizer, clip_grad: float | None = None, parameters: Iterable[nn.Parameter] = ()
    ) -> None:
        """Optional gradient clipping, optimizer step; under fp16 through GradScaler (unscaled
        before clipping), which skips a step whose gradients overflow."""
        scaler = self.scaler
        if clip_grad is not None:
            if scaler is not None:
                scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(parameters, clip_grad)
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
