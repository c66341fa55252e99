"""Assemble benchmarks/RESULTS.md from the tables the benchmark scripts wrote in
benchmarks/results/, each under its heading with the command that regenerates it, and fill the
README's marked blocks from the same tables, so that every number it states is a row here.

    python benchmarks/make_results.py
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

HERE = Path(__file__).parent
# (heading, table written by a benchmark script, which names the command that regenerates it)
SECTIONS = [
    ("Accuracy against pretraining compute: the protocol", "protocol.md"),
    ("The paper's Table 4 at our scale: tasks, AE + task, K", "table4.md"),
    ("Accuracy against pretraining compute, to 32 supervised epochs", "curve.md"),
    ("Semantic segmentation: the linear probe after each method's pretraining", "segmentation.md"),
    ("Our MAE against a reference implementation (lightly)", "peer_check.md"),
    ("Superseded: accuracy at equal pretraining wall time (chosen on test, one seed)", "accuracy_per_compute.md"),
    ("Superseded: restoration steps K at equal wall time (chosen on test, one seed)", "k_ablation.md"),
    ("Superseded: one change at a time from the old defaults (chosen on test, one seed)", "tuning.md"),
    ("Cost of one training step", "step_cost.md"),
    ("Fast mode's gradient fidelity", "fast_mode_fidelity.md"),
]

# README blocks, between "<!-- NAME: begin -->" and "<!-- NAME: end -->": NAME -> table
README_BLOCKS = {"protocol": "protocol_summary.md", "table4": "table4_claims.md", "curve": "curve_summary.md"}


def fill_readme(readme: Path, results: Path) -> None:
    """Replace each marked block of ``readme`` by its table in ``results`` (kept if not run)."""
    text = readme.read_text()
    for name, file in README_BLOCKS.items():
        begin, end, table = f"<!-- {name}: begin -->", f"<!-- {name}: end -->", results / file
        if table.is_file() and begin in text and end in text:
            head, rest = text.split(begin, 1)
            text = f"{head}{begin}\n{table.read_text()}{end}{rest.split(end, 1)[1]}"
    readme.write_text(text)


def linked_from(table: Path, out: Path) -> str:
    """``table``'s text with its images linked from ``out``'s folder (a table names its images
    relative to itself)."""
    prefix = os.path.relpath(table.parent, out.parent).replace(os.sep, "/")
    return re.sub(r"!\[([^\]]*)\]\(([^)/:]+)\)", lambda m: f"![{m[1]}]({prefix}/{m[2]})", table.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(HERE / "results"), help="folder of the generated tables")
    parser.add_argument("--notes", default=str(HERE / "results" / "notes.md"), help="findings, placed first")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--readme", default=str(HERE.parent / "README.md"), help="README whose blocks to fill")
    args = parser.parse_args(argv)
    parts = [
        "# Benchmark results\n",
        "Assembled by `python benchmarks/make_results.py` from the tables in `benchmarks/results/`.\n",
    ]
    notes = Path(args.notes)
    if notes.is_file():
        parts.append(notes.read_text())
    for heading, name in SECTIONS:
        table = Path(args.results) / name
        text = linked_from(table, Path(args.out)) if table.is_file() else "(not run yet)\n"
        parts.append(f"## {heading}\n\n" + text)
    Path(args.out).write_text("\n".join(parts))
    fill_readme(Path(args.readme), Path(args.results))
    print(f"wrote {args.out} and the blocks of {args.readme}")


if __name__ == "__main__":
    main()
