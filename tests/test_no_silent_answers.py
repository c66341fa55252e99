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
    probe = ["probe", "--init", "pixels", "--protocol", "knn", "--data", str(data)]
    assert main([*probe, "--out", str(tmp_path / "o")]) == 2
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
        (["finetune", "--label-fraction", "1.5"], "label fraction must be in (0, 1]"),
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


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    """A micro ViT pretrained for one step on a small colour folder (flat: unlabeled)."""
    root = tmp_path_factory.mktemp("colour")
    for i in range(12):
        Image.new("RGB", (28, 28), (20 * i, 200 - 10 * i, 90)).save(root / f"{i}.png")
    run = root / "run"
    args = ["pretrain", *TINY, "--data", str(root), "--task", "colorize", "--max-steps", "1"]
    assert main([*args, "--out", str(run)]) == 0
    return root, run


def test_restore_psnr_counts_only_the_images_the_corruption_changed(colour_run, tmp_path, capsys):
    """Colorizing a grey image leaves it as it was (PSNR infinite, capped at 100 dB): it used to be
    averaged in, giving 58.8 dB for a 17.6 dB image and a grey one."""
    root, run = colour_run
    Image.new("L", (28, 28), 128).save(tmp_path / "grey.png")
    out = tmp_path / "restore"
    assert main(["restore", "--init", str(run), "--task", "colorize", "--images", str(root / "3.png"),
                 str(tmp_path / "grey.png"), "--out", str(out)]) == 0  # fmt: skip
    row = json.loads((out / "restoration.json").read_text())["psnr"]["colorize"]
    assert row["images"] == 1 and row["unchanged"] == 1 and row["psnr_corrupted"] < 60
    assert "1 image(s) it leaves as they were not counted" in capsys.readouterr().out


def test_a_flat_folder_is_described_as_images_not_classes(colour_run, capsys):
    root, _ = colour_run
    assert "a fixed 10% of the images of" in load_dataset(str(root), train=False).split


def test_every_class_of_a_tiny_folder_gets_a_held_out_image(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("L", (28, 28), 50 * i).save(tmp_path / name / f"{i}.png")
    held = load_dataset(str(tmp_path), train=False)
    assert sorted(label for _, label in held.samples) == [0, 1, 2]


@pytest.mark.parametrize(
    "args,message",
    [
        (["restore", "--init", "RUN", "--count", "2000"], "--count must be <= 100"),
        (["restore", "--init", "RUN", "--task", "nonsense"], "or none (restore images as given)"),
        (["pretrain", "--set", "corruption.gridmask.ratio=0.5"], "unknown task 'gridmask' (did you mean 'grid_mask'?)"),
        (["pretrain", "--task", "grid_mask", "--set", "corruption.grid_mask.ratoi=0.5"], "known: cell, ratio"),
    ],
)  # fmt: skip
def test_messages_name_what_to_do(colour_run, tmp_path, capsys, args, message):
    args = [str(colour_run[1]) if a == "RUN" else a for a in args]
    assert main([*args, "--out", str(tmp_path / "o"), *(["--max-steps", "1"] if args[0] == "pretrain" else [])]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_help_and_summaries_say_what_they_mean(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "essl_vit_micro_patch7" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    assert "alpha" not in capsys.readouterr().out.split("--weight-decay")[1].split("--amp")[0]
    assert main(["probe", "--init", "pixels", "--protocol", "knn", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "(raw pixels)" in out and "| 100% of labels |" in out


def test_energy_of_a_sorting_run_corrupts_with_a_pixel_task(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", *TINY, "--task", "sorting", "--max-steps", "1", "--out", str(run)]) == 0
    assert main(["energy", "--init", str(run), "--count", "8", "--out", str(tmp_path / "e")]) == 0
    assert "corrupting with grid_mask" in capsys.readouterr().out


def test_plot_draws_only_what_was_logged(tmp_path, capsys):
    """A one-step run is a dot; a fine-tune's metrics (no alpha) get no empty alpha panel; a
    folder with nothing to draw is one error."""
    from energyssl.visualize import save_curves

    fig_path = save_curves(tmp_path / "one.png", {"run": [{"step": 1, "loss": 0.5, "lr": 1e-3}]})
    assert fig_path.stat().st_size > 0
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text(json.dumps({"step": 1, "top1": 50.0}) + "\n")
    assert main(["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "e.png")]) == 2
    assert "nothing to plot" in capsys.readouterr().err


def test_a_resumed_run_says_its_gradient_mode_is_the_runs_not_asked(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", *TINY, "--task", "grid_mask", "--max-steps", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["pretrain", "--out", str(run), "--resume", "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "(as the resumed run chose)" in out and "as asked" not in out


def test_finetune_says_when_a_small_subset_shrinks_its_batch(tmp_path, capsys):
    args = ["finetune", "--model", "essl_vit_micro_patch7", "--label-fraction", "0.005", "--epochs", "1"]
    assert main([*args, "--no-tensorboard", "--out", str(tmp_path / "ft")]) == 0
    assert "only 20 labeled images: batch 64 -> 20, and the lr with it" in capsys.readouterr().out
