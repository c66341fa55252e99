"""Process setup: devices, seeds, precision, and runs under ``torchrun`` (DDP). A plain
``python`` run is a world of one process, so the same code path serves both."""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from .errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_distributed(device: str = "auto") -> World:
    """Join the process group that ``torchrun`` describes in the environment, if any
    (NCCL on GPUs, gloo on CPUs)."""
    check_device(device)
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return world


def check_device(name: str) -> None:
    """``--device`` names a device this machine has, else one error line naming those it has."""
    kind, _, index = name.partition(":")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    available = ["auto", "cpu", *(["cuda"] if gpus else []), *(f"cuda:{i}" for i in range(gpus))]
    if name in ("auto", "cpu") or (kind == "cuda" and gpus and (not index or index.isdigit() and int(index) < gpus)):
        return
    why = "no GPU is available here" if kind == "cuda" and not gpus else f"unknown device '{name}'"
    raise UserError(f"--device {name}: {why}; available: {', '.join(available)}")


def resolve_device(name: str, world: World) -> torch.device:
    check_device(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world.distributed:
        return torch.device("cuda", world.local_rank)
    return torch.device(name)


def all_finite(value: torch.Tensor, world: World) -> bool:
    """True when ``value`` is finite on every process (all must agree before stopping)."""
    flag = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
    if world.distributed:
        flag = flag.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def _reduce_across(value: float, world: World, op: dist.ReduceOp.RedOpType) -> float:
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=op)
    return t.item()


def mean_across(value: float, world: World) -> float:
    """Average a Python number over processes (for logging)."""
    return _reduce_across(value, world, dist.ReduceOp.SUM) / world.size if world.distributed else value


def max_across(value: float, world: World) -> float:
    """The largest value over processes (so that all stop at the same step)."""
    return _reduce_across(value, world, dist.ReduceOp.MAX) if world.distributed else value


def sum_across(values: torch.Tensor, world: World) -> torch.Tensor:
    """Elementwise sum over processes, in float64 (counts of images stay exact)."""
    values = values.detach().to(torch.float64)
    if not world.distributed:
        return values
    reduced = values.to("cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(reduced)
    return reduced.cpu()


def broadcast_buffers(module: torch.nn.Module, world: World) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every process, so that all score one model."""
    if world.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, 0)


def shard(dataset: Dataset, world: World) -> Dataset:
    """This process's share of ``dataset`` for scoring: every ``size``-th item from its rank, so
    that the shards hold each item exactly once (no padding repeats one in the counts)."""
    return Subset(dataset, range(world.rank, len(dataset), world.size)) if world.distributed else dataset  # type: ignore[arg-type]


def gather_shards(values: torch.Tensor, world: World) -> torch.Tensor | None:
    """On the main process, every process's :func:`shard` of rows put back in dataset order
    (shard r holds items r, r + size, ...); None on the others."""
    if not world.distributed:
        return values
    parts: list[Any] | None = [None] * world.size if world.is_main else None
    dist.gather_object(values.cpu(), parts, dst=0)
    if parts is None:
        return None
    whole = values.new_empty((sum(len(part) for part in parts), *values.shape[1:]), device="cpu")
    for rank, part in enumerate(parts):
        whole[rank :: world.size] = part
    return whole


def barrier(world: World) -> None:
    """Wait until every process gets here (files one process writes are then complete)."""
    if world.distributed:
        dist.barrier()


def cleanup(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device: str) -> Iterator[World]:
    """The command's world (see :func:`init_distributed`), left cleanly however the command ends."""
    world = init_distributed(device)
    try:
        yield world
    finally:
        cleanup(world)


def loader_workers(requested: int | None, device: torch.device, world: World) -> int:
    """``--num-workers``, else none on a CPU (workers would compete with training for its cores)
    and on a GPU the CPUs shared among this machine's processes, at most 8, so decoding and
    augmentation keep up with the model."""
    if requested is not None:
        return requested
    if device.type != "cuda":
        return 0
    per_node = max(1, torch.cuda.device_count()) if world.distributed else 1
    return max(1, min(8, (os.cpu_count() or 1) // per_node - 1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def random_states(world: World) -> list[dict[str, Any]]:
    """Every process's random states (torch CPU and CUDA, numpy, Python), rank by rank, for a
    checkpoint: dropout, drop-path and Langevin noise then continue as if never interrupted.
    A collective call under DDP."""
    _, numpy_keys, numpy_pos, *_ = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(numpy_keys.astype(np.int64)),
        "numpy_pos": int(numpy_pos),
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if not world.distributed:
        return [state]
    gathered: list[Any] = [None] * world.size
    dist.all_gather_object(gathered, state)
    return gathered


def set_random_states(states: list[dict[str, Any]], world: World) -> None:
    """Restore this process's share of :func:`random_states` (same number of processes)."""
    if len(states) != world.size:
        raise ValueError(f"the checkpoint holds random states of {len(states)} process(es), this run has {world.size}")
    state = states[world.rank]
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class StopRequest:
    """While active, SIGINT and SIGTERM ask the run to stop after the current step (which then
    saves a checkpoint) instead of killing it; a second SIGINT stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.asked = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.asked and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.asked = True
        name = signal.Signals(signum).name
        print(f"\n{name}: stopping after this step, with a checkpoint (Ctrl-C again stops at once)", file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resume_hint(command: str, out: Path, step: int, world: World) -> str:
    """The line printed when a signal stopped a run of ``command``: where the work is and how to go on."""
    launcher = " (under torchrun, as before)" if world.distributed else ""
    return (
        f"interrupted at step {step}; checkpoint saved in {out}. Resume with: "
        f"energyssl {command} --config {out / 'config.yaml'} --resume{launcher}"
    )


def stop_agreed(asked: bool, world: World) -> bool:
    """Whether any process was asked to stop, so that all stop at the same step."""
    return max_across(float(asked), world) > 0 if world.distributed else asked
