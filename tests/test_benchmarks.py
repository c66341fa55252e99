"""The benchmark scripts' argument handling and a tiny end-to-end run of each (the real
benchmarks are not part of the test suite)."""

import contextlib
import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import each other, as when run from benchmarks/


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


accuracy = _load("accuracy_per_compute")
tables = importlib.import_module("report_tables")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--stage", "sweep", "--budget", "0"], "budgets must be positive"),
        (["--stage", "seeds", "--seeds", "0"], "at least 2 pretraining seeds"),
        (["--stage", "nonsense"], "invalid choice"),
    ],
)
def test_accuracy_per_compute_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        accuracy.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_paired_differences_have_a_t_interval():
    mean, low, high = tables.paired([3.0, 4.0, 5.0], [1.0, 1.0, 2.0])  # differences 2, 3, 3
    half = 4.303 * (1 / 3) ** 0.5 / 3**0.5
    assert mean == pytest.approx(8 / 3) and (low, high) == pytest.approx((8 / 3 - half, 8 / 3 + half))
    assert tables.verdict(low, high) == "energy ahead"
    assert tables.verdict(*tables.paired([1.0, 2.0, 3.0], [2.0, 1.0, 3.0])[1:]) == "tied"
    assert tables.verdict(*tables.paired([1.0, 1.0, 2.0], [3.0, 4.0, 5.0])[1:]) == "energy behind"
    assert accuracy.best({"a": 1.0, "b": 2.0, "c": 2.0}) == "b"  # ties go to the first listed


class InProcess:
    """Stands in for ``subprocess`` so the stages run the CLI in this process (no start-up cost)."""

    STDOUT = subprocess.STDOUT

    @staticmethod
    def call(command, stdout, stderr):  # noqa: ANN001, ANN205
        from energyssl.cli import main

        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stdout):
            return main(command[3:])  # drop "python -m energyssl"


def test_curve_figure_has_one_legend_beside_the_panels_and_ticks_at_the_budgets():
    """A method with points in one panel only is still in the legend, in the same colour in both
    panels; neither panel carries a legend of its own (it hid points)."""
    points = {
        "dino": [(0.5, 2.4, None, 65.0), (2.0, 9.7, None, None)],  # its fine-tunes still running
        "energy": [(0.5, 2.4, 75.0, 61.0), (2.0, 9.7, 77.0, 68.0)],
    }
    fig = tables.curve_figure(points, {"ft0.01": 76.7})
    finetune, knn = fig.axes
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["energy", "random init", "dino"]
    assert finetune.get_legend() is None and knn.get_legend() is None
    assert [line.get_label() for line in finetune.lines] == ["energy", "random init"]
    assert [line.get_label() for line in knn.lines] == ["dino", "energy"]  # no random-init score for kNN
    assert finetune.lines[0].get_color() == knn.lines[1].get_color() != knn.lines[0].get_color()
    assert list(knn.get_xticks()) == [2.4, 9.7] and [t.get_text() for t in knn.get_xticklabels()] == ["2.4", "9.7"]


def test_curve_growth_is_the_slope_per_doubling_and_says_where_lines_meet():
    """Points per doubling are a least-squares slope against log2 of the budget, per span; a gap
    that closes is extrapolated to the budget where it reaches zero, one that does not is said."""
    points = {
        "energy": [(1.0, 0, 70.0, 60.0), (2.0, 0, 71.0, 62.0), (4.0, 0, 72.0, 64.0), (8.0, 0, 74.0, 67.0),
                   (16.0, 0, 76.0, 70.0)],
        "mae": [(1.0, 0, 75.0, 80.0), (2.0, 0, 75.5, 80.0), (4.0, 0, 76.0, 80.0), (8.0, 0, 76.0, 81.0),
                (16.0, 0, 76.0, None)],
    }  # fmt: skip
    assert tables.per_doubling(points["energy"], 2, 0, 4) == pytest.approx(1.0)
    assert tables.per_doubling(points["energy"], 3, 4, 16) == pytest.approx(3.0)
    assert tables.per_doubling(points["mae"], 3, 16, 32) is None  # one point, no slope
    lines = tables.growth_section(points, budget=2)
    assert "| energy | fine-tune 1% | +1.00 | +2.00 |" in lines
    assert "| mae | fine-tune 1% | +0.50 | +0.00 |" in lines
    # fine-tune: energy 76 vs 76 at 16 (met); kNN: -14 at 8, closing 3 - 1 = 2 per doubling -> 8 * 2**7
    assert "| mae | fine-tune 1% | 16 | +0.00 | +2.00 | met |" in lines
    assert "| mae | kNN | 8 | -14.00 | +2.00 | ~1.02e+03 (extrapolated) |" in lines
    assert tables.meeting(8, -1.0, -0.5) == "never (not closing)" and tables.meeting(8, -1.0, None) == "-"


def test_accuracy_per_compute_protocol_end_to_end(tmp_path, monkeypatch, capsys):
    """Every stage on a tiny budget: choices are made on validation only, pretraining runs the
    steps its FLOP budget buys, and the report has its tables, intervals and curve."""
    from energyssl.checkpoint import find_checkpoint, load_training_state

    monkeypatch.setattr(accuracy, "subprocess", InProcess)
    out, results = tmp_path / "runs", tmp_path / "results" / "protocol.md"
    argv = [
        "--data", "embedded", "--model", "essl_vit_micro_patch7", "--batch-size", "32", "--methods", "energy",
        "--budget", "0.1", "--curve", "0.05", "--lrs", "1e-3", "--seeds", "0", "1", "--epochs-1pct", "2",
        "--epochs-10pct", "1", "--out", str(out), "--results", str(results),
        "--table4-scores", str(results.parent / "table4_scores.json"), "--tasks", "grid_mask",
        "--curve-scores", str(results.parent / "curve_scores.json"),
    ]  # fmt: skip
    for stage in accuracy.STAGES:
        accuracy.main(["--stage", stage, *argv])
    settings = json.loads((out / "energy" / "choice.json").read_text())["tried"]
    assert set(settings) == {"blr0.001", "blr0.001-K2", "blr0.001-mixed"}
    for folder in [*out.glob("recipe/*/"), *out.glob("energy/*/*/val-*/")]:  # every choice: on validation
        assert json.loads((folder / "results.json").read_text())["config"]["eval_split"] == "val", folder
    for folder in [*out.glob("energy/*/*/test-*/"), *out.glob("scratch/*/test-*/")]:
        assert json.loads((folder / "results.json").read_text())["config"]["eval_split"] == "test", folder
    unit = accuracy.supervised_epoch_flops(accuracy.parse_args(["--stage", "report", *argv]))
    for budget_file in out.glob("energy/*/*/budget.json"):
        budget = json.loads(budget_file.read_text())
        assert budget["steps"] == max(1, round(budget["budget"] * unit / budget["flops_per_step"]))
        assert load_training_state(find_checkpoint(budget_file.parent / "pretrain"))["step"] == budget["steps"]
    report = results.read_text()
    assert "| energy | blr0.001" in report and "| scratch | random init" in report and "| pixels |" in report
    assert "| scratch | fine-tune 1% |" in report and "Ceiling: " in report and "Ceiling: -" not in report
    assert (out / "ceiling" / "test-ft1-e1-s0" / "results.json").exists()  # the 10% recipe's epochs
    assert (results.parent / "protocol_curve.png").stat().st_size > 0
    curve = json.loads((results.parent / "curve_scores.json").read_text())["scores"]  # kept, as table4's
    assert set(curve) == {f"energy/blr0.001-K2/b{b}/{m}" for b in ("0.05", "0.1") for m in ("ft0.01", "knn")}
    assert curve["energy/blr0.001-K2/b0.1/knn"] == accuracy.top1(out / "energy/blr0.001-K2/b0.1-s0/test-knn")
    assert "| energy | 0.05 |" in (results.parent / "curve.md").read_text()
    assert "seeds)" not in report  # every cell has all its seeds
    accuracy.main(["--stage", "report", *argv, "--methods", "energy", "mae"])  # a method not swept yet: listed
    assert "(sweep not finished): mae." in results.read_text() and "| energy | blr0.001" in results.read_text()
    accuracy.main(["--stage", "report", *argv])
    assert tables.mean_sd([70.0, 72.0], 3) == "71.00 ± 1.41 (2 of 3 seeds)" and tables.mean_sd([85.0]) == "85.00"
    readme = tmp_path / "README.md"  # the README's block is the report's summary, the rest kept
    readme.write_text("intro\n<!-- protocol: begin -->\nold\n<!-- protocol: end -->\nrest\n")
    readme.write_text(
        readme.read_text() + "".join(f"<!-- {n}: begin -->\n<!-- {n}: end -->\n" for n in ("table4", "curve"))
    )
    _load("make_results").main(
        ["--results", str(results.parent), "--out", str(tmp_path / "R.md"), "--readme", str(readme)]
    )
    block = readme.read_text().split("<!-- protocol: begin -->")[1].split("<!-- protocol: end -->")[0]
    assert readme.read_text().startswith("intro\n") and "<!-- protocol: end -->\nrest\n" in readme.read_text()
    assert "- **energy beats AE + the same corruption**. fine-tune 1%: grid_mask " in readme.read_text()
    assert "| energy | kNN | " in readme.read_text().split("<!-- curve: begin -->")[1]
    assert "| energy | blr0.001" in block and "| scratch | fine-tune 1% |" in block and "old" not in block
    assert "Ceiling: " in block
    assert "![curve](results/protocol_curve.png)" in (tmp_path / "R.md").read_text()  # images found from RESULTS
    capsys.readouterr()
    accuracy.main(["--stage", "seeds", *argv])  # a finished stage runs nothing again
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")] == []


def test_step_cost_reports_ratios_and_memory(tmp_path):
    out = tmp_path / "cost"
    cmd = [
        sys.executable, str(BENCHMARKS / "step_cost.py"), "--model", "essl_vit_micro_patch7", "--batch-size", "8",
        "--methods", "supervised", "energy K=1 fast", "mocov3", "dino", "--repeats", "1", "--iters", "1",
        "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())["results"]
    assert data["supervised"]["cost_ratio"] == 1.0
    assert data["energy K=1 fast"]["img_per_s"] > 0 and data["energy K=1 fast"]["peak_mb"] >= 0
    assert data["energy K=1 fast"]["gflops"] > data["supervised"]["gflops"] > 0 and data["mocov3"]["gflops"] > 0
    bad = subprocess.run([*cmd[:2], "--methods", "mae"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "must include supervised" in bad.stderr


def test_step_cost_profile_counts_the_operators_of_a_step(tmp_path):
    """--profile: each step's top operators, and the energy step makes many more operator calls
    than the supervised one (the double backward)."""
    out = tmp_path / "cost"
    cmd = [
        sys.executable, str(BENCHMARKS / "step_cost.py"), "--model", "essl_vit_micro_patch7", "--batch-size", "4",
        "--methods", "supervised", "energy K=1 exact", "--profile", "--top", "5", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = (tmp_path / "cost_profile.md").read_text()
    calls = [int(line.split(": ")[1].split()[0]) for line in report.splitlines() if line.startswith("### ")]
    assert len(calls) == 2 and calls[1] > 1.5 * calls[0] > 0 and "aten::" in report


def test_gpu_check_smoke_runs_every_section_on_cpu(tmp_path):
    """The device check's code paths, tiny and on CPU, so the script cannot rot between GPU runs."""
    out = tmp_path / "check"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_check.py"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=BENCHMARKS.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((out / "gpu_check.json").read_text())
    sections = ("environment", "step_cost", "compiled", "predicted", "fidelity", "corruption_memory", "pretraining",
                "evaluation")  # fmt: skip
    assert all(isinstance(results[s], (dict, list)) and "error" not in results[s] for s in sections)
    assert all("error" not in row and row["gflops_per_image"] > 0 for row in results["step_cost"])
    compiled = {row["method"]: row for row in results["compiled"]}  # --compile's rows, traced on a CPU
    assert set(compiled) == {"supervised, compiled", "energy K=1 exact, compiled", "energy K=2 exact, compiled",
                             "mae, compiled"}  # fmt: skip
    assert all(row["grad_cosine_to_eager"] > 0.999 and row["img_per_s"] > 0 for row in compiled.values())
    assert [r["amp"] for r in results["pretraining"]] == ["bf16", "fp16", "none"]
    assert all(r["exit"] == 0 and r["finite"] for r in results["pretraining"])
    assert all(r["exit"] == 0 for r in results["evaluation"]) and len(results["evaluation"]) == 5
    assert "## Step cost" in (out / "gpu_check.md").read_text()


def test_budgets_count_the_flops_of_the_flags_given():
    """A run's FLOPs per step follow its method flags (K=2 costs twice K=1): the budget of each
    setting buys the steps of that setting, not of the defaults."""
    from energyssl.flops import pretrain_step_flops

    base = ["--model", "essl_vit_micro_patch7", "--batch-size", "8", "--task", "grid_mask", "--grad-mode", "exact"]
    one, two = (pretrain_step_flops(accuracy.pretrain_config([*base, "--steps", k])) for k in ("1", "2"))
    assert 1.8 < two / one < 2.2


class FakeRuns:
    """Stands in for ``subprocess`` where a stage's logic is tested, not its training: a
    pretraining leaves a backbone file, an evaluation a results.json whose top-1 is a fixed
    function of its folder (so choices are deterministic)."""

    STDOUT = subprocess.STDOUT

    @staticmethod
    def call(command, stdout, stderr):  # noqa: ANN001, ANN205
        out = Path(command[command.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        if command[3] == "pretrain":
            (out / "backbone.safetensors").write_bytes(b"")
        else:
            top1 = int(hashlib.sha256(str(out).encode()).hexdigest(), 16) % 1000 / 10
            (out / "results.json").write_text(json.dumps({"metrics": {"top1": top1, "miou": top1}}))
        return 0


def test_segmentation_transfer_chooses_each_rows_lr_on_validation_and_resumes(tmp_path, monkeypatch):
    """Each row (random init, each method's chosen pretraining) gets the same lr grid on
    validation at the first seed, then the chosen lr on test at every seed; the scores file
    makes a second call (a fresh checkout) measure nothing, and the report pairs by seed."""
    segmentation = _load("segmentation_transfer")
    monkeypatch.setattr(accuracy, "subprocess", FakeRuns)
    commands = []
    original = accuracy.energyssl
    monkeypatch.setattr(
        accuracy, "energyssl", lambda args, command, folder: (commands.append(command), original(args, command, folder))
    )
    scores = tmp_path / "results" / "segmentation_scores.json"
    argv = [
        "--data",
        "embedded",
        "--model",
        "essl_vit_micro_patch7",
        "--batch-size",
        "32",
        "--budget",
        "0.02",
        "--methods",
        "energy",
        "mae",
        "--seeds",
        "0",
        "1",
        "--out",
        str(tmp_path / "runs"),
        "--scores",
        str(scores),
    ]
    segmentation.main(argv)
    segments = [c for c in commands if c[0] == "segment"]
    assert len(segments) == 3 * (len(segmentation.LRS) + 2)  # 3 rows: each lr on val, then test at 2 seeds
    for command in segments:
        split, blr = command[command.index("--eval-split") + 1], command[command.index("--blr") + 1]
        assert split == "test" or command[command.index("--seed") + 1] == "0"
        assert blr in {f"{lr:g}" for lr in segmentation.LRS}
    assert {c[c.index("--init") + 1] for c in segments if "none" not in c} == {
        str(p) for p in (tmp_path / "runs").glob("*/*/b0.02-s*/pretrain")
    }  # each method's own pretraining, per seed
    values = json.loads(scores.read_text())["scores"]
    for row in ("scratch", "energy", "mae"):
        blr, found = segmentation.test_values(segmentation.parse_args(argv), values, row)
        val = {f"{lr:g}": values[f"{row}/s0/val-blr{lr:g}"] for lr in segmentation.LRS}
        assert blr == accuracy.best(val) and len(found) == 2
    report = (scores.parent / "segmentation.md").read_text()
    assert "| mae | blr0.003-dec96x1 |" in report and "| mae | " in report.split("Energy minus")[1]
    commands.clear()
    import shutil

    shutil.rmtree(tmp_path / "runs")
    segmentation.main(argv)
    assert commands == []


def test_table4_stage_resumes_from_its_committed_scores(tmp_path, monkeypatch):
    """The paper's Table 4 at a tiny scale: the random init, energy and AE + task at each shared
    task, then K=1 and K=4 at the task validation chose; every score lands in the scores file,
    a second call (a fresh checkout: no runs folder) measures nothing again, and the report
    pairs energy with AE + task by seed."""
    monkeypatch.setattr(accuracy, "subprocess", FakeRuns)
    scores = tmp_path / "results" / "table4_scores.json"
    argv = [
        "--stage", "table4", "--data", "embedded", "--model", "essl_vit_micro_patch7", "--batch-size", "32",
        "--budget", "0.02", "--lrs", "1e-3", "--seeds", "0", "1", "--tasks", "grid_mask", "denoise",
        "--out", str(tmp_path / "runs"), "--table4-scores", str(scores),
    ]  # fmt: skip
    recipe = tmp_path / "runs" / "recipe.json"
    recipe.parent.mkdir(parents=True)
    recipe.write_text(json.dumps({"0.01": [1, 0.004], "0.1": [1, 0.004]}))
    accuracy.main(argv)
    values = json.loads(scores.read_text())["scores"]
    rows = {key.split("/")[0] for key in values}
    assert {"scratch", "energy-grid_mask", "ae-grid_mask", "energy-denoise", "ae-denoise"} <= rows
    assert len(rows & {"energy-grid_mask-K1", "energy-denoise-K1"}) == 1  # K at the chosen task only
    assert all(f"/s{seed}/ft0.01" in " ".join(values) for seed in (0, 1))
    calls = []
    monkeypatch.setattr(accuracy, "energyssl", lambda *a: calls.append(a))
    import shutil

    shutil.rmtree(tmp_path / "runs")
    recipe.parent.mkdir(parents=True)
    recipe.write_text(json.dumps({"0.01": [1, 0.004], "0.1": [1, 0.004]}))
    accuracy.main(argv)
    assert calls == [] and json.loads(scores.read_text())["scores"] == values
    with pytest.raises(SystemExit, match="another setting"):
        accuracy.main([*argv, "--budget", "0.03"])
    report = (scores.parent / "table4.md").read_text()
    assert "| energy-denoise minus ae-denoise | fine-tune 1% |" in report and tables.NO_COLOUR in report


def test_table4_report_follows_the_papers_layout_and_says_what_each_claim_gets():
    """Rows in the paper's order (colorization marked, the rows it lacks after), and per claim a
    verdict from the paired interval: a clear lead holds, a clear loss does not, noise cannot tell."""
    rows = {"scratch": 70.0, "ae-sorting": 71.0, "energy-sorting": 73.0, "energy-sorting-K1": 75.0}
    scores = {}
    for seed, noise in enumerate((0.0, 0.3, -0.2)):
        for metric in tables.TABLE4_METRICS:
            scores |= {f"{row}/blr0.01/s{seed}/{metric}": base + noise for row, base in rows.items()}
            scores[f"energy-sorting-K4/blr0.01/s{seed}/{metric}"] = 73.0 + 8 * noise  # K=4 - K=2: 0, 2.1, -1.4
            scores[f"energy-denoise/blr0.01/s{seed}/{metric}"] = 72.5 + 3 * noise  # sorting - denoise: 0.5, -0.1, 0.9
    lines, claim_lines = tables.table4_section(tables.SeedScores(scores, seeds=(0, 1, 2)))
    cells = [line.split(" | ") for line in lines[2:9]]
    assert [c[3] for c in cells] == [
        "scratch", "energy-denoise", "energy-colorization", "ae-sorting", "energy-sorting", "energy-sorting-K1",
        "energy-sorting-K4",
    ]  # fmt: skip
    panels = ["masking", "restoration, sorting", "", "", "", "not in the paper's table", ""]
    assert [c[0].strip("| ") for c in cells] == panels and cells[2][4] == tables.NO_COLOUR
    claims = {line.split("**")[1]: line for line in claim_lines}
    assert all(line in lines for line in claim_lines)
    assert "fine-tune 1%: sorting +2.00 [+2.00, +2.00] holds" in claims["energy beats AE + the same corruption"]
    steps = claims["more steps restore better"]
    assert "K=2 over K=1 -2.00 [-2.00, -2.00] does not hold" in steps and "K=4 over K=2 +0.23" in steps
    assert steps.count("cannot tell at this scale") == 3  # K=4 over K=2, each metric
    assert "fine-tune 1%: best sorting minus worst denoise +0.43 [" in claims[tables.ALIKE]
    assert claims[tables.ALIKE].count("cannot tell them apart") == 3
    assert "| energy-sorting minus ae-sorting | fine-tune 1% | +2.00 [+2.00, +2.00] | holds | +2.3 |" in lines


def test_table4_tie_claim_fails_where_the_single_tasks_clearly_differ():
    """Two single tasks 3 points apart at every seed: the tie claim says they differ, on each metric."""
    scores = {
        f"{row}/blr0.01/s{seed}/{metric}": base + 0.1 * seed
        for seed in (0, 1, 2)
        for metric in tables.TABLE4_METRICS
        for row, base in {"scratch": 70.0, "energy-denoise": 72.0, "energy-sorting": 75.0}.items()
    }
    _, claim_lines = tables.table4_section(tables.SeedScores(scores, seeds=(0, 1, 2)))
    alike = next(line for line in claim_lines if tables.ALIKE in line)
    assert "best sorting minus worst denoise +3.00 [+3.00, +3.00] does not hold (they differ)" in alike
    assert alike.count(tables.DIFFER) == 3 and "cannot tell them apart" not in alike
