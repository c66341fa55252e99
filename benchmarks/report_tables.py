"""The benchmarks' tables: formatting, paired intervals, the paper's Table 4 with its claims, and
accuracy gained per doubling of compute. Functions of scores already measured (no runs, no
files), shared by accuracy_per_compute.py and segmentation_transfer.py."""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from matplotlib.figure import Figure  # imported when a figure is drawn, not at start-up

SCRATCH = "scratch"  # the random init's row
METRICS = {"ft0.01": "fine-tune 1%", "ft0.1": "fine-tune 10%", "knn": "kNN", "linear": "linear"}
TABLE4_METRICS = ("ft0.01", "knn", "linear")

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def score(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def mean_sd(values: list[float], seeds: int = 1) -> str:
    """'mean ± sd' over pretraining seeds ('-' when none ran), marked when fewer than ``seeds``
    of them have run."""
    if not values:
        return "-"
    text = f"{values[0]:.2f}" if len(values) == 1 else f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
    return text if len(values) >= seeds else f"{text} ({len(values)} of {seeds} seeds)"


def paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of a - b paired by seed, and its 95% t interval."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = statistics.mean(diffs)
    half = T_975[len(diffs) - 1] * statistics.stdev(diffs) / len(diffs) ** 0.5
    return mean, mean - half, mean + half


def verdict(low: float, high: float, words: tuple[str, str, str] = ("energy ahead", "energy behind", "tied")) -> str:
    """What an interval of a difference says: above zero, below zero, or either."""
    return words[0] if low > 0 else words[1] if high < 0 else words[2]


def interval(d: tuple[float, float, float]) -> str:
    return f"{d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


# -- the paper's Table 4 at our scale ----------------------------------------------------------

# The paper's Table 4 in its order (ViT-S/16, 100 epochs of pretraining and fine-tuning on
# ImageNet-1K): panel, our row, the paper's row, its top-1.
PAPER_TABLE4 = (
    ("masking", SCRATCH, "from scratch", 76.6),
    ("masking", "energy-block_mask_large", "random large", 79.7),
    ("masking", "energy-block_mask", "random small", 79.3),
    ("masking", "ae-grid_mask", "MAE, 70%", 78.3),
    ("masking", "energy-grid_mask", "gridded (16), 70%", 79.0),
    ("restoration, sorting", "ae-super_resolution", "AE + SR 16", 77.1),
    ("restoration, sorting", "energy-super_resolution", "SR 16", 79.6),
    ("restoration, sorting", "ae-denoise", "AE + denoising", 76.8),
    ("restoration, sorting", "energy-denoise", "denoising", 79.2),
    ("restoration, sorting", "energy-colorization", "colorization", 79.5),
    ("restoration, sorting", "ae-sorting", "AE + sorting", 77.2),
    ("restoration, sorting", "energy-sorting", "patch sorting", 79.5),
)
NO_COLOUR = "needs colour images; this machine has none"
ALIKE = "the single tasks score alike (paper: 79.0 to 79.7)"
UNSURE = "cannot tell at this scale"
DIFFER = "does not hold (they differ)"  # either sign: a gap between two tasks, whichever is ahead


class Finding(NamedTuple):
    """One paired difference a claim rests on, and what it says of the claim."""

    metric: str
    label: str
    row: str
    other: str
    difference: tuple[float, float, float]  # mean, 95% interval
    words: str


@dataclass(frozen=True)
class SeedScores:
    """Scores keyed 'row/setting/s{seed}/metric' (the table4 stage's file), read over the
    pretraining seeds asked for, whatever the row's setting."""

    scores: dict[str, float]
    seeds: tuple[int, ...]

    def rows(self) -> list[str]:
        return sorted({key.split("/")[0] for key in self.scores})

    def values(self, row: str, metric: str) -> list[float]:
        """The row's scores, in seed order, for the seeds run so far."""
        found = {}
        for key, value in self.scores.items():
            name, _, seed, what = key.split("/")
            if name == row and what == metric and int(seed[1:]) in self.seeds:
                found[int(seed[1:])] = value
        return [found[seed] for seed in self.seeds if seed in found]

    def difference(self, a: str, b: str, metric: str) -> tuple[float, float, float] | None:
        """Mean of a - b paired by seed and its 95% interval, once both rows have every seed."""
        x, y = self.values(a, metric), self.values(b, metric)
        return paired(x, y) if len(x) == len(y) == len(self.seeds) else None


def table4_layout(rows_seen: list[str]) -> list[tuple[str, str, str, float | None]]:
    """The paper's rows in its order, then the rows it does not have (mixed, K = 1 and 4)."""
    ours = [(panel, row, name, top1) for panel, row, name, top1 in PAPER_TABLE4 if row in rows_seen or "color" in row]
    listed = {row for _, row, _, _ in ours}
    return ours + [("not in the paper's table", row, "-", None) for row in rows_seen if row not in listed]


def table4_pairs(rows_seen: list[str]) -> dict[str, list[tuple[str, str, str]]]:
    """The differences each of the paper's claims rests on, as (label, row, row it should beat)."""
    energy = [row for row in rows_seen if row.startswith("energy-") and "-K" not in row]
    shared = [row[3:] for row in rows_seen if row.startswith("ae-") and f"energy-{row[3:]}" in rows_seen]
    k_rows = {int(row.rsplit("-K", 1)[1]): row for row in rows_seen if "-K" in row}
    if k_rows:  # the K=2 row is the task's own row
        k_rows[2] = next(iter(k_rows.values())).rsplit("-K", 1)[0]
    return {
        "energy beats AE + the same corruption": [(task, f"energy-{task}", f"ae-{task}") for task in shared],
        "every pretext task beats training from scratch": [
            (row.removeprefix("energy-"), row, SCRATCH) for row in energy
        ],
        "AE + the same corruption beats training from scratch": [
            (row.removeprefix("ae-"), row, SCRATCH) for row in rows_seen if row.startswith("ae-")
        ],
        "more steps restore better": [
            (f"K={k} over K={j}", row, below) for (j, below), (k, row) in itertools.pairwise(sorted(k_rows.items()))
        ],
    }


def spread(table4: SeedScores, metric: str) -> tuple[str, str] | None:
    """Our best and worst single task by mean (every seed run), for the claim that they score alike.
    The pair is picked after seeing the means, so a gap is easier to find than to trust."""
    single = [row for row in table4.rows() if row.startswith("energy-") and "-K" not in row and row != "energy-mixed"]
    means = {}
    for row in single:
        if len(values := table4.values(row, metric)) == len(table4.seeds):
            means[row] = statistics.mean(values)
    return (max(means, key=means.__getitem__), min(means, key=means.__getitem__)) if len(means) > 1 else None


def claim_findings(table4: SeedScores) -> dict[str, list[Finding]]:
    """Each of the paper's claims with the paired differences it rests on and what each says."""
    findings: dict[str, list[Finding]] = {}
    for claim, pairs in table4_pairs(table4.rows()).items():
        findings[claim] = []
        for metric, (label, a, b) in itertools.product(TABLE4_METRICS, pairs):
            if d := table4.difference(a, b, metric):
                words = verdict(*d[1:], words=("holds", "does not hold (the other way round)", UNSURE))
                findings[claim].append(Finding(metric, label, a, b, d, words))
    findings[ALIKE] = []
    for metric in TABLE4_METRICS:
        if (pair := spread(table4, metric)) and (d := table4.difference(*pair, metric)):
            words = verdict(*d[1:], words=(DIFFER, DIFFER, "cannot tell them apart"))
            findings[ALIKE].append(
                Finding(metric, "best {} minus worst {}".format(*(r[7:] for r in pair)), *pair, d, words)
            )
    return findings


def paper_difference(a: str, b: str, metric: str) -> str:
    """The paper's difference, for fine-tuning (its only column)."""
    top1 = {row: value for _, row, _, value in PAPER_TABLE4}
    return f"{top1[a] - top1[b]:+.1f}" if metric == "ft0.01" and a in top1 and b in top1 else "-"


def table4_section(table4: SeedScores) -> tuple[list[str], list[str]]:
    """Our numbers beside the paper's Table 4, in its layout, and the paired differences each of
    the paper's claims rests on; with the claims, a sentence each (the README quotes them)."""
    rows_seen, results, panel_shown = table4.rows(), [], ""
    for panel, row, name, paper_top1 in table4_layout(rows_seen):
        cells = [mean_sd(table4.values(row, m), len(table4.seeds)) for m in TABLE4_METRICS] if row in rows_seen else []
        results.append(
            [panel if panel != panel_shown else "", name, score(paper_top1), row, *(cells or [NO_COLOUR, "", ""])]
        )
        panel_shown = panel
    differences, claims = [], []
    for claim, found in claim_findings(table4).items():
        for f in found:
            paper = paper_difference(f.row, f.other, f.metric)
            differences.append([f"{f.row} minus {f.other}", METRICS[f.metric], interval(f.difference), f.words, paper])
        said = []
        for metric in TABLE4_METRICS:
            if parts := [f"{f.label} {interval(f.difference)} {f.words}" for f in found if f.metric == metric]:
                said.append(f"{METRICS[metric]}: " + "; ".join(parts))
        if said:
            claims.append(f"- **{claim}**. " + ". ".join(said) + ".")
    head = ["panel", "paper's row", "paper top-1", "our row", *(METRICS[m] for m in TABLE4_METRICS)]
    report = [
        *table(head, results),
        "",
        "The claims, each difference paired by pretraining seed with its 95% t interval (only where "
        "both rows have every seed); the paper's evidence is its fine-tuning column.",
        "",
        *claims,
        "",
        *table(["difference", "metric", "mean [95% interval]", "the claim", "paper"], differences),
    ]
    return report, claims


# -- accuracy against compute -----------------------------------------------------------------


CurvePoint = tuple[float, float, float | None, float | None]  # budget, TFLOPs, fine-tune 1%, kNN
CURVE_METRICS = ("ft0.01", "knn")  # in the order of a CurvePoint's scores


def per_doubling(series: list[CurvePoint], index: int, low: float, high: float) -> float | None:
    """Points gained per doubling of compute between budgets ``low`` and ``high`` (the slope of
    a least-squares line against log2 of the budget), None with fewer than 2 points."""
    done = [(math.log2(p[0]), p[index]) for p in series if low <= p[0] <= high and p[index] is not None]
    if len(done) < 2:
        return None
    return statistics.linear_regression(*zip(*done, strict=True)).slope


def slope_text(slope: float | None) -> str:
    return "-" if slope is None else f"{slope:+.2f}"


def meeting(budget: float, gap: float, closing: float | None) -> str:
    """Where a gap closing by ``closing`` points per doubling reaches zero: the budget in
    supervised epochs, 'met' if it already has, 'never' if it does not close."""
    if gap >= 0:
        return "met"
    if closing is None:
        return "-"
    if closing <= 0:
        return "never (not closing)"
    return f"~{budget * 2 ** (-gap / closing):.3g} (extrapolated)"


def growth_section(points: dict[str, list[CurvePoint]], budget: float) -> list[str]:
    """Points gained per doubling of compute up to the base budget's double and beyond it, and
    the energy method's gap to each other method at the largest budget both reached, with the
    budget where the fitted lines of the last span would meet (an extrapolation, one seed)."""
    split = 2 * budget
    rows, gaps = [], []
    for method, series in points.items():
        for index, metric in enumerate(CURVE_METRICS, start=2):
            early, late = per_doubling(series, index, 0, split), per_doubling(series, index, split, math.inf)
            rows.append([method, METRICS[metric], slope_text(early), slope_text(late)])
    for method in [m for m in points if m != "energy" and "energy" in points]:
        for index, metric in enumerate(CURVE_METRICS, start=2):
            ours, theirs = ({p[0]: p[index] for p in points[m] if p[index] is not None} for m in ("energy", method))
            if not (shared := sorted(ours.keys() & theirs.keys())):
                continue
            at, gap = shared[-1], ours[shared[-1]] - theirs[shared[-1]]
            slopes = [per_doubling(points[m], index, split, math.inf) for m in ("energy", method)]
            closing = None if None in slopes else slopes[0] - slopes[1]  # type: ignore[operator]
            gaps.append([method, METRICS[metric], f"{at:g}", f"{gap:+.2f}", slope_text(closing),
                         meeting(at, gap, closing)])  # fmt: skip
    return [
        *table(["method", "metric", f"points per doubling, to {split:g}", f"beyond {split:g}"], rows),
        "",
        *table(["energy minus", "metric", "at budget", "gap", "closing per doubling", "lines meet at"], gaps),
    ]


def curve_figure(points: dict[str, list[CurvePoint]], random_init: dict[str, float]) -> Figure:
    """Fine-tune 1% and kNN against TFLOPs, ticked at the budgets. A method keeps its colour in
    both panels, and one legend sits beside them: with six methods a legend inside hid points."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    ticks = sorted({p[1] for series in points.values() for p in series})
    for ax, index, key, name in zip(axes, (2, 3), ("ft0.01", "knn"), ("fine-tune, 1% labels", "kNN"), strict=True):
        for colour, (method, series) in enumerate(points.items()):
            done = [(p[1], p[index]) for p in series if p[index] is not None]
            if done:
                ax.plot(*zip(*done, strict=True), marker="o", color=f"C{colour}", label=method)
        if key in random_init:
            ax.axhline(random_init[key], color="grey", linestyle="--", label="random init")
        ax.set(xscale="log", xlabel="pretraining TFLOPs", ylabel="test top-1 (%)", title=name)
        ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks], minor=False)
        ax.set_xticks([], minor=True)
    legend = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    fig.legend(legend.values(), legend.keys(), loc="center right", fontsize="small")
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    return fig
