"""Command line: ``energyssl <command>`` (also ``python -m energyssl``).

A mistake the user can fix prints one line, ``error: ...``, and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from . import __version__
from .errors import Interrupted, UserError


def _pretrain(cfg: Any) -> None:
    from .pretrain import pretrain

    pretrain(cfg)


def _finetune(cfg: Any) -> None:
    from .evaluation.finetune import finetune

    finetune(cfg)


def _probe(cfg: Any) -> None:
    from .evaluation.probe import probe

    probe(cfg)


def _segment(cfg: Any) -> None:
    from .evaluation.segment import segment

    segment(cfg)


def _analysis(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .methods.energy import commands
    from .visualize import plot

    for name in ("count", "steps"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    if args.command == "restore":
        commands.restore(
            args.init, args.task, Path(args.out), args.images, args.data, args.count, args.steps, args.seed
        )
    elif args.command == "energy":
        commands.energy_scores(args.init, args.data, Path(args.out), args.compare, args.task, args.count, args.seed)
    else:
        plot(args.runs, Path(args.out))


def _config_commands() -> dict[str, tuple[type, Callable[[Any], None], str, str]]:
    from .config import FinetuneConfig, PretrainConfig, ProbeConfig, SegmentConfig

    return {
        "pretrain": (
            PretrainConfig,
            _pretrain,
            "pretrain a backbone by restoring corrupted images with gradient steps on its energy",
            "Pretrain a backbone as an energy function: corrupted images are restored by K gradient steps on the "
            "input, and the loss is each step's distance to the clean image. Runs on one process, or on many under "
            "`torchrun --nproc_per_node=N -m energyssl pretrain ...`.",
        ),
        "finetune": (
            FinetuneConfig,
            _finetune,
            "fine-tune a pretrained backbone (or one from scratch) on labeled data",
            "Full fine-tuning with AdamW, layer-wise lr decay, drop path, RandAugment, mixup/cutmix and label "
            "smoothing. --init none trains from scratch (the baseline). --label-fraction draws a class-balanced "
            "subset. Writes results.json in --out.",
        ),
        "probe": (
            ProbeConfig,
            _probe,
            "evaluate frozen features: linear, mlp, knn or attentive probe",
            "Frozen-backbone protocols on features extracted once (cached in --out). Writes results.json.",
        ),
        "segment": (
            SegmentConfig,
            _segment,
            "semantic segmentation on a pretrained backbone: linear probe or UperNet fine-tune, mIoU",
            "Dense transfer: --protocol linear trains BatchNorm + a 1x1 conv on the frozen backbone's patch features; "
            "--protocol upernet fine-tunes the backbone under a UPerNet decoder (the paper's ADE20K setting). Data: "
            "embedded (synthetic garment scenes), an ADE20K folder, or images/ + masks/. Scores mIoU, per-class IoU "
            "and pixel accuracy into results.json. Runs under torchrun and resumes like finetune.",
        ),
    }


def _flags(command: str) -> list:
    """The methods' options that ``pretrain`` takes as flags (``--task``, ``--steps``, ...)."""
    if command != "pretrain":
        return []
    from .methods import method_flags

    return method_flags()


def _add_energy_model_options(parser: argparse.ArgumentParser, default_out: str) -> None:
    """The options of the commands that load a pretrained energy model and corrupt images."""
    parser.add_argument(
        "--init", required=True, help="pretraining run folder, checkpoint folder or its model.safetensors"
    )
    parser.add_argument("--seed", type=int, default=0, help="corruption seed (default: 0)")
    parser.add_argument("--out", default=default_out, help=f"output folder (default: {default_out})")


def build_parser() -> argparse.ArgumentParser:
    from .config import add_arguments

    parser = argparse.ArgumentParser(
        prog="energyssl", description="Energy-inspired self-supervised pretraining of vision backbones."
    )
    parser.add_argument("--version", action="version", version=f"energyssl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (cls, _, short, long) in _config_commands().items():
        add_arguments(commands.add_parser(name, help=short, description=long), cls, _flags(name))
    restore = commands.add_parser(
        "restore",
        help="corrupt and restore images with a pretrained energy model; save the grid and PSNR",
        description="Corrupt (or, with --task none, take as given) images and restore them by gradient steps "
        "on the energy. Saves restoration.png and restoration.json (PSNR against the originals) in --out.",
    )
    _add_energy_model_options(restore, "runs/restore")
    restore.add_argument("--task", default="mixed", help="corruption name, mixed (each task), or none (default: mixed)")
    source = restore.add_mutually_exclusive_group()
    source.add_argument("--images", nargs="+", help="image files to restore")
    source.add_argument("--data", help="dataset spec; its first --count test images (default: embedded)")
    restore.add_argument("--count", type=int, default=6, help="images taken from --data (default: 6)")
    restore.add_argument("--steps", type=int, help="restoration steps (default: the pretraining's K)")

    energy = commands.add_parser(
        "energy",
        help="histograms of energy scores of real, corrupted and restored images",
        description="Energy of real images, their corrupted versions and one-step restorations (and optionally "
        "a second dataset). Saves energy.png and energy.json with statistics and AUROCs in --out.",
    )
    _add_energy_model_options(energy, "runs/energy")
    energy.add_argument("--data", default="embedded", help="dataset spec (default: embedded)")
    energy.add_argument("--compare", help="a second dataset spec, e.g. another domain")
    energy.add_argument("--task", help="corruption (default: the pretraining task)")
    energy.add_argument("--count", type=int, default=1000, help="images per group (default: 1000)")

    plot = commands.add_parser(
        "plot", help="loss, alpha and lr curves of runs", description="Plot metrics.jsonl curves."
    )
    plot.add_argument("runs", nargs="+", help="run folders (each with metrics.jsonl)")
    plot.add_argument("--out", default="curves.png", help="PNG file to write (default: curves.png)")

    report = commands.add_parser(
        "report", help="gather results.json files into a Markdown table", description="Gather results.json files."
    )
    report.add_argument("paths", nargs="+", help="results.json files or folders searched recursively")
    report.add_argument("--out", help="also write the table to this file")
    return parser


def parse_config(command: str, argv: list[str]) -> Any:
    """The config ``energyssl COMMAND argv`` would run with (benchmarks build runs this way)."""
    return _resolve(build_parser().parse_args([command, *argv]), _config_commands()[command][0])


def _resume_changes(command: str) -> Callable[[Any, Any], list[str]]:
    """The command's check of what a resumed run may change of its own config."""
    if command == "pretrain":
        from .pretrain import resume_changes
    else:
        from .evaluation.finetune import resume_changes
    return resume_changes


def _resolve(args: argparse.Namespace, cls: type) -> Any:
    """The command's config; a resumed run starts from its own config.yaml, and only what is
    given here changes it (what would alter the run is refused)."""
    from .config import resolve, run_config_file

    flags = _flags(args.command)
    cfg = resolve(args, cls, flags)
    if not getattr(cfg, "resume", None):
        return cfg
    saved_file = run_config_file(cfg.out, cfg.resume)
    if saved_file is None:
        return cfg  # no run there: the command says so
    saved = resolve(build_parser().parse_args([args.command]), cls, flags, base=saved_file)
    cfg = resolve(args, cls, flags, base=saved_file)
    for line in _resume_changes(args.command)(saved, cfg):
        if os.environ.get("RANK", "0") == "0":
            print(line)
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("restore", "energy", "plot"):
            _analysis(args)
        elif args.command == "report":
            from .evaluation.results import report

            table = report(args.paths)
            print(table, end="")
            if args.out:
                with open(args.out, "w") as f:
                    f.write(table)
        else:
            cls, run, _, _ = _config_commands()[args.command]
            run(_resolve(args, cls))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(exc, file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
