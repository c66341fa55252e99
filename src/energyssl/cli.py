"""Command line: ``energyssl <command>`` (also ``python -m energyssl``).

A mistake the user can fix prints one line, ``error: ...``, and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from . import __version__
from .errors import UserError


def _pretrain(cfg: Any) -> None:
    from .pretrain import pretrain

    pretrain(cfg)


def _finetune(cfg: Any) -> None:
    from .evaluation.finetune import finetune

    finetune(cfg)


def _probe(cfg: Any) -> None:
    from .evaluation.probe import probe

    probe(cfg)


def _config_commands() -> dict[str, tuple[type, Callable[[Any], None], str, str]]:
    from .config import FinetuneConfig, PretrainConfig, ProbeConfig

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
    }


def build_parser() -> argparse.ArgumentParser:
    from .config import add_arguments

    parser = argparse.ArgumentParser(
        prog="energyssl", description="Energy-inspired self-supervised pretraining of vision backbones."
    )
    parser.add_argument("--version", action="version", version=f"energyssl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (cls, _, short, long) in _config_commands().items():
        add_arguments(commands.add_parser(name, help=short, description=long), cls)
    report = commands.add_parser(
        "report", help="gather results.json files into a Markdown table", description="Gather results.json files."
    )
    report.add_argument("paths", nargs="+", help="results.json files or folders searched recursively")
    report.add_argument("--out", help="also write the table to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "report":
            from .evaluation.results import report

            table = report(args.paths)
            print(table, end="")
            if args.out:
                with open(args.out, "w") as f:
                    f.write(table)
        else:
            from .config import resolve

            cls, run, _, _ = _config_commands()[args.command]
            run(resolve(args, cls))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
