"""The benchmark scripts' argument handling and a tiny end-to-end run of each (the real
benchmarks are not part of the test suite)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


accuracy = _load("accuracy_per_compute")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--methods", "energy-mixed", "nonsense"], "unknown method(s) nonsense"),
        (["--label-fractions", "0.01", "0.1", "--finetune-epochs", "5"], "one value per --label-fractions"),
        (["--variant", "noequals"], "expects NAME=ARGS"),
        (["--time-budget", "0"], "must be positive"),
    ],
)
def test_accuracy_per_compute_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        accuracy.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_accuracy_per_compute_variants_extend_the_registry():
    args = accuracy.parse_args(["--variant", "lr2x=--method energy --blr 8e-3", "--methods", "lr2x", "mae"])
    assert args.variants["lr2x"] == ["--method", "energy", "--blr", "8e-3"]
    assert args.methods == ["lr2x", "mae"] and "energy-mixed" in args.variants


def test_accuracy_per_compute_tiny_budget_end_to_end_and_resume(tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results.md"
    cmd = [
        sys.executable, str(BENCHMARKS / "accuracy_per_compute.py"), "--data", "embedded",
        "--model", "essl_vit_micro_patch7", "--time-budget", "0.02", "--methods", "energy-fast",
        "--label-fractions", "0.1", "--finetune-epochs", "1", "--seeds", "0", "--probes", "knn",
        "--pretrain-args", "--batch-size 32", "--out", str(out), "--results", str(results),
    ]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in results.read_text().splitlines() if line.startswith("| ")}
    assert {"energy-fast", "scratch"} <= set(rows)
    state_line = rows["energy-fast"].split("|")
    assert "steps" in state_line[2] and int(state_line[3]) > 0  # images seen
    assert json.loads((out / "energy-fast" / "finetune-0.1-seed0" / "results.json").read_text())["metrics"]["top1"] > 0
    assert "grad_mode: fast" in (out / "energy-fast" / "pretrain" / "config.yaml").read_text()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and " s\n" not in second.stdout  # every run was found done and skipped


def test_step_cost_reports_ratios_and_memory(tmp_path):
    out = tmp_path / "cost"
    cmd = [
        sys.executable, str(BENCHMARKS / "step_cost.py"), "--model", "essl_vit_micro_patch7", "--batch-size", "8",
        "--methods", "supervised", "energy K=1 fast", "--repeats", "1", "--iters", "1", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())["results"]
    assert data["supervised"]["cost_ratio"] == 1.0
    assert data["energy K=1 fast"]["img_per_s"] > 0 and data["energy K=1 fast"]["peak_mb"] >= 0
    bad = subprocess.run([*cmd[:2], "--methods", "mae"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "must include supervised" in bad.stderr


def test_gpu_check_smoke_runs_every_section_on_cpu(tmp_path):
    """The device check's code paths, tiny and on CPU, so the script cannot rot between GPU runs."""
    out = tmp_path / "check"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=BENCHMARKS.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "gpu_check.json").read_text())
    sections = ("environment", "step_cost", "predicted", "fidelity", "corruption_memory", "pretraining", "evaluation")
    assert all(isinstance(results[s], (dict, list)) and "error" not in results[s] for s in sections)
    assert all("error" not in row and row["gflops_per_image"] > 0 for row in results["step_cost"])
    assert [r["amp"] for r in results["pretraining"]] == ["bf16", "fp16", "none"]
    assert all(r["exit"] == 0 and r["finite"] for r in results["pretraining"])
    assert all(r["exit"] == 0 for r in results["evaluation"]) and len(results["evaluation"]) == 5
    assert "## Step cost" in (out / "gpu_check.md").read_text()
