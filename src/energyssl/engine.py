"""The training engine: one epoch of a method's loss, read top to bottom."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from .distributed import World, all_finite, max_across, mean_across, stop_agreed
from .methods.base import Method, StepOutput
from .precision import Precision
from .rng import step_generator
from .schedules import Clock, warmup_cosine


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; the step was not applied."""


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    elapsed: float = 0.0  # seconds spent in training steps (data loading included), for time budgets
    skipped: int = 0  # fp16 steps skipped because dE/dx overflowed


def unwrap(method: nn.Module) -> Method:
    """The method inside DDP."""
    return method.module if isinstance(method, nn.parallel.DistributedDataParallel) else method  # type: ignore[return-value]


@dataclass
class LrSchedule:
    """Linear warmup, then cosine decay over the run's clock (``lr = blr * total batch / 256``)."""

    base_lr: float
    min_lr: float
    warmup_steps: int

    def __call__(self, clock: Clock, state: TrainState) -> float:
        position = clock.position(state.step, state.elapsed)
        return warmup_cosine(position, self.base_lr, self.min_lr, self.warmup_steps, clock.total_steps)


@dataclass
class LoopSettings:
    """How :func:`train_one_epoch` runs: where, on which clock, how far, and whom it reports to."""

    world: World
    device: torch.device
    clock: Clock
    lr: LrSchedule
    precision: Precision = field(default_factory=Precision)
    seed: int = 0
    clip_grad: float | None = None
    max_steps: int | None = None
    accum_iter: int = 1  # micro-batches per optimizer step
    log_every: int = 10
    save_every: int = 0
    on_log: Callable[[dict[str, float]], None] | None = None  # called on every process (records average)
    on_checkpoint: Callable[[], None] | None = None
    stop_asked: Callable[[], bool] | None = None  # a signal arrived on this process


def train_one_epoch(
    method: nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    loop: LoopSettings,
) -> bool:
    """Optimise the method's loss over ``loader``; ``state.step`` counts optimizer steps
    (fp16 steps skipped for an overflow included, as GradScaler counts them).
    ``method`` is a :class:`~.methods.base.Method`, possibly wrapped in DDP. The learning rate
    and the method's schedules read one clock, ``loop.clock``. Stops early at ``max_steps``,
    when ``state.elapsed`` reaches the clock's time budget, or after the step during which
    ``stop_asked`` became true on any process; returns whether it stopped so."""
    method.train()
    clock = loop.clock
    steps = len(loader) // loop.accum_iter
    bar = tqdm(grouped(loader, loop.accum_iter), total=steps, desc=f"epoch {state.epoch}",
               disable=not loop.world.is_main, dynamic_ncols=True, leave=False)  # fmt: skip
    meter = Throughput()
    step_start = meter.tick
    for micro_batches in bar:  # a step's time includes loading its batches
        if budget_spent(state, loop.max_steps, clock.time_budget):
            break
        lr = loop.lr(clock, state)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        batches = [
            ([v.to(loop.device, non_blocking=True) for v in views],
             step_generator(loop.seed, loop.world.rank, state.step * loop.accum_iter + k, loop.device))
            for k, (views, _) in enumerate(micro_batches)
        ]  # fmt: skip
        out = accumulated_step(method, batches, optimizer, loop.precision, loop.clip_grad, loop.world, state.step)
        state.step += 1
        state.skipped += out is None
        meter.seen += sum(views[0].shape[0] for views, _ in batches)
        state.elapsed += time.perf_counter() - step_start
        if clock.time_budget is not None:  # every process must stop at the same step
            state.elapsed = max_across(state.elapsed, loop.world)
        if out is not None:  # the method's schedules, on the lr's clock; their values are logged
            out.logs.update(unwrap(method).after_step(clock.progress(state.step, state.elapsed)))
        stopping = loop.stop_asked is not None and stop_agreed(loop.stop_asked(), loop.world)
        last = stopping or budget_spent(state, loop.max_steps, clock.time_budget)  # a run's last step is logged
        log_step(method, out, state, lr, loop, meter, bar, last)
        step_start = time.perf_counter()  # checkpoints do not count against the budget
        if stopping:
            bar.close()
            return True
    bar.close()
    return False


def grouped(loader: Iterable, size: int) -> Iterator[list]:
    """Consecutive groups of ``size`` batches (the micro-batches of one step); a last, smaller
    group is dropped, as the loader drops a last, smaller batch."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


@dataclass
class Throughput:
    """Images since the last log line, and when it was written."""

    seen: int = 0
    tick: float = field(default_factory=time.perf_counter)

    def images_per_second(self, world: World) -> float:
        rate = self.seen * world.size / (time.perf_counter() - self.tick)
        self.seen, self.tick = 0, time.perf_counter()
        return rate


def log_step(
    method: nn.Module, out: StepOutput | None, state: TrainState, lr: float, loop: LoopSettings, meter: Throughput,
    bar: tqdm, last: bool,
) -> None:  # fmt: skip
    """After a step: the progress bar, the metrics record every ``log_every`` steps (and on a
    run's last step), and a checkpoint every ``save_every`` (not counted in the time budget)."""
    if out is not None:
        shown = {key: f"{_number(out.logs[key]):.3f}" for key in unwrap(method).shown if key in out.logs}
        bar.set_postfix({"loss": f"{out.loss.item():.4f}", "lr": f"{lr:.2e}"} | shown)
    if loop.on_log is not None and out is not None and (state.step % loop.log_every == 0 or last):
        rate = meter.images_per_second(loop.world)
        loop.on_log(step_record(out, state, lr, rate, loop.precision, loop.world))
    if loop.on_checkpoint is not None and loop.save_every and state.step % loop.save_every == 0:
        loop.on_checkpoint()


def accumulated_step(
    method: nn.Module,
    batches: list[tuple[list[torch.Tensor], torch.Generator]],
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    clip_grad: float | None,
    world: World,
    step: int,
) -> StepOutput | None:
    """One optimizer step on the gradients of several micro-batches (each one's loss divided by
    their number, so N micro-batches of B images make the step of one batch of N x B; DDP
    synchronises on the last only). Returns the micro-batches' mean loss and logs, or None when
    the method skips a non-finite step (a loss scale of its own backed off, as GradScaler skips
    steps whose parameter gradients overflow)."""
    optimizer.zero_grad(set_to_none=True)
    outs = []
    for index, (views, generator) in enumerate(batches):
        last = index == len(batches) - 1
        with nullcontext() if last or not hasattr(method, "no_sync") else method.no_sync():
            with precision.autocast(views[0].device):
                out = method(views, generator)
            finite = all_finite(out.loss, world)
            if unwrap(method).skip_step(finite):
                optimizer.zero_grad(set_to_none=True)
                return None
            if not finite:
                raise NonFiniteLoss(f"loss is {out.loss.item()} at step {step}")
            precision.backward(out.loss if len(batches) == 1 else out.loss / len(batches))
        outs.append(out)
    precision.step(optimizer, clip_grad, method.parameters())
    return outs[0] if len(outs) == 1 else mean_output(outs)


def mean_output(outs: list[StepOutput]) -> StepOutput:
    """The mean loss and logs of micro-batches (detached: they are only logged)."""
    loss = torch.stack([out.loss.detach() for out in outs]).mean()
    logs = {key: sum(_number(out.logs[key]) for out in outs) / len(outs) for key in outs[0].logs}
    return StepOutput(loss, logs)


def step_record(
    out: StepOutput, state: TrainState, lr: float, img_per_s: float, precision: Precision, world: World
) -> dict[str, float]:
    """What ``metrics.jsonl`` holds for a step (the method's values averaged over processes)."""
    record = {
        "epoch": state.epoch,
        "loss": mean_across(out.loss.item(), world),
        **{name: mean_across(_number(value), world) for name, value in out.logs.items()},
        "lr": lr,
        "img_per_s": img_per_s,
    }
    if precision.scaler is not None:
        record["grad_scale"] = precision.scaler.get_scale()
        record["skipped_steps"] = state.skipped
    return record


def _number(value: torch.Tensor | float) -> float:
    return value.item() if isinstance(value, torch.Tensor) else float(value)


def budget_spent(state: TrainState, max_steps: int | None, time_budget: float | None) -> bool:
    return (max_steps is not None and state.step >= max_steps) or (
        time_budget is not None and state.elapsed >= time_budget
    )
