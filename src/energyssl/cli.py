"""Command line: ``energyssl <command>`` (also ``python -m energyssl``).

A mistake the user can fix prints one line, ``error: ...``, and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from .config import PretrainConfig, add_arguments

    parser = argparse.ArgumentParser(
        prog="energyssl",
        description="Energy-inspired self-supervised pretraining of vision backbones.",
    )
    parser.add_argument("--version", action="version", version=f"energyssl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    pretrain = commands.add_parser(
        "pretrain",
        help="pretrain a backbone by restoring corrupted images with gradient steps on its energy",
        description="Pretrain a backbone as an energy function: corrupted images are restored by K gradient "
        "steps on the input, and the loss is each step's distance to the clean image. Runs on one process, "
        "or on many under `torchrun --nproc_per_node=N -m energyssl pretrain ...`.",
    )
    add_arguments(pretrain, PretrainConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "pretrain":
            from .config import PretrainConfig, resolve
            from .pretrain import pretrain

            pretrain(resolve(args, PretrainConfig))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
