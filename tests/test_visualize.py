"""Figures and the restore / energy / plot commands, from short pretrainings on the embedded data."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from energyssl.checkpoint import find_checkpoint
from energyssl.cli import main
from energyssl.methods.energy.figures import auroc, psnr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A mini ViT pretrained for 60 steps on grid masking with K=2: enough to restore measurably."""
    out = tmp_path_factory.mktemp("vis") / "run"
    args = ["pretrain", "--model", "essl_vit_mini_patch7", "--batch-size", "32", "--task", "grid_mask", "--steps", "2"]
    args += ["--max-steps", "60", "--warmup-epochs", "0.1", "--no-tensorboard", "--out", str(out)]
    assert main(args) == 0
    return out


def _png(path):
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return img.size


def test_pretraining_saves_a_grid_of_the_expected_layout(trained):
    width, height = _png(trained / "restorations" / "final.png")
    columns, rows = 1 + 2 + 1, 4  # corrupted, 2 steps, original; 4 held-out images of one task
    assert (width, height) == (round(100 * (1.4 * columns + 1.2)), round(100 * (1.4 * rows + 0.6)))


def test_epoch_grids_follow_vis_every(tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--model", "essl_vit_micro_patch7", "--batch-size", "500", "--epochs", "2", "--no-tensorboard"]
    assert main([*args, "--task", "mixed", "--out", str(out)]) == 0
    grids = sorted(p.name for p in (out / "restorations").iterdir())
    assert grids == ["epoch-001.png", "epoch-002.png", "final.png"]
    width, height = _png(out / "restorations" / "final.png")
    assert height > 4 * width  # five tasks of four rows each


def test_restore_improves_psnr_after_pretraining(trained, tmp_path):
    out = tmp_path / "restore"
    assert main(["restore", "--init", str(trained), "--task", "grid_mask", "--count", "64", "--out", str(out)]) == 0
    psnrs = json.loads((out / "restoration.json").read_text())["psnr"]["grid_mask"]
    assert psnrs["psnr_restored"] > psnrs["psnr_corrupted"] + 0.3
    _png(out / "restoration.png")


def test_restore_user_images_as_given(trained, tmp_path, capsys):
    files = []
    for i in range(3):
        path = tmp_path / f"photo{i}.png"
        Image.fromarray((np.random.default_rng(i).random((40, 40 + 20 * i, 3)) * 255).astype(np.uint8)).save(path)
        files.append(str(path))
    out = tmp_path / "restore"
    assert main(["restore", "--init", str(trained), "--task", "none", "--images", *files, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "photo2.png: 80x40 -> centre 28x28, RGB -> L" in printed  # aspect kept by a centre crop, and said
    report = json.loads((out / "restoration.json").read_text())
    assert report["images"] == ["photo0.png", "photo1.png", "photo2.png"] and report["psnr"] == {}
    assert "no clean image" in report["psnr_note"]
    width, height = _png(out / "restoration.png")
    assert (width, height) == (round(100 * (1.4 * 3 + 1.2)), round(100 * (1.4 * 3 + 0.6)))  # no original column


def test_restore_errors_are_clear(trained, tmp_path, capsys):
    assert main(["restore", "--init", str(trained), "--images", str(tmp_path / "missing.png")]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert main(["restore", "--init", str(tmp_path), "--data", "embedded"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["energy", "--init", str(trained), "--task", "sorting", "--out", str(tmp_path / "e")]) == 2
    assert "not pixels" in capsys.readouterr().err


def test_energy_histogram_and_auroc(trained, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    for i in range(20):
        Image.fromarray((np.random.default_rng(i).random((28, 28, 3)) * 255).astype(np.uint8)).save(other / f"{i}.png")
    out = tmp_path / "energy"
    args = ["energy", "--init", str(trained), "--count", "200", "--compare", str(other), "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "energy.json").read_text())
    assert set(report["stats"]) == {"real", "corrupted (grid_mask)", "restored (1 step)", f"other: {other}"}
    assert report["stats"]["real"]["count"] == 200 and report["stats"][f"other: {other}"]["count"] == 20
    assert 0.0 <= report["auroc_real_vs_corrupted"] <= 1.0 and 0.0 <= report["auroc_real_vs_other"] <= 1.0
    printed = capsys.readouterr().out
    assert f"real vs {other}: " in printed and "3-channel images converted to the model's 1 (L)" in printed
    _png(out / "energy.png")


def test_plot_overlays_runs(trained, tmp_path):
    assert main(["plot", str(trained), str(trained), "--out", str(tmp_path / "curves.png")]) == 0
    width, height = _png(tmp_path / "curves.png")
    assert width > 2 * height  # three panels side by side
    assert main(["plot", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert main(["plot", str(trained), str(tmp_path), "--out", str(tmp_path / "y.png")]) == 0  # skips the bad one
    _png(tmp_path / "y.png")


def test_auroc_and_psnr_values():
    assert auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 0.0
    assert auroc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    x = torch.zeros(1, 1, 4, 4)
    assert psnr(x + 0.1, x).item() == pytest.approx(20.0)


@pytest.mark.parametrize(
    "args,message",
    [(["restore", "--steps", "-2"], "--steps must be >= 1, got -2"), (["restore", "--steps", "0"], "--steps must be"),
     (["restore", "--count", "0"], "--count must be >= 1, got 0"), (["energy", "--count", "0"], "--count must be")],
)  # fmt: skip
def test_analysis_counts_and_steps_must_be_positive(trained, tmp_path, capsys, args, message):
    assert main([*args, "--init", str(trained), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_restore_takes_a_checkpoint_file_as_init(trained, tmp_path):
    weights = find_checkpoint(trained) / "model.safetensors"
    out = tmp_path / "restore"
    assert main(["restore", "--init", str(weights), "--task", "grid_mask", "--count", "2", "--out", str(out)]) == 0
    assert (out / "restoration.png").is_file()


def test_restore_and_energy_corrupt_with_the_runs_own_parameters(tmp_path):
    from energyssl.methods.energy.commands import corruption_for, load_energy_model

    out = tmp_path / "run"
    args = ["pretrain", "--model", "essl_vit_micro_patch7", "--task", "grid_mask", "--max-steps", "1"]
    assert main([*args, "--set", "corruption.grid_mask.ratio=0.2", "--no-tensorboard", "--out", str(out)]) == 0
    assert corruption_for("grid_mask", load_energy_model(str(out))).ratio == 0.2
