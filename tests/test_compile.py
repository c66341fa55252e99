"""``--compile``: parameter gradients of the compiled step equal eager's (the energy method's
double backward included: K=1, K=2, masking, mixed, sorting, a BatchNorm backbone; MAE), no
recompilation after the first steps, short compiled runs that log eager's losses (pretrain,
finetune, probe; under torchrun too), and a compiler failure that costs one line, not the run.

Most tests compile with ``aot_eager`` (dynamo's graph and AOT autograd's backward, without
generating code): seconds per model instead of a minute on these CPUs. Inductor's generated code
is checked once here (the energy step at K=2), and by the compiled rows of
``benchmarks/step_cost.py`` and ``benchmarks/gpu_check.py`` (their gradient cosine)."""

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import TORCHRUN
from energyssl import create_backbone
from energyssl.cli import main
from energyssl.methods.energy.method import EnergyMethod
from energyssl.methods.energy.model import EnergyModel
from energyssl.methods.mae import MAE
from energyssl.metrics import read_metrics

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--model", "essl_vit_micro_patch7", "--batch-size", "8", "--log-every", "1", "--no-tensorboard"]
ENERGY = [*TINY, "--task", "grid_mask", "--steps", "2", "--grad-mode", "exact", "--vis-every", "0"]


def energy(model: str = "essl_vit_micro_patch7", task: str = "grid_mask", steps: int = 2) -> EnergyMethod:
    torch.manual_seed(0)
    backbone = create_backbone(model, img_size=28, in_chans=1)
    return EnergyMethod.around(EnergyModel(backbone, grad_mode="exact"), task=task, steps=steps)


def gradients(method: torch.nn.Module, images: torch.Tensor, seed: int = 1) -> tuple[float, list[torch.Tensor]]:
    method.train()
    method.zero_grad(set_to_none=True)
    out = method([images], torch.Generator().manual_seed(seed))
    out.loss.backward()
    return out.loss.item(), [p.grad.clone() for p in method.parameters() if p.grad is not None]


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: energy(steps=1), id="energy-K1"),
        pytest.param(lambda: energy(steps=2), id="energy-K2"),
        pytest.param(lambda: energy(task="mixed"), id="energy-mixed"),
        pytest.param(lambda: energy(task="sorting"), id="energy-sorting"),
        pytest.param(lambda: energy(model="essl_resnet_tiny"), id="energy-batchnorm"),
        pytest.param(lambda: MAE(create_backbone("essl_vit_micro_patch7", img_size=28, in_chans=1)), id="mae"),
    ],
)
def test_compiled_gradients_equal_eager(build):
    eager = build()
    compiled = copy.deepcopy(eager)  # BatchNorm statistics move with each step: two equal copies
    compiled.compile_step("aot_eager", announce=False)
    images = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    (loss, expected), (compiled_loss, got) = gradients(eager, images), gradients(compiled, images)
    assert compiled_loss == pytest.approx(loss, rel=1e-6) and len(got) == len(expected) > 0
    for a, b in zip(expected, got, strict=True):
        assert (a - b).norm() <= 1e-5 * a.norm() + 1e-12


def test_inductors_code_gives_eagers_gradients():
    """The default backend's generated code, once (it takes a minute to compile on a CPU): the
    exact energy step at K=2 on a masking task."""
    eager = energy(steps=2)
    compiled = copy.deepcopy(eager)
    compiled.compile_step("inductor", announce=False)
    images = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    (loss, expected), (compiled_loss, got) = gradients(eager, images), gradients(compiled, images)
    assert compiled_loss == pytest.approx(loss, rel=1e-5)
    for a, b in zip(expected, got, strict=True):
        assert (a - b).norm() <= 1e-5 * a.norm() + 1e-9


def test_the_energy_step_compiles_once(monkeypatch):
    """Five steps on new images and corruptions: every graph is compiled in the first two."""
    compiled_graphs = []

    def counting(graph, example_inputs):  # a torch.compile backend that runs the graph as traced
        compiled_graphs.append(graph)
        return graph.forward

    method = energy(task="mixed")
    method.compile_step(counting, announce=False)
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    seen = []
    for step in range(5):
        optimizer.zero_grad()
        gradients(method, torch.randn(8, 1, 28, 28), seed=step)
        optimizer.step()
        seen.append(len(compiled_graphs))
    assert seen[1] > 0 and seen[-1] == seen[1], seen


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_a_compiled_pretraining_logs_the_losses_of_an_eager_one(tmp_path, capsys):
    for name, extra in (("eager", []), ("compiled", ["--compile", "aot_eager"])):
        assert main(["pretrain", *ENERGY, "--max-steps", "4", "--out", str(tmp_path / name), *extra]) == 0
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)
    assert len(losses(tmp_path / "eager")) == 4


@pytest.mark.parametrize("amp", ["bf16", "fp16"])  # fp16: with dE/dx's own loss scale
def test_autocast_compiles_to_the_eager_losses(tmp_path, amp):
    for name, extra in (("eager", []), ("compiled", ["--compile", "aot_eager"])):
        args = ["pretrain", *ENERGY, "--amp", amp, "--max-steps", "3", "--out", str(tmp_path / name), *extra]
        assert main(args) == 0
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-3)
    if amp == "fp16":
        assert "input_grad_scale" in read_metrics(tmp_path / "compiled" / "metrics.jsonl")[-1]


@pytest.mark.parametrize("command", ["finetune", "segment"])
def test_a_compiled_finetune_logs_the_losses_of_an_eager_one(tmp_path, command):
    args = [command, *TINY, "--label-fraction", "0.02", "--epochs", "1", "--max-steps", "3"]
    args += ["--mixup", "0", "--cutmix", "0", "--drop-path", "0"] if command == "finetune" else ["--img-size", "28"]
    for name, extra in (("eager", []), ("compiled", ["--compile", "aot_eager"])):
        assert main([*args, "--out", str(tmp_path / name), *extra]) == 0
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)


def test_a_compiled_probe_extracts_the_same_features(tmp_path):
    for name, extra in (("eager", []), ("compiled", ["--compile", "aot_eager"])):
        args = ["probe", "--protocol", "knn", "--model", "essl_vit_micro_patch7", "--label-fraction", "0.05"]
        assert main([*args, "--out", str(tmp_path / name), *extra]) == 0
    scores = [json.loads((tmp_path / n / "results.json").read_text())["metrics"]["top1"] for n in ("eager", "compiled")]
    assert scores[0] == scores[1]


def test_two_compiled_processes_log_the_losses_of_two_eager_ones(tmp_path):
    for name, extra in (("eager", []), ("compiled", ["--compile", "aot_eager"])):
        cmd = [*TORCHRUN, "-m", "energyssl", "pretrain", *ENERGY, "--max-steps", "3", "--out", str(tmp_path / name)]
        done = subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=300, env=ENV)
        assert done.returncode == 0, done.stderr[-2000:]
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-4)


def test_a_compiler_failure_costs_one_line_not_the_run(tmp_path, monkeypatch, capsys):
    def broken(fn, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("this torch cannot compile that\nsecond line of its story")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    out = tmp_path / "run"
    assert main(["pretrain", *ENERGY, "--max-steps", "2", "--out", str(out), "--compile"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "--compile" in line]
    assert said == ["--compile: EnergyMethod could not be compiled (this torch cannot compile that); running eagerly"]
    assert len(losses(out)) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--compile", "nonsense"], "--compile nonsense: not a torch.compile backend"),
        (["--compile", "--grad-checkpointing"], "--compile and --grad-checkpointing do not combine"),
    ],
)
def test_compile_options_that_cannot_work_are_refused(tmp_path, capsys, args, message):
    assert main(["pretrain", *ENERGY, "--max-steps", "1", "--out", str(tmp_path / "run"), *args]) == 2
    assert message in capsys.readouterr().err
