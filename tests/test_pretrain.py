"""The `pretrain` command end to end on the embedded data with a one-block ViT."""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import TORCHRUN
from energyssl.checkpoint import BACKBONE, find_checkpoint, load_training_state, read_metadata
from energyssl.cli import main
from energyssl.metrics import read_metrics
from energyssl.schedules import warmup_cosine as cosine_lr

TINY = ["--model", "essl_vit_micro_patch7", "--batch-size", "16", "--no-tensorboard", "--log-every", "1"]


def run_cli(*args: str, timeout: int = 300, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "energyssl", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_pretrain_writes_checkpoint_metrics_config_and_a_timm_backbone(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "--out", str(out), "--max-steps", "3", "--task", "grid_mask"]) == 0
    assert find_checkpoint(out).name == "checkpoint-00000003"
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == [1, 2, 3]
    assert "task: grid_mask" in (out / "config.yaml").read_text()
    report = json.loads((out / "restoration.json").read_text())
    assert set(report["tasks"]) == {"grid_mask"}

    meta = read_metadata(out / BACKBONE)
    model = timm.create_model(meta["model"], num_classes=10, **json.loads(meta["model_kwargs"]))
    missing, unexpected = model.load_state_dict(load_file(out / BACKBONE), strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected
    energy_weights = load_file(find_checkpoint(out) / "model.safetensors")
    torch.testing.assert_close(model.patch_embed.proj.weight, energy_weights["backbone.patch_embed.proj.weight"])


@pytest.mark.parametrize("grad_mode", ["exact", "fast"])
def test_short_pretraining_restores_better_than_the_corruption(tmp_path, grad_mode):
    out = tmp_path / "run"
    args = ["pretrain", *TINY, "--out", str(out), "--max-steps", "60", "--task", "grid_mask", "--log-every", "20"]
    args += ["--grad-mode", grad_mode]
    assert main([*args, "--model", "essl_vit_mini_patch7", "--batch-size", "32", "--warmup-epochs", "0.1"]) == 0
    row = json.loads((out / "restoration.json").read_text())["tasks"]["grid_mask"]
    assert row["restored_mse"] < 0.9 * row["corrupted_mse"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "/nonexistent/images"], "not found"),
        (["--model", "no_such_model"], "unknown model"),
        (["--task", "inpaint"], "unknown task"),
        (["--task", "colorize"], "3-channel"),
        (["--set", "bath_size=3"], "did you mean 'batch_size'"),
        (["--amp", "fp8"], "amp must be one of"),
        (["--grad-mode", "fast", "--amp", "bf16"], "fast needs float32"),
        (["--grad-mode", "fast", "--model", "essl_resnet_tiny"], "has MaxPool2d, ReLU"),
        (["--grad-mode", "fast", "--method", "mae"], "--grad-mode does not apply to mae"),
        (["--time-budget", "0"], "time_budget must be > 0"),
        (["--img-size", "30"], "image size 30 is not a multiple of essl_vit_micro_patch7's patch size 7: use"),
        (["--img-size", "30", "--method", "mae"], "--patch-size 6 or --img-size 28"),
        (["--img-size", "30", "--method", "cae"], "is not a multiple of"),
        (["--set", "epochs=abc"], "config key 'epochs' must be a number, got 'abc'"),
        (["--set", "save_every=1.5"], "config key 'save_every' must be an integer, got 1.5"),
        (["--set", "crop_scale=0.5"], "config key 'crop_scale' must be a list, got 0.5"),
        (["--blr", "-1"], "blr must be > 0, got -1.0"),
        (["--img-size", "5"], "img_size must be >= 8, got 5"),
        (["--method-options", "{mask_ratio: 0.5}"], "unknown option(s) for energy: mask_ratio"),
        (["--method", "mae", "--task", "denoise"], "--task does not apply to mae"),
        (["--set", "corruption.denoise.gamma=[0.2, 0.8]"], "parameters for denoise do not apply to task masking"),
        (["--task", "grid_mask", "--set", "corruption.mixed.weights=[1, 2]"], "for mixed do not apply"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, capsys, args, message):
    assert main(["pretrain", *TINY, "--out", str(tmp_path / "run"), "--max-steps", "1", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_config_file_key_and_empty_folder(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("epocs: 3\n")
    assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "a")]) == 2
    assert "unknown config key 'epocs'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["pretrain", *TINY, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "b")]) == 2
    assert "no readable images" in capsys.readouterr().err


def test_config_file_and_flags_combine(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("task: grid_mask\ncorruption: {grid_mask: {ratio: 0.3}}\nsteps: 1\nbatch_size: 8\n")
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "--config", str(config), "--out", str(out), "--max-steps", "1"]) == 0
    saved = (out / "config.yaml").read_text()
    assert "ratio: 0.3" in saved and "steps: 1" in saved and "batch_size: 16" in saved  # the flag wins


def test_nan_loss_stops_with_the_last_good_state(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["pretrain", *TINY, "--out", str(out), "--max-steps", "5", "--alpha-init", "1e38"])
    assert code == 2
    assert "loss is" in capsys.readouterr().err
    folder = find_checkpoint(out)
    assert load_training_state(folder)["step"] == 0
    weights = load_file(folder / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "--out", str(out), "--max-steps", "1"]) == 0
    assert main(["pretrain", *TINY, "--out", str(out), "--max-steps", "1"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_killed_run_resumes_at_its_step_with_the_same_schedule(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--out", str(out), "--save-every", "3", "--epochs", "2", "--warmup-epochs", "0.5"]
    proc = subprocess.Popen([sys.executable, "-m", "energyssl", "pretrain", *args], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    latest = out / "latest"
    while time.time() < deadline and not (latest.exists() and int(latest.read_text().split("-")[1]) >= 6):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = find_checkpoint(out)
    saved_step = load_training_state(saved)["step"]
    assert saved_step >= 6 and saved_step % 3 == 0

    result = run_cli("pretrain", *args, "--resume", "--max-steps", str(saved_step + 3))
    assert result.returncode == 0, result.stderr
    assert f"at step {saved_step}" in result.stdout
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, saved_step + 4))  # no step logged twice
    resumed = [r for r in records if r["step"] > saved_step]
    steps_per_epoch = 4000 // 16
    for r in resumed:
        # the schedule is that of the uninterrupted 2-epoch run
        expected = cosine_lr(r["step"] - 1, 4e-3 * 16 / 256, 0.0, steps_per_epoch // 2, 2 * steps_per_epoch)
        assert r["lr"] == pytest.approx(expected)
    assert load_training_state(find_checkpoint(out))["step"] == saved_step + 3


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "--out", str(out), "--max-steps", "1"]) == 0
    code = main(["pretrain", *TINY, "--out", str(out), "--resume", "--model", "essl_vit_mini_patch7"])
    assert code == 2
    assert "model=essl_vit_micro_patch7" in capsys.readouterr().err


def test_torchrun_two_processes(tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        *TORCHRUN,
        "-m", "energyssl", "pretrain", *TINY, "--out", str(out), "--max-steps", "3", "--task", "grid_mask",
    ]  # fmt: skip
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 process(es)" in result.stdout
    assert load_training_state(find_checkpoint(out))["step"] == 3
    assert Path(out / BACKBONE).exists()

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert again.returncode != 0 and again.stderr.count("already holds a run") == 2  # both ranks, no hang
    cmd[cmd.index("3")] = "5"
    resumed = subprocess.run(
        [*cmd, "--resume"], capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(load_training_state(find_checkpoint(out))["random"]) == 2  # each rank's random states


@pytest.mark.parametrize("method,options", [("mocov3", "{}"), ("dino", "{local_crops: 2}")])
def test_torchrun_gathers_keys_and_averages_the_centre(tmp_path, method, options):
    """MoCo v3's keys come from every process (all_gather) and DINO's centre is averaged over
    them (all_reduce): two processes train through both collectives without a hang."""
    out = tmp_path / method
    cmd = [
        *TORCHRUN,
        "-m", "energyssl", "pretrain", *TINY, "--method", method, "--method-options", options, "--out", str(out),
        "--max-steps", "2",
    ]  # fmt: skip
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 process(es)" in result.stdout and load_training_state(find_checkpoint(out))["step"] == 2
    if method == "dino":
        center = load_file(find_checkpoint(out) / "model.safetensors")["center"]
        assert center.abs().sum() > 0


def test_ddp_keeps_ranks_in_sync_through_the_double_backward():
    worker = Path(__file__).parent / "ddp_sync_worker.py"
    cmd = [*TORCHRUN, str(worker)]
    path = os.pathsep.join(filter(None, [str(worker.parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("in sync") == 4  # 2 ranks x (exact, fast)


def test_time_budget_stops_the_run_and_decays_the_lr_within_it(tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", *TINY, "--out", str(out), "--epochs", "50", "--warmup-epochs", "0", "--time-budget", "0.05"]
    assert main([*args, "--task", "grid_mask", "--save-every", "0"]) == 0
    state = load_training_state(find_checkpoint(out))
    assert 3.0 <= state["elapsed"] < 10.0
    assert 0 < state["step"] < 50 * 250  # far from the 50 epochs: the budget ended the run
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[-1]["lr"] < 0.2 * rows[0]["lr"]  # the cosine ran its course within the budget


def test_a_fraction_of_an_epoch_is_a_step_exact_schedule(tmp_path):
    """250 steps per epoch: 0.025 epochs is 6 steps, and the cosine ends with the run, not
    somewhere in a longer schedule cut short."""
    out = tmp_path / "run"
    args = ["pretrain", *TINY, "--out", str(out), "--epochs", "0.025", "--warmup-epochs", "0", "--task", "grid_mask"]
    assert main(args) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and load_training_state(find_checkpoint(out))["step"] == 6
    base = rows[0]["lr"]
    assert [r["lr"] for r in rows] == pytest.approx([cosine_lr(s, base, 0.0, 0, 6) for s in range(6)])


def test_default_model_adapts_its_patch_to_32_px_images(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["pretrain", "--img-size", "32", "--batch-size", "8", "--max-steps", "1", "--no-tensorboard"]
    assert main([*args, "--out", str(out)]) == 0
    assert "takes patch size 8 for 32 px images" in capsys.readouterr().out
    assert read_metadata(out / BACKBONE)["model_kwargs"] == json.dumps({"in_chans": 1, "img_size": 32, "patch_size": 8})


def test_loader_workers_default_to_the_cpus_on_a_gpu_only():
    from energyssl.distributed import World, loader_workers

    assert loader_workers(None, torch.device("cpu"), World()) == 0
    assert loader_workers(3, torch.device("cuda"), World()) == 3
    with mock.patch("os.cpu_count", return_value=16):
        assert loader_workers(None, torch.device("cuda"), World()) == 8
        with mock.patch("torch.cuda.device_count", return_value=8):
            assert loader_workers(None, torch.device("cuda"), World(size=8)) == 1


@pytest.mark.parametrize("size", ["small", "base"])
def test_paper_configs_are_valid_and_run(tmp_path, size):
    """The paper's recipes parse and validate; the pretraining one runs a step on small stand-ins."""
    from energyssl.config import FinetuneConfig, PretrainConfig, add_arguments, resolve
    from energyssl.methods import method_flags
    from energyssl.pretrain import validate

    configs = Path(__file__).parent.parent / "configs"
    for kind, cls in (("pretrain", PretrainConfig), ("finetune", FinetuneConfig)):
        parser = argparse.ArgumentParser()
        flags = method_flags() if kind == "pretrain" else []
        add_arguments(parser, cls, flags)
        cfg = resolve(parser.parse_args(["--config", str(configs / f"vit_{size}_patch16_{kind}.yaml")]), cls, flags)
        assert cfg.img_size == 224 and cfg.weight_decay == 0.05
        if kind == "pretrain":
            validate(cfg)
            options = cfg.method_options
            assert (options["task"], options["steps"], cfg.blr, cfg.amp) == ("mixed", 2, 1e-4, "bf16")
    args = ["pretrain", "--config", str(configs / f"vit_{size}_patch16_pretrain.yaml"), "--data", "embedded"]
    args += ["--model", "essl_vit_micro_patch7", "--img-size", "28", "--amp", "none", "--batch-size", "8"]
    assert main([*args, "--max-steps", "1", "--no-tensorboard", "--out", str(tmp_path / "run")]) == 0


def test_the_last_step_is_logged_even_off_the_log_interval(tmp_path):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "--out", str(out), "--max-steps", "3", "--log-every", "10"]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [3]


def test_resume_keeps_the_runs_gradient_mode_and_frozen_parameters(tmp_path, capsys):
    """Fast mode freezes nothing on this ViT, exact mode its final norm's bias: resuming a fast run
    in exact mode (or with auto resolving otherwise) must keep the run's optimizer groups."""
    out = tmp_path / "run"
    base = ["pretrain", *TINY, "--out", str(out), "--task", "grid_mask"]
    assert main([*base, "--grad-mode", "fast", "--max-steps", "2"]) == 0
    assert main([*base, "--grad-mode", "exact", "--max-steps", "4", "--resume"]) == 0
    capsys.readouterr()
    assert main([*base, "--max-steps", "6", "--resume"]) == 0  # auto: the mode its checkpoint was made in
    assert "precision: exact gradient" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change,named", [(["--task", "masking"], "task=grid_mask"), (["--steps", "1"], "steps=2"),
                     (["--batch-size", "8"], "batch_size=16")],
)  # fmt: skip
def test_resume_refuses_another_task_k_or_batch(tmp_path, capsys, change, named):
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "--out", str(out), "--task", "grid_mask", "--max-steps", "1"]) == 0
    capsys.readouterr()
    assert main(["pretrain", *TINY, "--out", str(out), "--task", "grid_mask", "--resume", *change]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["finetune", "probe"])
def test_eval_commands_refuse_bad_values_in_one_line(tmp_path, capsys, command):
    config = tmp_path / "c.yaml"
    config.write_text("epochs: ten\n")
    assert main([command, "--config", str(config), "--out", str(tmp_path / "x")]) == 2
    assert main([command, "--blr", "-1", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: config key 'epochs' must be an integer, got 'ten'", "error: blr must be > 0, got -1.0"]


def test_help_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: the dataset's image size) (default: None)" not in text
    assert "input size (default: the dataset's image size)" in text and "(default: 64)" in text


@pytest.mark.parametrize(
    "model", ["essl_resnet_tiny", "essl_convnext_tiny", "essl_vit_tiny_patch4", "essl_vit_mini_patch7"]
)
def test_every_preset_learns_in_20_steps_from_init(tmp_path, model):
    """Finite, and the restored error over the corruption's (batches differ in difficulty) lower in
    the last 5 steps than in the first 5. ResNet's loss used to reach 23x the corruption's in 20
    steps, its BatchNorm statistics moving under alpha; ConvNeXt's dE/dx started near 1e9."""
    out = tmp_path / "run"
    args = ["pretrain", "--model", model, "--batch-size", "32", "--max-steps", "20", "--log-every", "1"]
    args += ["--steps", "1"]  # one restoration step: what is checked is the preset, not K (half the time)
    assert main([*args, "--no-tensorboard", "--vis-every", "0", "--out", str(out)]) == 0
    records = read_metrics(out / "metrics.jsonl")
    ratios = [r["loss"] / r["corrupted_loss"] for r in records]
    assert len(ratios) == 20 and all(math.isfinite(r) for r in ratios)
    assert sum(ratios[-5:]) < sum(ratios[:5])


def test_accumulating_two_micro_batches_makes_the_step_of_one_twice_as_large(tmp_path):
    """--accum-iter 2 at batch 8 trains the parameters batch 16 trains (no BatchNorm, and a
    corruption without randomness: super-resolution), up to float rounding; the schedule counts
    optimizer steps and the logged loss is the micro-batches' mean."""
    from safetensors.torch import load_file

    base = ["pretrain", "--model", "essl_vit_micro_patch7", "--task", "super_resolution", "--grad-mode", "exact"]
    base += ["--max-steps", "4", "--log-every", "1", "--no-tensorboard", "--epochs", "1"]
    assert main([*base, "--batch-size", "16", "--out", str(tmp_path / "big")]) == 0
    assert main([*base, "--batch-size", "8", "--accum-iter", "2", "--out", str(tmp_path / "accum")]) == 0
    big, accum = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("big", "accum"))
    assert [r["step"] for r in accum] == [1, 2, 3, 4] and [r["lr"] for r in accum] == [r["lr"] for r in big]
    assert [r["loss"] for r in accum] == pytest.approx([r["loss"] for r in big], rel=1e-4)
    one, two = (load_file(tmp_path / name / "backbone.safetensors") for name in ("big", "accum"))
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6)


def test_accumulated_gradients_equal_the_large_batchs():
    """Two micro-batches of 8 give the gradient of one batch of 16 (each loss divided by their
    number): plain SGD, which unlike AdamW would show a factor of 2, moves the parameters alike."""
    import copy

    from energyssl import create_backbone
    from energyssl.distributed import World
    from energyssl.engine import accumulated_step
    from energyssl.methods import method_for
    from energyssl.precision import Precision

    torch.manual_seed(0)
    method = method_for("energy", create_backbone("essl_vit_micro_patch7"), task="super_resolution", steps=1,
                        grad_mode="exact")  # fmt: skip
    other = copy.deepcopy(method)
    images = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(0)
    halves = [([images[:8]], generator), ([images[8:]], generator)]
    for model, batches in ((method, [([images], generator)]), (other, halves)):
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        accumulated_step(model, batches, optimizer, Precision(), None, World(), 0)
    for (name, p), q in zip(method.named_parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7, msg=name)
