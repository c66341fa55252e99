"""Precision: bf16 and fp16 pretraining (fp16's own scale for dE/dx, skipped steps), fine-tuning
under GradScaler, fast mode's float32 guard and the rule behind ``--grad-mode auto``."""

import json
from unittest import mock

import pytest
import torch

from conftest import tiny_vit
from energyssl.cli import main
from energyssl.distributed import World
from energyssl.engine import accumulated_step
from energyssl.methods.base import freeze_unreached_parameters
from energyssl.methods.energy import EnergyMethod
from energyssl.methods.energy.precision import InputGradScale, choose_precision
from energyssl.metrics import read_metrics
from energyssl.precision import Precision

TINY = ["--model", "essl_vit_micro_patch7", "--batch-size", "32", "--no-tensorboard", "--device", "cpu"]


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_half_precision_pretraining_is_finite_and_learns(tmp_path, amp):
    out = tmp_path / amp
    args = ["pretrain", *TINY, "--amp", amp, "--max-steps", "60", "--lr", "3e-3", "--warmup-epochs", "0.05"]
    assert main([*args, "--task", "grid_mask", "--log-every", "10", "--out", str(out)]) == 0
    records = read_metrics(out / "metrics.jsonl")
    assert len(records) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    row = json.loads((out / "restoration.json").read_text())["tasks"]["grid_mask"]
    assert row["restored_mse"] < 0.95 * row["corrupted_mse"]
    if amp == "fp16":
        assert records[-1]["input_grad_scale"] <= InputGradScale().max_scale


def _fp16_step(scale: float):
    model = tiny_vit()
    method = EnergyMethod.around(model, "grid_mask", steps=1)
    precision = Precision.build(method.configure_precision("fp16", torch.device("cpu"), {}).dtype, torch.device("cpu"))
    images = torch.randn(8, 1, 14, 14, generator=torch.Generator().manual_seed(0))
    freeze_unreached_parameters(method, [images[:2]])
    method.input_scale.scale = scale
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    before = model.head.weight.detach().clone()
    batch = ([images], torch.Generator().manual_seed(1))
    out = accumulated_step(method, [batch], optimizer, precision, None, World(), 0)
    return out, method, not torch.equal(before, model.head.weight)


def test_fp16_overflow_of_the_input_gradient_skips_the_step_and_halves_its_scale():
    out, method, changed = _fp16_step(2.0**20)  # 2**20 is beyond fp16's largest number
    assert out is None and not changed and method.input_scale.scale == 2.0**19
    out, method, changed = _fp16_step(2.0**4)
    assert out is not None and torch.isfinite(out.loss) and changed


def test_input_scale_grows_after_good_steps_and_gives_up_at_its_floor():
    scale = InputGradScale(scale=4.0, growth_interval=2)
    scale.update(True)
    scale.update(True)
    assert scale.scale == 8.0
    while not scale.exhausted:
        scale.update(False)
    assert scale.scale < scale.min_scale


def test_finetune_in_fp16_steps_through_a_grad_scaler(tmp_path):
    updates = []
    original = torch.amp.GradScaler.update

    def counting(self, *args, **kwargs):
        updates.append(self.get_scale())
        return original(self, *args, **kwargs)

    with mock.patch.object(torch.amp.GradScaler, "update", counting):
        args = ["finetune", "--model", "essl_vit_micro_patch7", "--amp", "fp16", "--device", "cpu", "--epochs", "1"]
        args += ["--max-steps", "3", "--label-fraction", "0.05", "--no-tensorboard", "--out", str(tmp_path)]
        assert main(args) == 0
    assert len(updates) == 3


def test_fast_mode_runs_its_passes_in_true_float32():
    model = tiny_vit()
    model.grad_mode = "fast"
    seen = []
    energy = model.energy

    def recording(x):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return energy(x)

    images = torch.randn(4, 1, 14, 14)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        model.restoration_loss(images * 0, lambda x: (x - images).pow(2).mean(), steps=2, energy_fn=recording)
        assert seen and all(flags == (False, False) for flags in seen)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_auto_precision_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_precision("auto", "auto", [], cpu)[:2] == ("fast", None)
    assert choose_precision("auto", "none", [], cuda)[:2] == ("fast", None)
    assert choose_precision("auto", "auto", ["ReLU"], cpu)[:2] == ("exact", None)
    assert choose_precision("auto", "bf16", [], cpu)[:2] == ("exact", torch.bfloat16)
    assert choose_precision("exact", "fp16", [], cpu)[:2] == ("exact", torch.float16)
    with mock.patch("torch.cuda.is_bf16_supported", return_value=True):
        mode, dtype, why = choose_precision("auto", "auto", [], cuda)
    assert (mode, dtype) == ("exact", torch.bfloat16) and "gpu_check" in why


def test_pretrain_says_which_precision_it_chose_and_why(tmp_path, capsys):
    assert main(["pretrain", *TINY, "--max-steps", "1", "--out", str(tmp_path / "run")]) == 0
    assert "precision: fast gradient, float32 (float32: fast mode costs less" in capsys.readouterr().out


def test_alpha_is_calibrated_so_the_first_step_covers_half_the_corruption():
    model = tiny_vit()
    method = EnergyMethod.around(model, "grid_mask")
    images = torch.randn(8, 1, 14, 14, generator=torch.Generator().manual_seed(0))
    assert method.prepare([images])[0].startswith("alpha starts at")
    alpha = model.alpha.item()
    corrupted = method.task.corruption(images, torch.Generator().manual_seed(0))
    step = alpha * model.energy_grad(corrupted)
    rms = lambda x: x.pow(2).mean().sqrt().item()  # noqa: E731
    assert alpha == pytest.approx(model.alpha.item()) and alpha != pytest.approx(1.0, rel=0.05)
    assert rms(step) == pytest.approx(0.5 * rms(corrupted - images), rel=1e-4)


def test_pretrain_calibrates_alpha_unless_given(tmp_path, capsys):
    base = ["pretrain", *TINY, "--max-steps", "1", "--log-every", "1"]
    assert main([*base, "--out", str(tmp_path / "auto")]) == 0
    assert "alpha starts at" in capsys.readouterr().out
    assert main([*base, "--alpha-init", "2", "--out", str(tmp_path / "fixed")]) == 0
    assert "alpha starts at" not in capsys.readouterr().out
    assert read_metrics(tmp_path / "fixed" / "metrics.jsonl")[0]["alpha"] == pytest.approx(2.0, rel=1e-2)


def test_attentive_probe_checks_tokens_on_the_models_device_in_eval_mode(tmp_path):
    """The token check sends one image through the model: on its device, and in eval mode so a
    CNN's BatchNorm accepts a batch of one."""
    args = ["probe", "--protocol", "attentive", "--model", "essl_resnet_tiny", "--label-fraction", "0.02"]
    args += ["--epochs", "1", "--max-steps", "2", "--device", "cpu", "--no-tensorboard", "--out", str(tmp_path)]
    assert main(args) == 0


def test_channels_last_only_for_convolutional_backbones_on_gpus():
    from energyssl import EnergyModel, create_backbone
    from energyssl.precision import channels_last_if_cnn

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    resnet = EnergyModel(create_backbone("essl_resnet_tiny", in_chans=1))
    vit = tiny_vit()
    with mock.patch.object(torch.nn.Module, "to", lambda self, **kwargs: kwargs.get("memory_format")):
        assert channels_last_if_cnn(resnet, cuda) == torch.channels_last
        assert channels_last_if_cnn(vit, cuda) is vit and channels_last_if_cnn(resnet, cpu) is resnet
