"""Accuracy per unit of compute, measured so that it survives a rerun.

* Budgets are FLOPs (multiples of one supervised epoch: a forward and backward pass of the
  classifier over the training images), converted to steps per method; warmup and cosine span
  exactly those steps. Wall time is measured and shown, but no budget depends on it.
* Every choice is made on a validation split carved from the training labels (`--eval-split
  val`); the test split is read once per final configuration.
* Every method gets the same tuning: 3 learning rates, then 2 method variants at the best one.
* Final numbers come from 3 pretraining seeds; differences to the energy method are paired by
  seed, with a 95% interval.

Stages, each a command that keeps finished runs (rerun it to continue an interrupted one):

    python benchmarks/accuracy_per_compute.py --stage recipe     # fine-tuning recipe, random init, on val
    python benchmarks/accuracy_per_compute.py --stage sweep      # per method: lr, then variants, on val
    python benchmarks/accuracy_per_compute.py --stage seeds      # chosen settings, 3 pretraining seeds, test
    python benchmarks/accuracy_per_compute.py --stage curve      # chosen settings, other budgets, test
    python benchmarks/accuracy_per_compute.py --stage reference  # random init, raw pixels, 100% labels, test
    python benchmarks/accuracy_per_compute.py --stage table4     # the paper's Table 4: tasks, AE + task, K
    python benchmarks/accuracy_per_compute.py --stage report     # tables, intervals, the curve's PNG

The table4 stage keeps every score it measures in ``--table4-scores`` (committed, so that a fresh
checkout continues where the last one stopped) and skips the cells already there; the curve stage
keeps its points in ``--curve-scores`` likewise (the committed file's points at 0.5-4 supervised
epochs were copied, at two decimals, from the protocol report's curve table, measured before the
file existed).

The tables, intervals and the paper's claims are built by ``report_tables.py`` from the scores
alone. Runs one training at a time. With `--disturbed` the stage's wall times are marked as
taken while the machine did other work (the budgets, in FLOPs, are unaffected).
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from report_tables import (  # beside this script (its folder is on sys.path when it runs)
    CURVE_METRICS,
    METRICS,
    SCRATCH,
    TABLE4_METRICS,
    CurvePoint,
    SeedScores,
    curve_figure,
    growth_section,
    mean_sd,
    paired,
    score,
    table,
    table4_section,
    verdict,
)

from energyssl.checkpoint import find_checkpoint, load_training_state
from energyssl.cli import parse_config
from energyssl.config import PretrainConfig
from energyssl.data import DataInfo, load_dataset
from energyssl.flops import pretrain_step_flops, supervised_step_flops


@dataclass(frozen=True)
class Method:
    """A pretraining method as the benchmark runs it: its flags, and the two variants tried at
    its best learning rate (the same tuning effort for every method)."""

    flags: list[str]
    variants: dict[str, list[str]] = field(default_factory=dict)


METHODS: dict[str, Method] = {
    # Explicit about task, K and gradient, so that a change of defaults does not change a row.
    "energy": Method(
        ["--method", "energy", "--task", "masking", "--steps", "1", "--grad-mode", "fast", "--vis-every", "0"],
        {"K2": ["--steps", "2"], "mixed": ["--task", "mixed"]},
    ),
    "mae": Method(
        ["--method", "mae"],
        {
            "dec512x1": ["--method-options", "{decoder_dim: 512, decoder_depth: 1}"],  # lightly's example
            "dec96x1": ["--method-options", "{decoder_depth: 1}"],  # the paper: depth 1 suffices to fine-tune
        },
    ),
    "cae": Method(
        ["--method", "cae"],
        {"mask75": ["--method-options", "{mask_ratio: 0.75}"], "align1": ["--method-options", "{align_weight: 1}"]},
    ),
    "mocov3": Method(
        ["--method", "mocov3"],
        {
            "t0.1": ["--method-options", "{temperature: 0.1}"],
            "learnedpatch": ["--method-options", "{frozen_patch_projection: false}"],
        },
    ),
    "dino": Method(
        ["--method", "dino"],
        {
            "t0.07": ["--method-options", "{teacher_temp: 0.07, teacher_temp_warmup: 0.3}"],  # its longer runs
            "local4": ["--method-options", "{local_crops: 4}"],
        },
    ),
    "ijepa": Method(
        ["--method", "ijepa"],
        {
            "blocks2": ["--method-options", "{target_blocks: 2}"],
            "deeppred": ["--method-options", "{predictor_depth: 4}"],
        },
    ),
}
PIXELS = "pixels"
FRACTIONS = (0.01, 0.1)
# The fine-tuning recipe without mixup, cutmix and RandAugment, which underfit at these budgets;
# its epochs and learning rate are chosen on validation by the recipe stage.
FINETUNE_FLAGS = ["--mixup", "0", "--cutmix", "0", "--randaug", "", "--warmup-epochs", "1"]
STAGES = ("recipe", "sweep", "seeds", "curve", "reference", "table4", "report")
# The paper's Table 4 at our scale: each pretext task for the energy method (K=2, as the sweep
# chose), the autoencoder with the same corruption (AE + task), then K at the best task.
ENERGY_TASKS = ("grid_mask", "block_mask", "block_mask_large", "super_resolution", "denoise", "sorting", "mixed")
AE_TASKS = ("super_resolution", "denoise", "sorting", "grid_mask")
PAIRED_FIRST = ("super_resolution", "denoise", "sorting", "grid_mask")  # the paper's central claim runs first
K_VALUES = (1, 2, 4)
for _task in ENERGY_TASKS:
    METHODS[f"energy-{_task}"] = Method([*METHODS["energy"].flags, "--task", _task, "--steps", "2"])
    METHODS[f"energy-{_task}-K1"] = Method([*METHODS[f"energy-{_task}"].flags, "--steps", "1"])
    METHODS[f"energy-{_task}-K4"] = Method([*METHODS[f"energy-{_task}"].flags, "--steps", "4"])
for _task in AE_TASKS:
    METHODS[f"ae-{_task}"] = Method(["--method", "ae", "--task", _task])
PROTOCOL_METHODS = ("energy", "mae", "cae", "mocov3", "dino", "ijepa")  # the headline comparison


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--data", default="fashion-mnist", help="dataset spec, as for `energyssl pretrain --data`")
    parser.add_argument("--model", default="essl_vit_mini_patch7")
    parser.add_argument("--batch-size", type=int, default=64, help="pretraining batch")
    parser.add_argument("--budget", type=float, default=2.0, help="pretraining budget in supervised epochs of FLOPs")
    parser.add_argument("--curve", type=float, nargs="+", default=[0.5, 1.0, 4.0], help="other budgets, same units")
    parser.add_argument("--methods", nargs="+", default=list(PROTOCOL_METHODS), choices=list(METHODS))
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2], help="base lrs swept per method")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pretraining (and fine-tuning) seeds")
    parser.add_argument("--epochs-1pct", type=int, nargs="+", default=[100, 200, 400], help="fine-tune epochs tried")
    parser.add_argument("--epochs-10pct", type=int, nargs="+", default=[10, 20, 40], help="fine-tune epochs tried")
    parser.add_argument("--finetune-blr", type=float, default=4e-3, help="fine-tune base lr; x0.5 and x2 are tried")
    parser.add_argument(
        "--ceiling-epochs", type=int, help="epochs of supervised training on all labels (default: the 10%% recipe's)"
    )
    parser.add_argument("--extra", default="", help="extra `energyssl` flags for every command (e.g. --num-workers)")
    parser.add_argument("--disturbed", action="store_true", help="mark this stage's wall times as disturbed")
    parser.add_argument("--out", default="runs/protocol", help="folder of the runs")
    parser.add_argument("--results", default="benchmarks/results/protocol.md", help="Markdown report")
    parser.add_argument(
        "--energy-blr", type=float, default=1e-2,
        help="table4: the energy rows' base lr (default: the sweep's choice on validation, blr0.01-K2)",
    )  # fmt: skip
    parser.add_argument("--tasks", nargs="+", default=list(ENERGY_TASKS), choices=ENERGY_TASKS, help="table4's tasks")
    parser.add_argument("--table4-scores", default="benchmarks/results/table4_scores.json", help="table4's scores")
    parser.add_argument("--curve-scores", default="benchmarks/results/curve_scores.json", help="the curve's scores")
    args = parser.parse_args(argv)
    if args.budget <= 0 or min(args.curve) <= 0:
        parser.error("budgets must be positive")
    if len(args.seeds) < 2:
        parser.error("--seeds needs at least 2 pretraining seeds for a spread")
    return args


# -- running commands ---------------------------------------------------------------------------


def energyssl(args: argparse.Namespace, command: list[str], folder: Path) -> None:
    """``energyssl COMMAND ... --out folder`` with its output in folder.log; a failure stops the stage."""
    log = folder.with_name(folder.name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [*command, *shlex.split(args.extra), "--no-tensorboard", "--out", str(folder)]
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.call([sys.executable, "-m", "energyssl", *argv], stdout=f, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"failed ({code}): energyssl {shlex.join(argv)}\n  see {log}")
    name = folder.relative_to(args.out) if folder.is_relative_to(args.out) else folder
    print(f"  {name}: {time.perf_counter() - start:.0f} s", flush=True)


def top1(folder: Path) -> float | None:
    file = folder / "results.json"
    return json.loads(file.read_text())["metrics"]["top1"] if file.exists() else None


def finetune(args: argparse.Namespace, init: str, folder: Path, fraction: float, split: str, seed: int,
             epochs: int, blr: float) -> float:  # fmt: skip
    if top1(folder) is None:
        flags = ["--init", init, "--data", args.data, "--label-fraction", str(fraction), "--eval-split", split]
        flags += ["--seed", str(seed), "--epochs", str(epochs), "--blr", str(blr), "--eval-every", str(epochs)]
        flags += ["--resume"] if (folder / "latest").exists() else []  # a stage stopped midway goes on
        energyssl(args, ["finetune", *flags, *FINETUNE_FLAGS, *model_flag(args, init)], folder)
    return top1(folder)  # type: ignore[return-value]


def probe(args: argparse.Namespace, init: str, folder: Path, protocol: str, split: str, seed: int = 0) -> float:
    if top1(folder) is None:
        flags = ["--init", init, "--data", args.data, "--protocol", protocol, "--eval-split", split]
        energyssl(args, ["probe", *flags, "--seed", str(seed), *model_flag(args, init)], folder)
    return top1(folder)  # type: ignore[return-value]


def model_flag(args: argparse.Namespace, init: str) -> list[str]:
    return ["--model", args.model] if init == "none" else []


# -- budgets in FLOPs ---------------------------------------------------------------------------


def pretrain_config(argv: list[str]) -> PretrainConfig:
    return parse_config("pretrain", argv)


def cached(root: Path, key: str, compute) -> float:  # noqa: ANN001
    """A number kept in root/flops.json under ``key`` (counting builds a model: do it once)."""
    file = root / "flops.json"
    table = json.loads(file.read_text()) if file.exists() else {}
    if key not in table:
        table[key] = compute()
        root.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(table, indent=1))
    return table[key]


@functools.cache
def training_split(data: str) -> tuple[int, DataInfo]:
    """Size and description of ``data``'s training split, read once per process."""
    dataset = load_dataset(data, train=True)
    return len(dataset), dataset.info


def steps_per_epoch(args: argparse.Namespace) -> int:
    return training_split(args.data)[0] // args.batch_size


def supervised_epoch_flops(args: argparse.Namespace) -> float:
    """The budget unit: one supervised epoch (forward and backward of the classifier)."""
    info = training_split(args.data)[1]

    def count() -> float:
        return supervised_step_flops(args.model, info.img_size, info.in_chans, args.batch_size, info.num_classes)

    return cached(Path(args.out), f"supervised {args.model} {args.batch_size}", count) * steps_per_epoch(args)


def pretrain_flags(args: argparse.Namespace, method: str, setting: str) -> list[str]:
    """``setting`` is 'blr<lr>' or 'blr<lr>-<variant>'."""
    blr, _, variant = setting.partition("-")
    flags = ["--data", args.data, "--model", args.model, "--batch-size", str(args.batch_size)]
    flags += [*METHODS[method].flags, *METHODS[method].variants.get(variant, []), "--blr", blr.removeprefix("blr")]
    return flags


def pretrain(args: argparse.Namespace, method: str, setting: str, budget: float, seed: int) -> Path:
    """Pretrain for ``budget`` supervised epochs of FLOPs; the run folder (with its backbone)."""
    folder = Path(args.out) / method / setting / f"b{budget:g}-s{seed}"
    run = folder / "pretrain"
    if (run / "backbone.safetensors").exists():
        return run
    flags = pretrain_flags(args, method, setting)
    per_step = cached(Path(args.out), shlex.join(flags), lambda: pretrain_step_flops(pretrain_config(flags)))
    steps = max(1, round(budget * supervised_epoch_flops(args) / per_step))
    epochs = steps / steps_per_epoch(args)
    flags += ["--epochs", repr(epochs), "--warmup-epochs", repr(0.05 * epochs), "--seed", str(seed)]
    energyssl(args, ["pretrain", *flags, *(["--resume"] if (run / "latest").exists() else [])], run)
    (folder / "budget.json").write_text(
        json.dumps({"flops_per_step": per_step, "steps": steps, "budget": budget, "disturbed": args.disturbed})
    )
    return run


# -- choices made on validation -----------------------------------------------------------------


def best(scores: dict[str, float]) -> str:
    """The highest score; the first listed wins a tie."""
    return max(scores, key=lambda k: (scores[k], -list(scores).index(k)))


def save_choice(file: Path, choice: dict) -> dict:
    file.write_text(json.dumps(choice, indent=1))
    return choice


def load_choice(file: Path, stage: str) -> dict:
    if not file.exists():
        sys.exit(f"{file} is missing: run --stage {stage} first")
    return json.loads(file.read_text())


def stage_recipe(args: argparse.Namespace) -> dict:
    """Fine-tuning epochs and lr for a random init, on validation: epochs at the default lr,
    then lr x0.5 and x2 at those epochs (1% labels); epochs again at that lr (10% labels)."""
    root = Path(args.out) / "recipe"

    def score(fraction: float, epochs: int, blr: float) -> float:
        out = root / f"ft{fraction:g}-e{epochs}-blr{blr:g}"
        return finetune(args, "none", out, fraction, "val", 0, epochs, blr)

    base = args.finetune_blr
    epochs_1 = int(best({str(e): score(0.01, e, base) for e in args.epochs_1pct}))
    blr = float(best({f"{b:g}": score(0.01, epochs_1, b) for b in (base, base / 2, base * 2)}))
    epochs_10 = int(best({str(e): score(0.1, e, blr) for e in args.epochs_10pct}))
    return save_choice(root.parent / "recipe.json", {"0.01": [epochs_1, blr], "0.1": [epochs_10, blr]})


RECIPE_RECORD = Path(__file__).parent / "results" / "protocol_recipe.json"  # the recipe stage's choice, kept


def recipe(args: argparse.Namespace, fraction: float) -> tuple[int, float]:
    """The fine-tuning recipe the recipe stage chose (its record in the results when this
    checkout's runs folder has none: runs are not committed, choices are)."""
    file = Path(args.out) / "recipe.json"
    epochs, blr = load_choice(file if file.exists() or not RECIPE_RECORD.exists() else RECIPE_RECORD, "recipe")[
        f"{fraction:g}"
    ]
    return epochs, blr


def validation_scores(args: argparse.Namespace, method: str, setting: str) -> dict[str, float]:
    """Fine-tune on 1% labels and kNN, both scored on validation, at the base budget, seed 0."""
    run = pretrain(args, method, setting, args.budget, 0)
    return {
        "finetune": finetune(args, str(run), run.parent / "val-ft0.01-s0", 0.01, "val", 0, *recipe(args, 0.01)),
        "knn": probe(args, str(run), run.parent / "val-knn", "knn", "val"),
    }


def stage_sweep(args: argparse.Namespace) -> None:
    """Per method: the lrs, then its two variants at the best lr; chosen on 1% fine-tuning."""
    for method in args.methods:
        print(f"{method}:", flush=True)
        lrs = {f"blr{lr:g}": validation_scores(args, method, f"blr{lr:g}")["finetune"] for lr in args.lrs}
        lr = best(lrs)
        settings = {lr: lrs[lr]} | {
            f"{lr}-{v}": validation_scores(args, method, f"{lr}-{v}")["finetune"] for v in METHODS[method].variants
        }
        save_choice(choice_file(args, method), {"setting": best(settings), "tried": settings})


CHOICES_RECORD = Path(__file__).parent / "results" / "protocol_choices.json"  # the sweep's choices, kept


def choice_file(args: argparse.Namespace, method: str) -> Path:
    return Path(args.out) / method / "choice.json"


def chosen(args: argparse.Namespace, method: str) -> str:
    """The setting the sweep chose (its record in the results when this checkout's runs folder
    has none, as for the recipe)."""
    file = choice_file(args, method)
    if file.exists() or not CHOICES_RECORD.exists():
        return load_choice(file, "sweep")["setting"]
    return json.loads(CHOICES_RECORD.read_text())[method]


# -- final numbers on test ----------------------------------------------------------------------


def test_scores(args: argparse.Namespace, init: str, folder: Path, seed: int) -> dict[str, float]:
    """Fine-tune on 1% and 10% labels, kNN and linear probes, all scored on test."""
    scores = {
        f"ft{f:g}": finetune(args, init, folder / f"test-ft{f:g}-s{seed}", f, "test", seed, *recipe(args, f))
        for f in FRACTIONS
    }
    for protocol in ("knn", "linear"):
        scores[protocol] = probe(args, init, folder / f"test-{protocol}", protocol, "test", seed)
    return scores


def stage_seeds(args: argparse.Namespace) -> None:
    for method in args.methods:
        print(f"{method}:", flush=True)
        for seed in args.seeds:
            run = pretrain(args, method, chosen(args, method), args.budget, seed)
            test_scores(args, str(run), run.parent, seed)


def stage_curve(args: argparse.Namespace) -> None:
    """Each method's chosen setting at the other budgets (and the base one), seed 0, on test;
    every score kept in ``--curve-scores`` as table4's are."""
    scores = curve_scores(args)
    for method in args.methods:
        print(f"{method}:", flush=True)
        for budget in sorted({*args.curve, args.budget}):
            for metric in CURVE_METRICS:
                curve_cell(args, scores, method, budget, metric)
            write_curve(args)


def curve_key(method: str, setting: str, budget: float, metric: str) -> str:
    return f"{method}/{setting}/b{budget:g}/{metric}"


def curve_scores(args: argparse.Namespace) -> Scores:
    """The curve's scores, for this data, model and batch (budgets are in the keys)."""
    context = {"data": args.data, "model": args.model, "batch_size": args.batch_size, "seed": args.seeds[0]}
    return Scores(Path(args.curve_scores), context)


def curve_cell(args: argparse.Namespace, scores: Scores, method: str, budget: float, metric: str) -> float:
    """One point of the curve: fine-tune 1% or kNN after ``budget`` supervised epochs of FLOPs."""
    setting, seed = chosen(args, method), args.seeds[0]

    def measure() -> float:
        run = pretrain(args, method, setting, budget, seed)
        folder = run.parent / ("test-knn" if metric == "knn" else f"test-ft0.01-s{seed}")
        if metric == "ft0.01":
            return finetune(args, str(run), folder, 0.01, "test", seed, *recipe(args, 0.01))
        return probe(args, str(run), folder, "knn", "test")

    return scores.get(curve_key(method, setting, budget, metric), measure)


def stage_reference(args: argparse.Namespace) -> None:
    """The floor and the ceiling: a random init (every seed), raw pixels, all labels."""
    root = Path(args.out)
    for seed in args.seeds:
        test_scores(args, "none", root / SCRATCH / f"s{seed}", seed)
    for protocol in ("knn", "linear"):
        probe(args, "pixels", root / PIXELS / f"test-{protocol}", protocol, "test")
    epochs, blr = ceiling_recipe(args)
    finetune(args, "none", ceiling_folder(args, epochs), 1.0, "test", 0, epochs, blr)


def ceiling_recipe(args: argparse.Namespace) -> tuple[int, float]:
    """The 10% recipe on all labels: the same epochs unless ``--ceiling-epochs`` says otherwise."""
    epochs, blr = recipe(args, 0.1)
    return args.ceiling_epochs or epochs, blr


def ceiling_folder(args: argparse.Namespace, epochs: int) -> Path:
    return Path(args.out) / "ceiling" / f"test-ft1-e{epochs}-s0"


# -- the paper's Table 4 at our scale -----------------------------------------------------------


class Scores:
    """The table4 stage's scores, one JSON file: a cell measured once is never measured again,
    and the file is rewritten after each one (so that a kill loses at most the run in progress)."""

    def __init__(self, path: Path, context: dict) -> None:
        saved = json.loads(path.read_text()) if path.exists() else {"context": context, "scores": {}}
        if saved["context"] != context:
            sys.exit(f"{path} holds scores of another setting ({saved['context']}); give another scores file")
        self.path, self.context, self.values = path, context, saved["scores"]

    def get(self, key: str, measure) -> float:  # noqa: ANN001
        if key not in self.values:
            self.values[key] = measure()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(".tmp")
            text = json.dumps({"context": self.context, "scores": self.values}, indent=1, sort_keys=True)
            temporary.write_text(text + "\n")
            temporary.replace(self.path)
        return self.values[key]


def table4_scores(args: argparse.Namespace) -> Scores:
    """The scores file, for this data, model, batch and budget only."""
    context = {"data": args.data, "model": args.model, "batch_size": args.batch_size, "budget": args.budget}
    return Scores(Path(args.table4_scores), context)


def table4_cell(args: argparse.Namespace, scores: Scores, row: str, setting: str, seed: int, metric: str) -> float:
    """One score of a table4 row: ``metric`` is a test metric, or 'val-ft0.01' (seed 0 only)."""
    key = f"{row}/{setting}/s{seed}/{metric}"

    def measure() -> float:
        init = "none" if row == SCRATCH else str(pretrain(args, row, setting, args.budget, seed))
        folder = Path(args.out) / "table4" / row / setting / f"s{seed}"
        if metric == "val-ft0.01":
            return finetune(args, init, folder / "val-ft0.01", 0.01, "val", seed, *recipe(args, 0.01))
        if metric == "ft0.01":
            return finetune(args, init, folder / "test-ft0.01", 0.01, "test", seed, *recipe(args, 0.01))
        return probe(args, init, folder / f"test-{metric}", metric, "test", seed)

    return scores.get(key, measure)


def table4_ae_blr(args: argparse.Namespace, scores: Scores) -> str:
    """The AE rows' base lr: the lr grid at grid_mask (the masking counterpart of the energy
    method's own sweep), chosen on validation fine-tuning with 1% of labels, seed 0."""
    grid = {f"blr{lr:g}": table4_cell(args, scores, "ae-grid_mask", f"blr{lr:g}", 0, "val-ft0.01") for lr in args.lrs}
    return best(grid)


def tasks(args: argparse.Namespace, among: tuple[str, ...]) -> list[str]:
    return [task for task in among if task in args.tasks]


def table4_best_task(args: argparse.Namespace, scores: Scores) -> str | None:
    """The energy task with the best validation fine-tune (seed 0), once every task has one."""
    setting = f"blr{args.energy_blr:g}"
    keys = {task: f"energy-{task}/{setting}/s0/val-ft0.01" for task in tasks(args, ENERGY_TASKS)}
    if not all(key in scores.values for key in keys.values()):
        return None
    return best({task: scores.values[key] for task, key in keys.items()})


def table4_plan(args: argparse.Namespace, scores: Scores) -> list[tuple[str, str]]:
    """(row, setting) in the order they run: the shared tasks in pairs (energy, then AE), the
    other energy tasks, then K=1 and K=4 at the best task."""
    energy, ae = f"blr{args.energy_blr:g}", table4_ae_blr(args, scores)
    plan = [pair for task in tasks(args, PAIRED_FIRST) for pair in ((f"energy-{task}", energy), (f"ae-{task}", ae))]
    plan += [(f"energy-{task}", energy) for task in tasks(args, ENERGY_TASKS) if task not in PAIRED_FIRST]
    task = table4_best_task(args, scores)
    return plan + ([(f"energy-{task}-K{k}", energy) for k in K_VALUES if k != 2] if task else [])


def stage_table4(args: argparse.Namespace) -> None:
    """The random init, then every row, one pretraining seed at a time (seed 0 of every row
    first), each scored on test (fine-tune 1%, kNN, linear); the energy rows of seed 0 also on
    validation, which picks the task K is varied at."""
    scores = table4_scores(args)
    for seed in args.seeds:
        for metric in TABLE4_METRICS:
            table4_cell(args, scores, SCRATCH, "random", seed, metric)
    for seed in args.seeds:
        for row, setting in table4_plan(args, scores):
            write_table4(args)
            print(f"{row} {setting} seed {seed}:", flush=True)
            if seed == args.seeds[0] and row.startswith("energy-") and "-K" not in row:
                table4_cell(args, scores, row, setting, seed, "val-ft0.01")
            for metric in TABLE4_METRICS:
                table4_cell(args, scores, row, setting, seed, metric)
        if seed == args.seeds[0]:  # the K rows' seed 0, now that the best task is known
            for row, setting in table4_plan(args, scores)[-2:]:
                if "-K" in row:
                    for metric in TABLE4_METRICS:
                        table4_cell(args, scores, row, setting, seed, metric)
    write_table4(args)


def write_table4(args: argparse.Namespace) -> None:
    """The table4 stage's report, next to its scores (rewritten as rows finish)."""
    path = Path(args.table4_scores).with_name("table4.md")
    intro = [
        f"The paper's Table 4 at our scale: `{args.data}`, `{args.model}`, pretraining budget {args.budget:g} "
        f"supervised epochs of FLOPs, batch {args.batch_size}; energy rows at K=2 (fast gradient) and base lr "
        f"{args.energy_blr:g} (the sweep's choice on validation), AE rows at the lr their own grid chose on "
        f"validation; test top-1, mean ± sd over pretraining seeds {', '.join(map(str, args.seeds))}. The paper's "
        "numbers are ImageNet-1K top-1 after 100 epochs of pretraining and of fine-tuning a ViT-S/16. "
        f"Regenerate (and continue): `python benchmarks/accuracy_per_compute.py --stage table4`; a cell with "
        "fewer seeds than asked says so.",
        "",
    ]
    report, claims = table4_section(SeedScores(table4_scores(args).values, tuple(args.seeds)))
    path.write_text("\n".join([*intro, *report]) + "\n")
    path.with_name("table4_claims.md").write_text("".join(f"{claim}\n" for claim in claims))


# -- the report ---------------------------------------------------------------------------------


def run_facts(run: Path) -> dict:
    """Steps, FLOPs per step, wall time and disturbance of a pretraining run folder."""
    facts = json.loads((run.parent / "budget.json").read_text()) if (run.parent / "budget.json").exists() else {}
    if (run / "latest").exists():
        facts["elapsed"] = load_training_state(find_checkpoint(run))["elapsed"]
    return facts


def recipe_section(args: argparse.Namespace) -> list[str]:
    root = Path(args.out) / "recipe"
    choice = load_choice(root.parent / "recipe.json", "recipe")
    rows = []
    for folder in root.glob("ft*/"):
        if (score := top1(folder)) is None:
            continue
        cfg = json.loads((folder / "results.json").read_text())["config"]
        picked = [cfg["epochs"], cfg["blr"]] == choice[f"{cfg['label_fraction']:g}"]
        rows.append([f"{100 * cfg['label_fraction']:g}%", str(cfg["epochs"]), f"{cfg['blr']:g}", f"{score:.2f}",
                     "chosen" if picked else ""])  # fmt: skip
    rows.sort(key=lambda r: (float(r[0][:-1]), int(r[1]), float(r[2])))
    return table(["labels", "epochs", "base lr", "val top-1 (random init)", ""], rows)


def sweep_section(args: argparse.Namespace) -> list[str]:
    rows = []
    for method in args.methods:
        choice = load_choice(choice_file(args, method), "sweep")
        for folder in sorted((Path(args.out) / method).glob(f"*/b{args.budget:g}-s0")):
            setting, facts = folder.parent.name, run_facts(folder / "pretrain")
            ft, knn = top1(folder / "val-ft0.01-s0"), top1(folder / "val-knn")
            if ft is None:
                continue
            rows.append([method, setting, str(facts.get("steps", "-")), f"{facts.get('flops_per_step', 0) / 1e9:.1f}",
                         score(ft), score(knn),
                         "chosen" if setting == choice["setting"] else ""])  # fmt: skip
    return table(["method", "setting", "steps", "GFLOPs/step", "val fine-tune 1%", "val kNN", ""], rows)


def final_scores(args: argparse.Namespace, method: str) -> tuple[dict[str, list[float]], list[dict]]:
    """Test scores per metric over the pretraining seeds, and the runs' facts."""
    scores: dict[str, list[float]] = {k: [] for k in ("ft0.01", "ft0.1", "knn", "linear")}
    facts = []
    for seed in args.seeds:
        if method == SCRATCH:
            folder = Path(args.out) / SCRATCH / f"s{seed}"
        else:
            folder = Path(args.out) / method / chosen(args, method) / f"b{args.budget:g}-s{seed}"
            facts.append(run_facts(folder / "pretrain"))
        for key, name in (("ft0.01", f"test-ft0.01-s{seed}"), ("ft0.1", f"test-ft0.1-s{seed}"),
                          ("knn", "test-knn"), ("linear", "test-linear")):  # fmt: skip
            if (value := top1(folder / name)) is not None:
                scores[key].append(value)
    return scores, facts


def wall(facts: list[dict]) -> str:
    times = [f["elapsed"] for f in facts if "elapsed" in f]
    if not times:
        return "-"
    return f"{statistics.mean(times) / 60:.1f}" + ("*" if any(f.get("disturbed") for f in facts) else "")


def headline_section(args: argparse.Namespace) -> tuple[list[str], dict[str, dict[str, list[float]]]]:
    rows, all_scores = [], {}
    for method in [*args.methods, SCRATCH]:
        scores, facts = final_scores(args, method)
        all_scores[method] = scores
        setting = chosen(args, method) if method != SCRATCH else "random init"
        steps = str(facts[0].get("steps", "-")) if facts else "0"
        rows.append([method, setting, steps, wall(facts), *(mean_sd(scores[k], len(args.seeds)) for k in scores)])
    pixels = [top1(Path(args.out) / PIXELS / f"test-{p}") for p in ("knn", "linear")]
    rows.append([PIXELS, "raw pixels, no network", "0", "-", "-", "-", *(mean_sd([v] if v else []) for v in pixels)])
    head = ["method", "setting", "steps", "pretraining min", "fine-tune 1%", "fine-tune 10%", "kNN", "linear"]
    return table(head, rows), all_scores


def differences_section(args: argparse.Namespace, scores: dict[str, dict[str, list[float]]]) -> list[str]:
    rows = []
    for other in [m for m in [*args.methods, SCRATCH] if m != "energy"]:
        for metric in ("ft0.01", "ft0.1", "knn", "linear"):
            a, b = scores.get("energy", {}).get(metric, []), scores[other][metric]
            if len(a) == len(b) == len(args.seeds):
                mean, low, high = paired(a, b)
                rows.append([other, METRICS[metric], f"{mean:+.2f}", f"[{low:+.2f}, {high:+.2f}]", verdict(low, high)])
    return table(["energy minus", "metric", "mean difference", "95% interval", "verdict"], rows)


def curve_points(args: argparse.Namespace) -> dict[str, list[CurvePoint]]:
    """Each method's points at every budget it has a score at (and those asked for), seed 0, on
    test, from the curve's scores (None where a run has not finished)."""
    unit, values = supervised_epoch_flops(args), curve_scores(args).values
    points = {}
    for method in args.methods:
        setting = chosen(args, method)
        found = {float(b[1:]) for m, s, b, _ in (key.split("/") for key in values) if (m, s) == (method, setting)}
        rows = []
        for budget in sorted({*args.curve, args.budget, *found}):
            ft, knn = (values.get(curve_key(method, setting, budget, metric)) for metric in CURVE_METRICS)
            rows.append((budget, budget * unit / 1e12, ft, knn))
        points[method] = rows
    return points


def curve_section(args: argparse.Namespace, png: Path, points: dict[str, list[CurvePoint]]) -> list[str]:
    rows = [
        [method, f"{budget:g}", f"{tflops:.1f}", f"{ft:.2f}" if ft else "-", f"{knn:.2f}" if knn else "-"]
        for method, series in points.items()
        for budget, tflops, ft, knn in series
    ]
    scratch = final_scores(args, SCRATCH)[0]
    fig = curve_figure(points, {key: statistics.mean(scores) for key, scores in scratch.items() if scores})
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    return table(["method", "budget (supervised epochs)", "TFLOPs", "fine-tune 1%", "kNN"], rows)


def write_curve(args: argparse.Namespace) -> None:
    """The curve's report and PNG, next to its scores (rewritten as points finish), and its growth
    tables alone in curve_summary.md (the README quotes them)."""
    path = Path(args.curve_scores).with_name("curve.md")
    points = curve_points(args)
    intro = (
        f"Test top-1 against pretraining compute: `{args.data}`, `{args.model}`, batch {args.batch_size}, each "
        f"method at its setting chosen on validation at {args.budget:g} supervised epochs of FLOPs, pretraining "
        f"seed {args.seeds[0]}, one run per budget (its own warmup and cosine). Per doubling: the slope of a "
        "least-squares line against log2 of the budget; where lines meet is that slope extrapolated, one seed. "
        "Regenerate (and continue): `python benchmarks/accuracy_per_compute.py --stage curve --curve "
        f"{' '.join(f'{b:g}' for b in args.curve)} --methods {' '.join(args.methods)}`."
    )
    lines = [intro, "", f"![curve]({path.stem}.png)", "", *curve_section(args, path.with_suffix(".png"), points)]
    growth = growth_section(points, args.budget)
    path.write_text("\n".join([*lines, "", *growth]) + "\n")
    path.with_name("curve_summary.md").write_text("\n".join(growth) + "\n")


def write_report(args: argparse.Namespace, argv: list[str]) -> None:
    unit = supervised_epoch_flops(args)
    unswept = [m for m in args.methods if not choice_file(args, m).exists()]  # listed as not finished
    args = argparse.Namespace(**{**vars(args), "methods": [m for m in args.methods if m not in unswept]})
    results = Path(args.results)
    png = results.with_name(results.stem + "_curve.png")
    headline, scores = headline_section(args)
    differences = differences_section(args, scores)
    stages = Path(args.out) / "stages.json"
    spent = json.loads(stages.read_text()) if stages.exists() else {}
    (ft1_epochs, ft1_blr), (ft10_epochs, ft10_blr) = recipe(args, 0.01), recipe(args, 0.1)
    ceiling_epochs, _ = ceiling_recipe(args)
    notes = [
        *(["", f"Not in the tables yet (sweep not finished): {', '.join(unswept)}."] if unswept else []),
        "",
        f"Ceiling: supervised training from a random init on all training labels (validation split excepted), "
        f"same recipe at base lr {ft10_blr:g}, {ceiling_epochs} epochs: "
        f"{score(top1(ceiling_folder(args, ceiling_epochs)))}.",
    ]
    text = [
        f"Data `{args.data}`, model `{args.model}`, pretraining batch {args.batch_size}. Budget: {args.budget:g} "
        f"supervised epochs of FLOPs ({args.budget * unit / 1e12:.3g} TFLOPs; one supervised epoch is a forward "
        f"and backward pass of the classifier over the training images, {unit / 1e12:.3g} TFLOPs). "
        f"Pretraining seeds {', '.join(map(str, args.seeds))}; each cell is mean ± sd over them (the fine-tuning "
        f"seed equals the pretraining seed). Fine-tuning recipe, chosen on validation for a random init: "
        f"{ft1_epochs} epochs at base lr {ft1_blr:g} on 1% of labels, {ft10_epochs} epochs at {ft10_blr:g} on 10%, "
        f"`{shlex.join(FINETUNE_FLAGS)}`. Settings chosen on validation (a fixed 10% of the training labels); "
        "test read once per final configuration. Pretraining minutes marked * were measured while the machine "
        "did other work.",
        "",
        f"Regenerate: `python benchmarks/accuracy_per_compute.py {shlex.join(argv)}` after the stages above it.",
        "",
        "### Final numbers (test)",
        "",
        *headline,
        *notes,
        "",
        "### Differences, paired by pretraining seed",
        "",
        *differences,
        "",
        f"### Accuracy against pretraining compute (test, seed {args.seeds[0]})",
        "",
        f"![curve]({png.name})",
        "",
        *curve_section(args, png, curve_points(args)),
        "",
        "### Choices on validation",
        "",
        *sweep_section(args),
        "",
        *recipe_section(args),
        "",
        "### Cost of each stage on this machine",
        "",
        *table(["stage", "minutes"], [[k, f"{v / 60:.0f}"] for k, v in spent.items()]),
    ]
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text("\n".join(text) + "\n")
    pairing = "Energy minus each other method, paired by pretraining seed (95% t interval):"
    summary = [*headline, *notes, "", pairing, "", *differences]
    results.with_name(results.stem + "_summary.md").write_text("\n".join(summary) + "\n")  # the README's block
    print(results.read_text())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.stage == "report":
        write_report(args, sys.argv[1:] if argv is None else argv)
        return
    {"recipe": stage_recipe, "sweep": stage_sweep, "seeds": stage_seeds, "curve": stage_curve,
     "reference": stage_reference, "table4": stage_table4}[args.stage](args)  # fmt: skip
    stages = Path(args.out) / "stages.json"
    spent = json.loads(stages.read_text()) if stages.exists() else {}
    spent[args.stage] = spent.get(args.stage, 0.0) + time.perf_counter() - start
    stages.write_text(json.dumps(spent, indent=1))
    print(f"stage {args.stage}: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
