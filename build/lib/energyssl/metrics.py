"""Metrics: appended as JSON lines (one object per logged step) and, optionally, to TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Writes ``metrics.jsonl`` in the run folder; only the main process should own one."""

    def __init__(self, out: Path, tensorboard: bool = True) -> None:
        self.path = out / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def forget_after(self, step: int) -> None:
        """Drop records logged after ``step``: a resumed run repeats the steps after its checkpoint."""
        if self.path.is_file():
            kept = [r for r in read_metrics(self.path) if r["step"] <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, step: int, values: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
