"""The energy objective: E(x) = head(backbone(x)); a corrupted input is restored by
gradient steps on the input, x <- x - alpha * dE/dx, and the loss is each step's
distance to the clean input.

The forward pass of the backbone is the encoder and its backward pass the decoder,
so no decoder parameters exist. Parameters learn through dE/dx, which is why the
input gradient is taken with ``create_graph=True`` (a mixed second derivative).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

DEFAULT_ALPHA = 1.0
DEFAULT_HEAD_STD = 1.0


@dataclass
class Restoration:
    """Result of one restoration pass: the summed loss, every step (detached), and the loss of
    the unrestored input for reference."""

    loss: Tensor
    step_losses: list[Tensor]
    steps: list[Tensor]
    baseline: Tensor | None = None


@contextmanager
def batchnorm_uses_running_stats(module: nn.Module) -> Iterator[None]:
    """Put BatchNorm layers in eval mode so one image's energy does not depend on its batch."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def _at_least_fp32(x: Tensor) -> Tensor:
    """Half-precision values (under autocast) are promoted; float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class EnergyModel(nn.Module):
    """A backbone returning pooled features plus a one-output linear head, seen as an energy.

    The head has no bias: dE/dx does not depend on it, so it could never learn.
    ``alpha`` is stored as its logarithm so it stays positive.

    BatchNorm backbones: in training, the clean batch goes once through the backbone in
    train mode without gradient (this updates the running statistics), and the energy
    passes use the running statistics. Each image's energy then depends on that image
    only, so restoration cannot copy information across the batch.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_features: int | None = None,
        *,
        alpha_init: float = DEFAULT_ALPHA,
        head_init_std: float = DEFAULT_HEAD_STD,
        langevin_std: float = 0.0,
        loss: str = "mse",
    ) -> None:
        super().__init__()
        if alpha_init <= 0:
            raise ValueError(f"alpha_init must be positive, got {alpha_init}")
        self.backbone = backbone
        num_features = num_features or getattr(backbone, "num_features", None)
        if not num_features:
            raise ValueError("num_features is required when the backbone has no `num_features` attribute")
        self.head = nn.Linear(num_features, 1, bias=False)
        nn.init.normal_(self.head.weight, std=head_init_std / math.sqrt(num_features))
        self.log_alpha = nn.Parameter(torch.tensor(math.log(alpha_init)))
        self.langevin_std = langevin_std
        self.loss_fn: Callable[[Tensor, Tensor], Tensor] = {"mse": F.mse_loss, "smooth_l1": F.smooth_l1_loss}[loss]
        self._has_batchnorm = has_batchnorm(backbone)

    @property
    def alpha(self) -> Tensor:
        return self.log_alpha.exp()

    def energy(self, x: Tensor) -> Tensor:
        """Energy of each image, shape (B,). Low energy means a likely image."""
        return _at_least_fp32(self.head(self.backbone(x)).squeeze(-1))

    def energy_grad(
        self,
        x: Tensor,
        create_graph: bool = False,
        grad_scale: float = 1.0,
        energy_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """dE/dx at ``x`` (treated as a leaf). ``energy_fn`` replaces ``self.energy`` when the
        restored variable is not the image (patch sorting restores position embeddings).
        ``grad_scale`` follows PyTorch's AMP gradient-penalty recipe for fp16: scale before
        ``autograd.grad``, unscale after."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            # Fused attention kernels have no double backward; the math backend does.
            kernel = sdpa_kernel(SDPBackend.MATH) if create_graph else nullcontext()
            with kernel:
                energy = (energy_fn or self.energy)(x)
                (grad,) = torch.autograd.grad(energy.sum() * grad_scale, x, create_graph=create_graph)
        return grad / grad_scale if grad_scale != 1.0 else grad

    def restore(
        self,
        x0: Tensor,
        steps: int = 2,
        create_graph: bool = False,
        grad_scale: float = 1.0,
        energy_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> list[Tensor]:
        """K gradient steps down the energy, with a stop-gradient between steps."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        norm_ctx = batchnorm_uses_running_stats(self.backbone) if self._has_batchnorm else nullcontext()
        restored = []
        x = x0
        with norm_ctx:
            for _ in range(steps):
                grad = self.energy_grad(x, create_graph=create_graph, grad_scale=grad_scale, energy_fn=energy_fn)
                x = x.detach() - self.alpha * grad
                if self.langevin_std > 0:
                    x = x + self.langevin_std * torch.randn_like(x)
                restored.append(x)
        return restored

    def forward(self, clean: Tensor, corrupted: Tensor, steps: int = 2, grad_scale: float = 1.0) -> Restoration:
        """Restoration loss sum_k loss(x_k, clean); differentiable in the parameters."""
        if self._has_batchnorm and self.training:
            with torch.no_grad():
                self.backbone(clean)  # update BatchNorm running statistics from clean images
        create_graph = torch.is_grad_enabled()
        restored = self.restore(corrupted, steps, create_graph=create_graph, grad_scale=grad_scale)
        step_losses = [self.loss_fn(_at_least_fp32(x), _at_least_fp32(clean)) for x in restored]
        baseline = self.loss_fn(_at_least_fp32(corrupted), _at_least_fp32(clean)).detach()
        return Restoration(torch.stack(step_losses).sum(), step_losses, [x.detach() for x in restored], baseline)
