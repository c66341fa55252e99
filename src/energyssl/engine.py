"""The training engine: one epoch of a method's loss, read top to bottom."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from .corruptions import Corruption
from .distributed import World, all_finite, max_across, mean_across, stop_agreed
from .energy import EnergyModel
from .methods.base import Method, StepOutput
from .precision import Precision
from .sorting import PatchSorting, restore_positions, sorting_accuracy


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; the step was not applied."""


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    elapsed: float = 0.0  # seconds spent in training steps (data loading included), for time budgets
    skipped: int = 0  # fp16 steps skipped because dE/dx overflowed


def cosine_lr(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup, then half-cycle cosine decay to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def corruption_generator(seed: int, rank: int, step: int, device: torch.device | None = None) -> torch.Generator:
    """A generator fixed by (seed, rank, step): a resumed run corrupts exactly as the original.
    It lives on the batch's device, so corruptions draw their noise there (no host copy)."""
    return torch.Generator(device=device or "cpu").manual_seed(seed * 1_000_003 + rank * 7_919 + step)


def unwrap(method: nn.Module) -> Method:
    """The method inside DDP."""
    return method.module if isinstance(method, nn.parallel.DistributedDataParallel) else method  # type: ignore[return-value]


def step_size(method: nn.Module) -> float | None:
    """alpha of the energy model inside a (possibly DDP-wrapped) method; None for the others."""
    model = getattr(unwrap(method), "model", None)
    return model.alpha.item() if isinstance(model, EnergyModel) else None


@dataclass
class Loop:
    """How :func:`train_one_epoch` runs: where, how far, and whom it reports to."""

    world: World
    device: torch.device
    precision: Precision = field(default_factory=Precision)
    seed: int = 0
    clip_grad: float | None = None
    max_steps: int | None = None
    time_budget: float | None = None  # seconds of training steps
    log_every: int = 10
    save_every: int = 0
    on_log: Callable[[dict[str, float]], None] | None = None  # called on every process (records average)
    on_checkpoint: Callable[[], None] | None = None
    stop_asked: Callable[[], bool] | None = None  # a signal arrived on this process


def train_one_epoch(
    objective: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    lr_at: Callable[[int], float],
    state: TrainState,
    loop: Loop,
) -> bool:
    """Optimise the method's loss over ``loader``; ``state.step`` counts optimizer steps
    (fp16 steps skipped for an overflow included, as GradScaler counts them).
    ``objective`` is a :class:`~.methods.base.Method`, possibly wrapped in DDP. Stops early at
    ``max_steps``, when ``state.elapsed`` reaches ``time_budget`` seconds, or after the step
    during which ``stop_asked`` became true on any process; returns whether it stopped so."""
    objective.train()
    bar = tqdm(loader, desc=f"epoch {state.epoch}", disable=not loop.world.is_main, dynamic_ncols=True, leave=False)
    meter = Throughput()
    step_start = meter.tick
    for views, _ in bar:  # a step's time includes loading its batch
        if budget_spent(state, loop.max_steps, loop.time_budget):
            break
        lr = lr_at(state.step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        views = [v.to(loop.device, non_blocking=True) for v in views]
        generator = corruption_generator(loop.seed, loop.world.rank, state.step, loop.device)
        out = train_step(objective, views, generator, optimizer, loop.precision, loop.clip_grad, loop.world, state.step)
        state.step += 1
        state.skipped += out is None
        if out is not None:
            unwrap(objective).after_step(state.step / loop.max_steps if loop.max_steps else 0.0)
        meter.seen += views[0].shape[0]
        state.elapsed += time.perf_counter() - step_start
        if loop.time_budget is not None:  # every process must stop at the same step
            state.elapsed = max_across(state.elapsed, loop.world)
        stopping = loop.stop_asked is not None and stop_agreed(loop.stop_asked(), loop.world)
        last = stopping or budget_spent(state, loop.max_steps, loop.time_budget)  # a run's last step is logged
        report(objective, out, state, lr, loop, meter, bar, last)
        step_start = time.perf_counter()  # checkpoints do not count against the budget
        if stopping:
            bar.close()
            return True
    bar.close()
    return False


@dataclass
class Throughput:
    """Images since the last log line, and when it was written."""

    seen: int = 0
    tick: float = field(default_factory=time.perf_counter)

    def images_per_second(self, world: World) -> float:
        rate = self.seen * world.size / (time.perf_counter() - self.tick)
        self.seen, self.tick = 0, time.perf_counter()
        return rate


def report(
    objective: nn.Module, out: StepOutput | None, state: TrainState, lr: float, loop: Loop, meter: Throughput,
    bar: tqdm, last: bool,
) -> None:  # fmt: skip
    """After a step: the progress bar, the metrics record every ``log_every`` steps (and on a
    run's last step), and a checkpoint every ``save_every`` (not counted in the time budget)."""
    alpha = step_size(objective)
    if out is not None:
        postfix = {"loss": f"{out.loss.item():.4f}", "lr": f"{lr:.2e}"}
        bar.set_postfix(postfix | ({} if alpha is None else {"alpha": f"{alpha:.3f}"}))
    if loop.on_log is not None and out is not None and (state.step % loop.log_every == 0 or last):
        rate = meter.images_per_second(loop.world)
        loop.on_log(step_record(out, state, lr, alpha, rate, loop.precision, loop.world))
    if loop.on_checkpoint is not None and loop.save_every and state.step % loop.save_every == 0:
        loop.on_checkpoint()


def train_step(
    objective: nn.Module,
    views: list[torch.Tensor],
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    clip_grad: float | None,
    world: World,
    step: int,
) -> StepOutput | None:
    """One optimizer step. Returns None when fp16's dE/dx overflowed: the step is skipped and
    its scale halved (GradScaler likewise skips steps whose parameter gradients overflow)."""
    with precision.autocast(views[0].device):
        out = objective(views, generator)
    finite = all_finite(out.loss, world)
    if precision.input_scale is not None:
        precision.input_scale.update(finite)
        if not finite and not precision.input_scale.exhausted:
            return None
    if not finite:
        raise NonFiniteLoss(f"loss is {out.loss.item()} at step {step}")
    optimizer.zero_grad(set_to_none=True)
    precision.backward_and_step(out.loss, optimizer, clip_grad, objective.parameters())
    return out


def step_record(
    out: StepOutput, state: TrainState, lr: float, alpha: float | None, img_per_s: float, precision: Precision,
    world: World,
) -> dict[str, float]:  # fmt: skip
    """What ``metrics.jsonl`` holds for a step (losses averaged over processes)."""
    record = {
        "epoch": state.epoch,
        "loss": mean_across(out.loss.item(), world),
        **{name: mean_across(value.item(), world) for name, value in out.logs.items()},
        **({} if alpha is None else {"alpha": alpha}),
        "lr": lr,
        "img_per_s": img_per_s,
    }
    if precision.scaler is not None:
        record["grad_scale"] = precision.scaler.get_scale()
        record["skipped_steps"] = state.skipped
    if precision.input_scale is not None:
        record["input_grad_scale"] = precision.input_scale.scale
    return record


def budget_spent(state: TrainState, max_steps: int | None, time_budget: float | None) -> bool:
    return (max_steps is not None and state.step >= max_steps) or (
        time_budget is not None and state.elapsed >= time_budget
    )


def evaluate_restoration(
    model: EnergyModel,
    images: torch.Tensor,
    corruptions: dict[str, Corruption],
    steps: int,
    seed: int = 0,
    batch_size: int = 128,
) -> dict[str, dict[str, float]]:
    """Mean squared error to the clean images of each corrupted input and of each restoration
    step, per pixel corruption: the restoration works where ``restored_mse`` < ``corrupted_mse``."""
    model.eval()
    report: dict[str, dict[str, float]] = {}
    for name, corruption in corruptions.items():
        generator = torch.Generator().manual_seed(seed)
        sums = torch.zeros(steps + 1, dtype=torch.float64)
        for start in range(0, len(images), batch_size):
            clean = images[start : start + batch_size]
            corrupted = corruption(clean, generator)
            restored = model.restore(corrupted, steps)
            for k, x in enumerate([corrupted, *restored]):
                sums[k] += ((x.detach() - clean) ** 2).mean(dim=(1, 2, 3)).sum().item()
        mse = (sums / len(images)).tolist()
        report[name] = {"corrupted_mse": mse[0], **{f"step{k}_mse": v for k, v in enumerate(mse[1:], 1)}}
        report[name]["restored_mse"] = mse[-1]
    return report


def restoration_blocks(
    model: EnergyModel, corruptions: dict[str, Corruption | None], clean: torch.Tensor, steps: int, seed: int
) -> dict[str, tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]]:
    """(corrupted, each restoration step, original) per corruption, as the grids draw them; a
    ``None`` corruption restores ``clean`` as given, with no original to compare."""
    blocks = {}
    for name, corruption in corruptions.items():
        corrupted = clean if corruption is None else corruption(clean, torch.Generator().manual_seed(seed))
        restored = [x.detach() for x in model.restore(corrupted, steps)]
        blocks[name] = (corrupted, restored, None if corruption is None else clean)
    return blocks


def evaluate_sorting(
    model: EnergyModel, sorting: PatchSorting, table: torch.Tensor, images: torch.Tensor, steps: int, seed: int = 0
) -> dict[str, float]:
    """Sorting accuracy on held-out images: share of patches whose embedding is nearest to their
    true position's, for the shuffled input and after each step (no regularisers)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    table = table.to(images)
    totals = torch.zeros(steps + 1, dtype=torch.float64)
    for start in range(0, len(images), 128):
        batch = images[start : start + 128]
        shuffled = table[sorting.permutation(len(batch), table.shape[0], generator, batch.device)]
        with torch.no_grad():  # no graph of the parameters: the input gradient alone is needed
            out = restore_positions(model, table, batch, shuffled, steps)
        for k, positions in enumerate([shuffled, *out.steps]):
            totals[k] += sorting_accuracy(positions, table) * len(batch)
    acc = (totals / len(images)).tolist()
    steps_accuracy = {f"step{k}_accuracy": v for k, v in enumerate(acc[1:], 1)}
    return {"shuffled_accuracy": acc[0], **steps_accuracy, "sorted_accuracy": acc[-1]}
