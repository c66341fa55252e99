"""Schedules: one half cosine, and the one clock of a pretraining run that every schedule reads
(learning rate, EMA momentum, temperatures), for ``--epochs``, ``--max-steps`` and ``--time-budget`` alike."""

from __future__ import annotations

import math
from dataclasses import dataclass


def cosine(start: float, end: float, progress: float) -> float:
    """From ``start`` at progress 0 to ``end`` at 1 along a half cosine (lr decay; the momentum
    schedule of BYOL, DINO, MoCo v3 and I-JEPA)."""
    return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def warmup_cosine(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup, then half-cycle cosine decay to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return cosine(base_lr, min_lr, (step - warmup_steps) / max(1, total_steps - warmup_steps))


@dataclass
class Clock:
    """Where a run stands in its schedule: the share of ``total_steps`` done or, with a time
    budget (seconds), the share of the budget spent. ``--max-steps`` stops a run early without
    moving its clock, so a short run sees the schedule's start, and a resumed one continues it."""

    total_steps: int
    time_budget: float | None = None

    def position(self, step: int, elapsed: float) -> int:
        """The schedule's step: ``step`` itself, or the budget's share of ``total_steps``."""
        if self.time_budget is None:
            return step
        return min(self.total_steps, int(elapsed / self.time_budget * self.total_steps))

    def progress(self, step: int, elapsed: float) -> float:
        """The share of the schedule done, in [0, 1]."""
        if self.time_budget is None:
            return min(1.0, step / self.total_steps)
        return min(1.0, elapsed / self.time_budget)
