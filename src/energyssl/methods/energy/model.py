"""The energy objective: E(x) = head(backbone(x)); a corrupted input is restored by
gradient steps on the input, x <- x - alpha * dE/dx, and the loss is each step's
distance to the clean input.

The forward pass of the backbone is the encoder and its backward pass the decoder,
so no decoder parameters exist. Parameters learn through dE/dx: the parameter gradient of
the loss is a mixed second derivative of E. Two ways compute it (``grad_mode``):

- ``exact``: the input gradient is taken with ``create_graph=True`` and the loss is
  backpropagated through it (double backward; needs the math attention kernel).
- ``fast``: d/dtheta [v . dE/dx] is the derivative of dE/dtheta along v, taken as a forward
  finite difference of two ordinary backward passes; the first is the pass that gives dE/dx.
  No double backward, any attention kernel, one activation graph alive at a time. Both
  passes run in true float32 (TF32 off): its rounding is the size of the difference measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from .precision import full_float32

DEFAULT_ALPHA = 1.0
ALPHA_CALIBRATION = 0.5  # share of the corruption the first step covers at the start (--alpha-init auto)
DEFAULT_HEAD_STD = 1.0
GRAD_MODES = ("exact", "fast")
# Fast mode's finite-difference step: the perturbation's RMS relative to the input's. The
# forward difference errs by O(step) (curvature) plus O(float32 eps / step) (rounding); 1e-3
# balances the two (see tests/test_fast_mode.py and benchmarks/results/fast_mode_fidelity.md).
FD_STEP = 1e-3


@dataclass
class Restoration:
    """Result of one restoration pass: the summed loss, every step (detached), and the loss of
    the unrestored input for reference."""

    loss: Tensor
    step_losses: list[Tensor]
    steps: list[Tensor]
    baseline: Tensor | None = None


def batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def batchnorm_uses_running_stats(module: nn.Module) -> Iterator[None]:
    """Put BatchNorm layers in eval mode so one image's energy does not depend on its batch."""
    norms = [m for m in batchnorms(module) if m.training]
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
    return bool(batchnorms(module))


NON_SMOOTH_LAYERS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool2d,
)  # fmt: skip


def non_smooth_layers(module: nn.Module) -> list[str]:
    """Kinked layers (ReLU, max-pool): their gradient jumps, so fast mode's finite difference of
    gradients does not converge to the exact mixed derivative (which ignores the jumps)."""
    return sorted({type(m).__name__ for m in module.modules() if isinstance(m, NON_SMOOTH_LAYERS)})


def perturb_zero_biases_before_norms(backbone: nn.Module, std: float = 0.02) -> list[nn.Module]:
    """Give a small random start to the zero bias of each convolution that feeds a LayerNorm
    (ConvNeXt's stem and blocks). Masked pixels are 0 after normalisation, so such a convolution
    outputs the same (zero) vector there, and a LayerNorm of a constant vector divides by
    sqrt(eps): dE/dx starts near 1e9 and no restoration can learn. Returns the layers changed."""
    changed = []
    for parent in backbone.modules():
        children = list(parent.children())
        for conv, after in zip(children, children[1:], strict=False):
            bias = getattr(conv, "bias", None)
            if isinstance(conv, nn.Conv2d) and isinstance(after, nn.LayerNorm) and bias is not None:
                if not bias.detach().any():
                    with torch.no_grad():
                        bias.normal_(std=std)
                    changed.append(conv)
    return changed


def _rms(x: Tensor) -> Tensor:
    return x.detach().float().pow(2).mean().sqrt()


RandomState = tuple[Tensor, Tensor | None]


def _random_state(device: torch.device) -> RandomState:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_random_state(state: RandomState, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextmanager
def _replayed_randomness(state: RandomState, device: torch.device) -> Iterator[None]:
    """Run a block with an earlier random state, then continue where we were: the second pass
    of a finite difference draws the same dropout and drop-path masks as the first (a difference
    of two different networks would be noise)."""
    now = _random_state(device)
    _set_random_state(state, device)
    try:
        yield
    finally:
        _set_random_state(now, device)


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
        grad_mode: str = "exact",
    ) -> None:
        super().__init__()
        if alpha_init <= 0:
            raise ValueError(f"alpha_init must be positive, got {alpha_init}")
        if grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got '{grad_mode}'")
        self.grad_mode = grad_mode
        self.checkpoint_steps = False  # --grad-checkpointing in exact mode (see restore)
        self.functional = False  # --compile: dE/dx by torch.func (see energy_grad)
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
        perturb_zero_biases_before_norms(backbone)

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
        the input gradient, unscale after.

        ``functional`` (``--compile``): the differentiable gradient is ``torch.func.grad``'s (the
        same numbers as ``autograd.grad(create_graph=True)``, to the bit in eager), which dynamo
        traces into the forward graph and whose double backward AOT autograd derives; there
        ``autograd.grad`` on a ``requires_grad_()`` input breaks the graph. Checkpointing needs
        autograd's saved-tensor hooks, which ``torch.func`` lacks, so eager runs keep autograd."""
        energy_fn = energy_fn or self.energy
        # fused attention kernels have no double backward; the math kernel does
        kernel = sdpa_kernel(SDPBackend.MATH) if create_graph else nullcontext()
        with torch.enable_grad(), kernel:
            if create_graph and self.functional:
                grad = torch.func.grad(lambda v: energy_fn(v).sum() * grad_scale)(x.detach())
            else:
                x = x.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(energy_fn(x).sum() * grad_scale, x, create_graph=create_graph)
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
        restored = []
        x = x0
        with self._running_stats():
            for _ in range(steps):
                if create_graph and self.checkpoint_steps:
                    grad = checkpoint(self._checkpointed_grad, x, grad_scale, energy_fn, use_reentrant=False)
                else:
                    grad = self.energy_grad(x, create_graph, grad_scale, energy_fn)
                x = self._step(x.detach(), grad, self.alpha)
                restored.append(x)
        return restored

    def _checkpointed_grad(self, x: Tensor, grad_scale: float, energy_fn: Callable[[Tensor], Tensor] | None) -> Tensor:
        """One step's dE/dx with its graph for the double backward, run under checkpointing: the
        graph (forward and input gradient) is dropped and rebuilt in the backward pass, so one
        step's is alive at a time instead of K. timm's block checkpointing cannot do this: its
        recomputation inside a double backward fails. The recomputation runs after ``restore``
        has put BatchNorm back in training mode, so it sets the running statistics itself."""
        with self._running_stats():
            return self.energy_grad(x, True, grad_scale, energy_fn)

    @torch.no_grad()
    def prime_batchnorm(self, clean: Tensor) -> None:
        """Set BatchNorm running statistics to a clean batch's before the first step. The energy
        passes use them; left at their initial (0, 1) they move to the data's within a few dozen
        steps, dE/dx grows with them, and steps sized at the start overshoot ever more."""
        norms = batchnorms(self.backbone)
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: this batch's statistics exactly
        training = self.backbone.training
        self.backbone.train()(clean)
        self.backbone.train(training)
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum

    def calibrate_alpha(self, corrupted: Tensor, clean: Tensor, fraction: float = ALPHA_CALIBRATION) -> float:
        """Set alpha so that the first step covers ``fraction`` of the corruption (in RMS) on this
        batch, and return it. dE/dx shrinks as inputs grow (23x smaller RMS for ViT-S/16 at 224 px
        than for the 28 px preset), and alpha, learned in log space at the network's lr, would take
        thousands of steps to make up for it: restoration, and so learning, would stall."""
        with self._running_stats():
            grad = self.energy_grad(corrupted)
        alpha = fraction * _rms(corrupted - clean) / torch.clamp(_rms(grad), min=1e-12)
        with torch.no_grad():
            self.log_alpha.fill_(alpha.log().item())
        return self.alpha.item()

    def _running_stats(self) -> AbstractContextManager:
        return batchnorm_uses_running_stats(self.backbone) if self._has_batchnorm else nullcontext()

    def _step(self, x: Tensor, grad: Tensor, alpha: Tensor) -> Tensor:
        x = x - alpha * grad
        return x + self.langevin_std * torch.randn_like(x) if self.langevin_std > 0 else x

    def restoration_loss(
        self,
        start: Tensor,
        target_loss: Callable[[Tensor], Tensor],
        steps: int = 2,
        grad_scale: float = 1.0,
        energy_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> Restoration:
        """Restore ``start`` and score each step with ``target_loss``; with gradients enabled the
        summed loss is differentiable in the parameters (by ``grad_mode``)."""
        baseline = target_loss(start).detach()
        if torch.is_grad_enabled() and self.grad_mode == "fast":
            loss, step_losses, restored = self._fast_restoration(start, target_loss, steps, grad_scale, energy_fn)
        else:
            restored = self.restore(start, steps, torch.is_grad_enabled(), grad_scale, energy_fn)
            step_losses = [target_loss(x) for x in restored]
            loss = torch.stack(step_losses).sum()
        return Restoration(loss, step_losses, [x.detach() for x in restored], baseline)

    def _fast_restoration(
        self,
        start: Tensor,
        target_loss: Callable[[Tensor], Tensor],
        steps: int,
        grad_scale: float,
        energy_fn: Callable[[Tensor], Tensor] | None,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Step k's loss L_k(x_k - alpha g(x_k)) has parameter gradient -alpha d/dtheta [v . g]
        with v = dL_k/dx_{k+1}, i.e. -alpha (dE/dtheta(x_k + eps v) - dE/dtheta(x_k)) / eps.
        The parameter gradients are computed here and injected into the returned loss as
        sum(p * grad) - its value, so one ordinary backward (under DDP too) applies them;
        alpha's gradient flows through the step as usual."""
        energy_fn = energy_fn or self.energy
        params = [p for p in self.parameters() if p.requires_grad and p is not self.log_alpha]
        alpha = self.alpha
        totals: list[Tensor | None] = [None] * len(params)
        step_losses, restored = [], []
        x = start.detach()
        with self._running_stats(), full_float32():
            for _ in range(steps):
                randomness = _random_state(x.device)
                with torch.enable_grad():
                    x.requires_grad_(True)
                    grad_x, *at_x = torch.autograd.grad(
                        energy_fn(x).sum() * grad_scale, [x, *params], allow_unused=True
                    )
                    x = x.detach()
                    x_next = self._step(x, grad_x.detach() / grad_scale, alpha)
                    step_loss = target_loss(x_next)
                    (v,) = torch.autograd.grad(step_loss, x_next, retain_graph=True)
                v_rms = _rms(v)
                if v_rms > 0:  # a perfect restoration step has no parameter gradient
                    eps = FD_STEP * torch.clamp(_rms(x), min=1e-3) / v_rms
                    with _replayed_randomness(randomness, x.device), torch.enable_grad():
                        shifted = energy_fn(x + eps * v)
                        at_shifted = torch.autograd.grad(shifted.sum() * grad_scale, params, allow_unused=True)
                    scale = -alpha.detach() / (eps * grad_scale)
                    for i, (before, after) in enumerate(zip(at_x, at_shifted, strict=True)):
                        if before is not None:
                            change = (after - before) * scale
                            totals[i] = change if totals[i] is None else totals[i] + change
                step_losses.append(step_loss)
                restored.append(x_next)
                x = x_next.detach()
        injected = torch.zeros((), device=start.device)
        for p, total in zip(params, totals, strict=True):
            if total is not None:
                injected = injected + (p * total).sum()
        return torch.stack(step_losses).sum() + (injected - injected.detach()), step_losses, restored

    def forward(self, clean: Tensor, corrupted: Tensor, steps: int = 2, grad_scale: float = 1.0) -> Restoration:
        """Restoration loss sum_k loss(x_k, clean); differentiable in the parameters."""
        if self._has_batchnorm and self.training:
            with torch.no_grad():
                self.backbone(clean)  # update BatchNorm running statistics from clean images
        target = _at_least_fp32(clean)
        return self.restoration_loss(corrupted, lambda x: self.loss_fn(_at_least_fp32(x), target), steps, grad_scale)
