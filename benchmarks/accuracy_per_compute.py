"""Accuracy per unit of compute: pretrain each method for the same wall-clock budget, then
fine-tune every encoder and a random init with one recipe on a few label fractions and seeds,
probe them (kNN, linear), and write a Markdown report.

Runs one job at a time through the `energyssl` command line (two trainings at once would
distort each other's speed). A finished run is kept and skipped when the script is rerun, so
an interrupted benchmark continues where it stopped.

    python benchmarks/accuracy_per_compute.py --data fashion-mnist --time-budget 20
    python benchmarks/accuracy_per_compute.py --methods energy-k1 energy-mixed energy-k4  # K ablation
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from energyssl.checkpoint import find_checkpoint, load_training_state

# name -> `energyssl pretrain` arguments; every variant also gets --data, --model and the budget.
# Explicit about K and the gradient so that a change of defaults does not change a variant.
OLD_DEFAULTS = ["--method", "energy", "--task", "mixed", "--steps", "2", "--grad-mode", "exact"]
VARIANTS: dict[str, list[str]] = {
    "energy-defaults": ["--method", "energy"],  # what `energyssl pretrain` does unless told otherwise
    "energy-mixed": OLD_DEFAULTS,
    "energy-masking": [*OLD_DEFAULTS, "--task", "masking"],
    "energy-fast": [*OLD_DEFAULTS, "--grad-mode", "fast"],
    "energy-k1": [*OLD_DEFAULTS, "--steps", "1"],
    "energy-k4": [*OLD_DEFAULTS, "--steps", "4"],
    "mae": ["--method", "mae"],
    "cae": ["--method", "cae"],
}
SCRATCH = "scratch"
DEFAULT_METHODS = ["energy-defaults", "energy-mixed", "energy-masking", "energy-fast", "mae", "cae"]
# One fine-tuning recipe for every init: the paper's without mixup, cutmix and RandAugment,
# which underfit at CPU-sized budgets.
FINETUNE_RECIPE = ["--mixup", "0", "--cutmix", "0", "--randaug", "", "--warmup-epochs", "1"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="fashion-mnist", help="dataset spec, as for `energyssl pretrain --data`")
    parser.add_argument("--model", default="essl_vit_mini_patch7")
    parser.add_argument("--time-budget", type=float, default=20.0, help="pretraining minutes per method")
    parser.add_argument("--epochs", type=int, default=10, help="pretraining epochs the schedule is shaped as")
    parser.add_argument(
        "--methods", nargs="+", default=DEFAULT_METHODS, help=f"pretraining variants: {', '.join(VARIANTS)}"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="define (or redefine) a variant from pretrain arguments, e.g. 'lr2x=--method energy --blr 8e-3'",
    )
    parser.add_argument("--label-fractions", type=float, nargs="+", default=[0.01, 0.1])
    parser.add_argument(
        "--finetune-epochs", type=int, nargs="+", default=[50, 10], help="fine-tune epochs, one per label fraction"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fine-tuning seeds")
    parser.add_argument("--probes", nargs="*", default=["knn", "linear"], choices=["knn", "linear", "mlp", "attentive"])
    parser.add_argument("--pretrain-args", default="", help="extra `energyssl pretrain` arguments for every method")
    parser.add_argument("--finetune-args", default="", help="extra `energyssl finetune` arguments")
    parser.add_argument(
        "--tag", default="", help="suffix of the fine-tune and probe folders, to keep runs of another recipe apart"
    )
    parser.add_argument("--out", default="runs/accuracy-per-compute", help="folder of the runs")
    parser.add_argument(
        "--results", default="benchmarks/results/accuracy_per_compute.md", help="Markdown report to write"
    )
    args = parser.parse_args(argv)
    variants = dict(VARIANTS)
    for spec in args.variant:
        name, sep, flags = spec.partition("=")
        if not sep or not name:
            parser.error(f"--variant expects NAME=ARGS, got '{spec}'")
        variants[name] = shlex.split(flags)
    unknown = [m for m in args.methods if m not in variants]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(variants)} or add --variant")
    if len(args.finetune_epochs) != len(args.label_fractions):
        parser.error("--finetune-epochs needs one value per --label-fractions value")
    if args.time_budget <= 0:
        parser.error("--time-budget must be positive")
    args.variants = variants
    return args


def run(command: list[str], folder: Path) -> None:
    """``energyssl COMMAND`` with its output in folder.log; a failure stops the benchmark."""
    log = folder.with_name(folder.name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.call([sys.executable, "-m", "energyssl", *command], stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"failed ({code}): energyssl {shlex.join(command)}\n  see {log}")
    print(f"  {folder.name}: {time.perf_counter() - start:.0f} s", flush=True)


def pretrain(args: argparse.Namespace, method: str, folder: Path) -> None:
    if (folder / "backbone.safetensors").exists():
        return
    flags = ["--data", args.data, "--model", args.model, "--epochs", str(args.epochs)]
    flags += ["--time-budget", str(args.time_budget), "--warmup-epochs", "0.5", "--no-tensorboard", "--vis-every", "0"]
    flags += shlex.split(args.pretrain_args) + args.variants[method] + ["--out", str(folder)]
    if (folder / "latest").exists():
        flags.append("--resume")
    run(["pretrain", *flags], folder)


def downstream(args: argparse.Namespace, init: Path | None, folder: Path) -> None:
    """Fine-tune per label fraction and seed, then probe (probes see every label)."""
    source = ["--init", str(init) if init else "none", "--data", args.data, "--no-tensorboard"]
    if init is None:
        source += ["--model", args.model]
    for fraction, epochs in zip(args.label_fractions, args.finetune_epochs, strict=True):
        for seed in args.seeds:
            out = folder / f"finetune-{fraction:g}-seed{seed}{args.tag}"
            if not (out / "results.json").exists():
                flags = [*source, "--label-fraction", str(fraction), "--epochs", str(epochs), "--seed", str(seed)]
                flags += FINETUNE_RECIPE + ["--eval-every", str(epochs)] + shlex.split(args.finetune_args)
                run(["finetune", *flags, "--out", str(out)], out)
    for protocol in args.probes:
        out = folder / f"probe-{protocol}{args.tag}"
        if not (out / "results.json").exists():
            run(["probe", *source, "--protocol", protocol, "--out", str(out)], out)


def top1(folder: Path) -> float | None:
    file = folder / "results.json"
    return json.loads(file.read_text())["metrics"]["top1"] if file.exists() else None


def mean_and_spread(values: list[float]) -> str:
    """'mean ± half the range' over seeds (one seed: the value)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {(max(values) - min(values)) / 2:.2f}"


def pretraining_row(folder: Path) -> tuple[str, str, str]:
    """(steps and seconds, images seen, images per second) of a pretraining run."""
    if not (folder / "latest").exists():
        return "-", "-", "-"
    state = load_training_state(find_checkpoint(folder))
    batch = yaml.safe_load((folder / "config.yaml").read_text())["batch_size"]
    seen = state["step"] * batch
    return f"{state['step']} steps, {state['elapsed']:.0f} s", str(seen), f"{seen / max(state['elapsed'], 1e-9):.0f}"


def report(args: argparse.Namespace, root: Path, command: str) -> str:
    fractions = args.label_fractions
    head = ["method", "pretraining", "images seen", "img/s"]
    head += [f"fine-tune {100 * f:g}% labels" for f in fractions] + [f"{p} probe" for p in args.probes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    means: dict[str, dict[float, float]] = {}
    for method in [*args.methods, SCRATCH]:
        folder = root / method
        cells = list(pretraining_row(folder / "pretrain")) if method != SCRATCH else ["-", "0", "-"]
        for fraction in fractions:
            runs = [top1(folder / f"finetune-{fraction:g}-seed{seed}{args.tag}") for seed in args.seeds]
            values = [v for v in runs if v is not None]
            cells.append(mean_and_spread(values))
            if values:
                means.setdefault(method, {})[fraction] = statistics.mean(values)
        probes = [top1(folder / f"probe-{p}{args.tag}") for p in args.probes]
        cells += [mean_and_spread([] if v is None else [v]) for v in probes]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    gaps = []
    for method in args.methods:
        for other in ("mae", SCRATCH):
            if method.startswith("energy") and other in means and method in means:
                for fraction in fractions:
                    if fraction in means[method] and fraction in means[other]:
                        gap = means[method][fraction] - means[other][fraction]
                        gaps.append(f"- {method} vs {other}, {100 * fraction:g}% labels: {gap:+.2f} points")
    machine = (
        f"{platform.processor() or platform.machine()}, {_cpu_name()}, {_cores()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}"
    )
    recipe = shlex.join(FINETUNE_RECIPE + shlex.split(args.finetune_args))
    schedule = ", ".join(f"{e} epochs at {100 * f:g}%" for f, e in zip(fractions, args.finetune_epochs, strict=True))
    text = [
        f"Pretraining budget: {args.time_budget:g} min of training steps per method on `{args.data}`, model "
        f"`{args.model}`; fine-tuning: {schedule} of the labels (class-balanced), "
        f"seeds {', '.join(map(str, args.seeds))}, recipe "
        f"`{recipe}`; probes on all labels. Fine-tune cells: top-1 mean ± half the range "
        "over seeds.",
        "",
        f"Machine: {machine}.",
        "",
        f"Regenerate: `{command}`",
        "",
        *lines,
        "",
        *(gaps or ["- (no energy run to compare yet)"]),
    ]
    return "\n".join(text) + "\n"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/accuracy_per_compute.py", *(sys.argv[1:] if argv is None else argv)])
    for method in args.methods:
        print(f"{method}:", flush=True)
        pretrain(args, method, root / method / "pretrain")
        downstream(args, root / method / "pretrain", root / method)
    print(f"{SCRATCH}:", flush=True)
    downstream(args, None, root / SCRATCH)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(report(args, root, command))
    print(results.read_text())


if __name__ == "__main__":
    main()
