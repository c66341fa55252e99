"""Exact resume: a run killed (SIGKILL during a step, during a checkpoint write, or between a
checkpoint and `latest`) or interrupted (SIGINT) and then resumed logs exactly the losses of the
uninterrupted run (bit-identical on CPU: every random state is in the checkpoint, augmentation
is seeded per image and epoch, corruptions per step)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TORCHRUN
from energyssl.metrics import read_metrics

RUN = ["pretrain", "--model", "essl_vit_micro_patch7", "--batch-size", "16", "--task", "grid_mask", "--seed", "3"]
RUN += ["--langevin-std", "0.05", "--save-every", "3", "--log-every", "1", "--no-tensorboard", "--vis-every", "0"]
STEPS = 20
COMPARED = ("loss", "loss_step1", "corrupted_loss", "alpha", "lr")

# Runs the CLI after patching it to SIGKILL itself at a chosen moment: the Nth training step,
# the Nth atomic file write after its data hit the disk but before the rename ("write"), or the
# Nth write before it starts ("publish": with N = 3k, the rewrite of `latest` for checkpoint k).
KILLER = """
import os, signal, sys
import energyssl.checkpoint as ckpt, energyssl.engine as engine
mode, n = sys.argv[1], int(sys.argv[2])
calls = [0]
def counted(original, before):
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            before(args)
        return original(*args, **kwargs)
    return wrapper
def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "step":
    engine.accumulated_step = counted(engine.accumulated_step, die)
elif mode == "publish":
    ckpt.atomic_write = counted(ckpt.atomic_write, die)
else:
    original = ckpt.atomic_write
    def atomic_write(path, write):
        calls[0] += 1
        if calls[0] == n:
            return original(path, lambda p: (write(p), die()))
        return original(path, write)
    ckpt.atomic_write = atomic_write
from energyssl.cli import main
sys.exit(main(sys.argv[3:]))
"""


def cli(*args: str, killer: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    prefix = ["-c", KILLER, *map(str, killer)] if killer else ["-m", "energyssl"]
    return subprocess.run([sys.executable, *prefix, *args], capture_output=True, text=True, timeout=300)


def losses(out: Path) -> dict[int, tuple]:
    records = read_metrics(out / "metrics.jsonl")
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"steps repeated or out of order: {steps}"
    return {r["step"]: tuple(r[k] for k in COMPARED) for r in records}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, tuple]:
    out = tmp_path_factory.mktemp("resume") / "whole"
    done = cli(*RUN, "--max-steps", str(STEPS), "--out", str(out))
    assert done.returncode == 0, done.stderr[-1500:]
    return losses(out)


@pytest.mark.parametrize(
    "moment,call,resumes_at",
    [
        ("step", 8, 6),  # killed in step 8: the checkpoint of step 6 is the latest
        ("write", 5, 3),  # killed after writing step 6's training state, before its rename
        ("publish", 6, 3),  # step 6's checkpoint complete, killed before `latest` points at it
    ],
)
def test_a_killed_run_resumes_exactly(tmp_path, uninterrupted, moment, call, resumes_at):
    out = tmp_path / "run"
    killed = cli(*RUN, "--max-steps", str(STEPS), "--out", str(out), killer=(moment, call))
    assert killed.returncode == -signal.SIGKILL
    resumed = cli(*RUN, "--max-steps", str(STEPS), "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-1500:]
    assert f"at step {resumes_at} " in resumed.stdout
    assert losses(out) == uninterrupted


def signal_after(
    cmd: list[str], out: Path, steps: int, sig: signal.Signals, env: dict | None = None
) -> tuple[int, str]:
    """Start ``cmd``, send ``sig`` once it has logged ``steps`` steps; its exit status and stderr."""
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or len(read_metrics(out / "metrics.jsonl")) < steps:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


def test_sigint_saves_the_step_and_the_printed_command_resumes_exactly(tmp_path, uninterrupted):
    """Also with two loader workers: augmentation does not depend on who computes it."""
    out = tmp_path / "run"
    args = [*RUN, "--max-steps", "400", "--num-workers", "2", "--out", str(out)]
    code, err = signal_after([sys.executable, "-m", "energyssl", *args], out, 5, signal.SIGINT)
    assert code == 130, err[-1500:]
    stopped_at = int(err.split("interrupted at step ")[1].split(";")[0])
    assert (out / "latest").read_text().strip() == f"checkpoint-{stopped_at:08d}"
    command = err.split("Resume with: ")[1].split()
    assert command[:2] == ["energyssl", "pretrain"] and stopped_at < STEPS
    resumed = cli(*command[1:], "--max-steps", str(STEPS))
    assert resumed.returncode == 0, resumed.stderr[-1500:]
    assert losses(out) == uninterrupted


def test_sigterm_under_torchrun_stops_every_rank_at_the_same_step(tmp_path):
    out = tmp_path / "ddp"
    cmd = [*TORCHRUN, "-m", "energyssl", *RUN, "--max-steps", "400", "--out", str(out)]
    _, err = signal_after(cmd, out, 3, signal.SIGTERM, env={**os.environ, "OMP_NUM_THREADS": "1"})
    steps = {int(part.split(";")[0]) for part in err.split("interrupted at step ")[1:]}
    assert err.count("interrupted at step ") == 2 and len(steps) == 1, err[-2000:]  # both ranks, one step
    assert (out / "latest").read_text().strip() == f"checkpoint-{steps.pop():08d}"


@pytest.mark.parametrize(
    "method,options", [("dino", "{local_crops: 2, teacher_temp_warmup: 0.5}"), ("mocov3", "{}"), ("ijepa", "{}")]
)
def test_ema_methods_resume_exactly(tmp_path, method, options):
    """Teacher weights, DINO's centre and temperature schedule are in the checkpoint; the
    momentum is a function of progress: killed in step 5 and resumed, the losses are those of
    the uninterrupted run."""
    run = ["pretrain", "--model", "essl_vit_micro_patch7", "--batch-size", "8", "--method", method, "--seed", "2"]
    run += ["--method-options", options, "--save-every", "2", "--log-every", "1", "--no-tensorboard"]
    run += ["--max-steps", "8", "--epochs", "0.04"]  # 500 steps/epoch: the schedule spans 20 steps
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert cli(*run, "--out", str(whole)).returncode == 0
    assert cli(*run, "--out", str(parts), killer=("step", 5)).returncode == -signal.SIGKILL
    resumed = cli(*run, "--out", str(parts), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-1500:]
    expected = {r["step"]: r["loss"] for r in read_metrics(whole / "metrics.jsonl")}
    got = {r["step"]: r["loss"] for r in read_metrics(parts / "metrics.jsonl")}
    assert got == expected and len(got) == 8
