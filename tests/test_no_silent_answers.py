"""No silent wrong answers: one class map per dataset, a resume continues its own run, every
device and option checked; each case failed (or was silently wrong) before its fix."""

import json

import pytest
from PIL import Image

from energyssl.cli import main
from energyssl.data import load_dataset
from energyssl.metrics import read_metrics

TINY = ["--model", "essl_vit_micro_patch7", "--batch-size", "4", "--no-tensorboard"]


def split_folder(root, splits: dict[str, list[str]]):
    """``root/<split>/<class>/`` with dark images for class x and bright ones for y."""
    for split, classes in splits.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(8):
                Image.new("L", (28, 28), 10 + i if name == "x" else 240 - i).save(folder / f"{i}.png")
    return root


def test_an_evaluation_split_lacking_a_class_keeps_the_training_labels(tmp_path):
    """val/ holds only class y: its images keep y's label (1), not the first index (0)."""
    data = split_folder(tmp_path / "data", {"train": ["x", "y"], "val": ["y"]})
    test = load_dataset(str(data), train=False)
    assert {label for _, label in test.samples} == {1} and test.classes == ["x", "y"]
    out = tmp_path / "knn"
    assert main(["probe", "--init", "pixels", "--protocol", "knn", "--data", str(data), "--knn-k", "3",
                 "--val-size", "0", "--out", str(out), "--no-tensorboard"]) == 0  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["top1"] == 100.0 and results["classes"] == ["x", "y"]


def test_a_class_only_the_evaluation_split_has_is_one_error(tmp_path, capsys):
    data = split_folder(tmp_path / "data", {"train": ["x", "y"], "val": ["y", "z"]})
    assert main(["probe", "--init", "pixels", "--protocol", "knn", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "class folder(s) the training split lacks: z" in err and len(err.strip().splitlines()) == 1


def test_resume_with_only_out_continues_the_runs_own_data_and_task(tmp_path, capsys):
    """The README's form (``--out RUN --resume``) keeps the run's folder data, task and K; a safe
    change is said; one that would alter the run is refused."""
    data = split_folder(tmp_path / "data", {"train": ["x", "y"], "test": ["x"]})
    run = tmp_path / "run"
    first = ["pretrain", *TINY, "--data", str(data), "--task", "denoise", "--steps", "2", "--log-every", "1"]
    assert main([*first, "--max-steps", "2", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["pretrain", "--out", str(run), "--resume", "--max-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "resuming with max_steps 3 (the run had 2)" in out and f"of {data / 'train'}" in out
    assert "task denoise, K=2" in out and [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    assert main(["pretrain", "--config", str(run / "config.yaml"), "--resume", "--max-steps", "4"]) == 0
    assert main(["pretrain", "--out", str(run), "--resume", "--blr", "0.1"]) == 2
    assert "made with blr=0.004, not 0.1" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["pretrain", "finetune", "probe"])
@pytest.mark.parametrize("device,message", [("cuda", "no GPU is available here"), ("gpu", "unknown device 'gpu'")])
def test_a_device_this_machine_lacks_is_one_error(tmp_path, capsys, command, device, message):
    assert main([command, "--device", device, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "available: auto, cpu" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["finetune", "--label-fraction", "1.5"], "label_fraction must be in (0, 1]"),
        (["pretrain", "--method", "mocov3", "--steps", "3"], "--steps does not apply to mocov3"),
        (["pretrain", "--method", "dino", "--langevin-std", "0.1", "--alpha-init", "3"],
         "--alpha-init, --langevin-std do not apply to dino"),
        (["pretrain", "--method", "ijepa", "--loss", "smooth_l1"], "--loss does not apply to ijepa"),
        (["pretrain", "--method", "mae", "--method-options", "{mask_ratio: 1.5}"], "mask_ratio must be in (0, 1)"),
        (["pretrain", "--method", "dino", "--method-options", "{teacher_temp: 0}"], "teacher_temp must be > 0"),
        (["pretrain", "--head-init-std", "0"], "head_init_std must be > 0"),
    ],
)  # fmt: skip
def test_options_that_cannot_apply_or_are_out_of_range_are_refused(tmp_path, capsys, args, message):
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
