"""Device check: the paper's setting (ViT at 224 px, colour, bf16 / fp16) on one GPU, in one script
that needs nothing beyond torch (2.4 or newer), timm and safetensors.

    PYTHONPATH=src python3 benchmarks/gpu_check.py --out DIR     # a GPU machine, under 8 minutes
    python benchmarks/gpu_check.py --smoke --out DIR              # the same code paths on CPU, tiny

It writes ``gpu_check.json`` and ``gpu_check.md`` in DIR (after every section, so a run cut
short keeps what it measured). The compiled rows may add up to 6 minutes (4 variants, each
stopped after 90 s); on a tight budget run them as their own command, ``--only compiled``,
after the rest (a partial rerun keeps the other sections):

1. versions, GPU, and the measured bf16 matmul rate (the ceiling);
2. the step cost of each method at ViT-B/16, 224 px, batch 64, in bf16 and float32: img/s, peak
   memory, FLOPs per image (``torch.utils.flop_counter``, double backward included), achieved
   TFLOP/s and its share of the ceiling; then ``--compile``'s rows (supervised, energy K=1 and K=2
   exact, MAE; bf16, inductor), each in its own process: the same, with the compile time and the
   gradient's cosine to eager; from the faster of eager and compiled, the predicted time of the
   paper's schedules;
3. fast vs exact parameter gradient (cosine) with TF32 on and off;
4. peak memory of each corruption at 224 px, batch 256;
5. 128 steps of pretraining at 224 px (the embedded images, resized, 3 channels, in an
   ImageNet-layout folder) in bf16 exact, fp16 exact and float32 fast, from the ViT-S/16 config;
6. ``finetune`` (fp16) and the four probes for a few steps on the device.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import multiprocessing
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import energyssl.methods.energy.model as energy_module
from energyssl import EnergyModel, create_backbone
from energyssl.cli import main as cli
from energyssl.compiling import compile_forward
from energyssl.data import load_dataset
from energyssl.distributed import World
from energyssl.engine import accumulated_step
from energyssl.flops import count_flops
from energyssl.methods import method_for
from energyssl.methods.base import Method, freeze_unreached_parameters
from energyssl.methods.energy import EnergyMethod, EnergyOptions
from energyssl.methods.energy.corruptions import TASKS, build_corruption
from energyssl.metrics import read_metrics
from energyssl.precision import Precision

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_IMAGES = 1_281_167
# The paper's efficiency table (Table 4.1, right): GPUs, hours, epochs, ImageNet top-1 (ViT-B).
PAPER_RUNS = {
    "energy (800 epochs)": (8, 175, 800, 83.5),
    "MAE (1600 epochs)": (8, 288, 1600, 83.6),
    "MAE (400 epochs)": (8, 72, 400, 83.1),
}
SECTIONS = ("environment", "step_cost", "compiled", "predicted", "fidelity", "corruption_memory", "pretraining",
            "evaluation")  # fmt: skip
COMPILED_METHODS = ("supervised", "energy K=1 exact", "energy K=2 exact", "mae")  # bf16, --compile
STEP_METHODS = (
    ("supervised", "bf16"), ("energy K=1 exact", "bf16"), ("energy K=2 exact", "bf16"), ("mae", "bf16"),
    ("cae", "bf16"), ("supervised", "fp32"), ("energy K=1 exact", "fp32"), ("energy K=2 exact", "fp32"),
    ("energy K=1 fast", "fp32"), ("energy K=2 fast", "fp32"), ("mae", "fp32"), ("cae", "fp32"),
)  # fmt: skip


@dataclass
class Scale:
    """The sizes of one check: the real one, or ``--smoke`` on a CPU."""

    device: str
    matmul: int
    step_model: str
    step_batch: int
    step_iters: int
    img_size: int
    fidelity_model: str
    fidelity_batch: int
    corruption_batch: int
    pretrain_model: str
    pretrain_steps: int
    pretrain_batch: int
    folder_images: int
    eval_steps: int
    compile_backend: str  # the smoke run traces (aot_eager): inductor's code generation takes minutes on a CPU
    compile_timeout: float  # seconds a compiled variant may take in all, compiling included


REAL = Scale("cuda", 8192, "vit_base_patch16_224", 64, 5, 224, "vit_small_patch16_224", 16, 256,
             "vit_small_patch16_224", 128, 64, 1024, 10, "inductor", 90.0)  # fmt: skip
SMOKE = Scale("cpu", 256, "essl_vit_micro_patch7", 4, 1, 28, "essl_vit_micro_patch7", 4, 8,
              "essl_vit_micro_patch7", 3, 8, 48, 2, "aot_eager", 120.0)  # fmt: skip


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def environment(scale: Scale) -> dict[str, Any]:
    """Versions, device, and the bf16 matmul rate: mean of 10 products after 3 warm-ups."""
    import timm

    n = scale.matmul
    a = torch.randn(n, n, device=scale.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=scale.device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(scale.device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    synchronize(scale.device)
    seconds = (time.perf_counter() - start) / 10
    cuda = scale.device == "cuda"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "memory_gb": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "bf16_matmul_tflops": 2 * n**3 / seconds / 1e12,
    }


def method_step(method: str, scale: Scale, precision: Precision) -> tuple[Callable[[], None], torch.nn.Module]:
    """A closure running one production training step of ``method`` (ViT, 224 px, colour)."""
    device = torch.device(scale.device)
    torch.manual_seed(0)
    images = torch.randn(scale.step_batch, 3, scale.img_size, scale.img_size, device=device)
    backbone = create_backbone(scale.step_model, img_size=scale.img_size, in_chans=3)
    if method == "supervised":
        backbone.reset_classifier(1000)
        model = backbone.to(device)
        labels = torch.randint(0, 1000, (len(images),), device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def supervised() -> None:
            with precision.autocast(device):
                loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return supervised, model
    if method.startswith("energy"):
        _, k, grad_mode = method.split()
        model = method_for("energy", backbone, 3, MEAN, STD, task="mixed", steps=int(k[2:]), grad_mode=grad_mode)
        amp = {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[precision.dtype]
        model.configure_precision(amp, device, {})  # fp16: dE/dx gets its own scale
        model = model.to(device)
        freeze_unreached_parameters(model, [images[:2]])
    else:
        model = method_for(method, backbone, 3, MEAN, STD).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator(device=device).manual_seed(0)
    return lambda: accumulated_step(model, [([images], generator)], optimizer, precision, None, World(), 0), model


def step_costs(scale: Scale, ceiling: float) -> list[dict[str, Any]]:
    """Every method's step cost; one that fails (out of memory, say) is a row with its error."""
    rows = []
    for method, amp in STEP_METHODS:
        try:
            rows.append(step_cost(method, amp, scale, ceiling))
        except Exception as exc:
            rows.append({"method": method, "amp": amp, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        gc.collect()
        if scale.device == "cuda":
            torch.cuda.empty_cache()
        print(rows[-1], flush=True)
    return rows


def step_cost(method: str, amp: str, scale: Scale, ceiling: float) -> dict[str, Any]:
    """img/s (median of ``step_iters`` timed steps after 2 warm-ups), peak memory, FLOPs."""
    dtype = torch.bfloat16 if amp == "bf16" else None
    step, _ = method_step(method, scale, Precision(dtype))
    flops = count_flops(step) / scale.step_batch
    return {"method": method, "amp": amp, **timed(step, scale, flops, ceiling)}


def timed(step: Callable[[], None], scale: Scale, flops: float, ceiling: float) -> dict[str, Any]:
    """img/s (median of ``step_iters`` timed steps after 2 warm-ups), peak memory, the rate."""
    device = torch.device(scale.device)
    if scale.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step()
    times = []
    for _ in range(scale.step_iters):
        synchronize(scale.device)
        start = time.perf_counter()
        step()
        synchronize(scale.device)
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    tflops = flops * scale.step_batch / seconds / 1e12
    return {
        "img_per_s": scale.step_batch / seconds, "peak_gb": peak, "gflops_per_image": flops / 1e9, "tflops": tflops,
        "share_of_ceiling": tflops / ceiling,
    }  # fmt: skip


def compiled_costs(scale: Scale, ceiling: float, eager: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``--compile``'s step cost of each of :data:`COMPILED_METHODS` in bf16, each in its own
    process (a fresh compiler cache and memory peak), stopped after ``compile_timeout``."""
    flops = {r["method"]: r["gflops_per_image"] * 1e9 for r in eager if r.get("amp") == "bf16" and "error" not in r}
    context, rows = multiprocessing.get_context("spawn"), []
    for method in COMPILED_METHODS:
        with context.Pool(1) as pool:
            try:
                work = pool.apply_async(compiled_cost, (method, scale, ceiling, flops.get(method)))
                rows.append(work.get(timeout=scale.compile_timeout))
            except Exception as exc:  # a timeout, an out-of-memory, a compiler error: a row that says so
                rows.append({"method": method, "amp": "bf16", "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        print(rows[-1], flush=True)
    return rows


def compiled_cost(method: str, scale: Scale, ceiling: float, flops: float | None) -> dict[str, Any]:
    """One compiled variant: its first call (compiling) times the compile and gives the cosine
    of its parameter gradient to eager's on the same batch; then the step is timed as eager's."""
    step, model = method_step(method, scale, Precision(torch.bfloat16))
    eager = copy.deepcopy(model)
    if method == "supervised":
        compile_forward(model, scale.compile_backend, announce=False)
    else:
        model.compile_step(scale.compile_backend, announce=False)
    start = time.perf_counter()
    cosine = gradient_cosine(eager, model, scale)
    compile_s = time.perf_counter() - start
    del eager
    flops = flops if flops is not None else float("nan")  # generated code dispatches nothing to count
    return {"method": f"{method}, compiled", "amp": "bf16", **timed(step, scale, flops, ceiling),
            "compile_s": compile_s, "grad_cosine_to_eager": cosine}  # fmt: skip


def gradient_cosine(eager: torch.nn.Module, compiled: torch.nn.Module, scale: Scale) -> float:
    """Cosine between two copies' parameter gradients (bf16 autocast) on one batch and draw."""
    device = torch.device(scale.device)
    images = torch.randn(scale.step_batch, 3, scale.img_size, scale.img_size, device=device)
    flat = []
    for model in (eager, compiled):
        model.zero_grad(set_to_none=True)
        with Precision(torch.bfloat16).autocast(device):
            if isinstance(model, Method):
                loss = model([images], torch.Generator(device=device).manual_seed(1)).loss
            else:  # the supervised classifier
                loss = model(images).float().logsumexp(1).mean()
        loss.backward()
        flat.append(torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None]))
    return F.cosine_similarity(flat[0], flat[1], dim=0).item()


def predicted_hours(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Wall time of the paper's schedules on 8 such GPUs at the measured img/s (perfect scaling,
    no data-loading stalls: a lower bound), beside the paper's hours."""
    rate = {(r["method"], r["amp"]): r["img_per_s"] for r in rows if "img_per_s" in r}
    out = []
    for name, (gpus, hours, epochs, top1) in PAPER_RUNS.items():
        plain = "energy K=2 exact" if name.startswith("energy") else "mae"
        variants = [(v, "bf16") for v in (plain, f"{plain}, compiled") if (v, "bf16") in rate]
        ours = max(variants, key=lambda v: rate[v], default=None)  # the faster of eager and compiled
        if ours is not None:
            predicted = epochs * IMAGENET_IMAGES / (rate[ours] * gpus) / 3600
            out.append({"run": name, "measured_as": " ".join(ours), "gpus": gpus, "paper_hours": hours,
                        "predicted_hours": predicted, "paper_top1": top1})  # fmt: skip
    return out


def parameter_gradient(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    model([images], torch.Generator(device=images.device).manual_seed(0)).loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None and p.ndim > 0]).double()


def fidelity(scale: Scale) -> list[dict[str, Any]]:
    """Cosine of fast mode's parameter gradient to exact mode's (TF32 off, the reference),
    with the float32 guard (the default) and without it under TF32."""
    device = torch.device(scale.device)
    torch.manual_seed(0)
    images = torch.randn(scale.fidelity_batch, 3, scale.img_size, scale.img_size, device=device)
    backbone = create_backbone(scale.fidelity_model, img_size=scale.img_size, in_chans=3)
    energy = EnergyModel(backbone, head_init_std=EnergyOptions.head_init_std, grad_mode="exact").to(device)
    model = EnergyMethod.around(energy, "masking", steps=1, in_chans=3, mean=MEAN, std=STD)
    freeze_unreached_parameters(model, [images[:2]])
    rows = []
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        energy.grad_mode = "exact"
        exact = parameter_gradient(model, images)
        if not tf32:
            reference = exact
        energy.grad_mode = "fast"
        guarded = parameter_gradient(model, images)
        with contextlib.ExitStack() as stack:  # what fast mode would give without its float32 guard
            stack.enter_context(_patched(energy_module, "full_float32", contextlib.nullcontext))
            unguarded = parameter_gradient(model, images)
        for name, grad in (("exact", exact), ("fast (float32 guard)", guarded), ("fast without guard", unguarded)):
            cosine = F.cosine_similarity(grad, reference, dim=0).item()
            row = {"tf32": tf32, "gradient": name, "cosine_to_exact_fp32": cosine, "one_minus_cosine": 1 - cosine}
            rows.append(row)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # PyTorch's defaults
    return rows


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def corruption_memory(scale: Scale) -> list[dict[str, Any]]:
    """Peak memory of each corruption on a batch at 224 px, beyond the batch itself."""
    device = torch.device(scale.device)
    images = torch.randn(scale.corruption_batch, 3, scale.img_size, scale.img_size, device=device)
    rows = []
    for task in TASKS:
        corruption = build_corruption(task, {}, in_chans=3, mean=MEAN, std=STD)
        generator = torch.Generator(device=device).manual_seed(0)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        corruption(images, generator)
        extra = (torch.cuda.max_memory_allocated() - base) / images.nbytes if device.type == "cuda" else None
        rows.append({"task": task, "peak_over_batch": extra})
    return rows


def image_folder(root: Path, count: int, size: int) -> None:
    """The embedded Fashion-MNIST images, resized to ``size`` and made RGB, as train/ and val/
    class folders (the ImageNet layout)."""
    data = load_dataset("embedded", train=True)
    for i in range(count):
        image, label = data[i]
        split = "val" if i % 8 == 0 else "train"
        folder = root / split / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        image.convert("RGB").resize((size, size)).save(folder / f"{i}.png")


def run_cli(args: list[str], scale: Scale) -> tuple[int, str]:
    """Run an ``energyssl`` command and capture its output: on a GPU in its own process, as a
    user would (in one shared process, the third of three pretraining runs once failed to learn
    where the same command in a fresh process learned; the cause is not established); in the
    smoke check in this process, since starting Python eight times costs a CPU a minute."""
    if scale.device == "cuda":
        done = subprocess.run([sys.executable, "-m", "energyssl", *args], capture_output=True, text=True)
        return done.returncode, done.stdout + done.stderr
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        code = cli(args)
    return code, buffer.getvalue()


def pretraining(scale: Scale, folder: Path, work: Path) -> list[dict[str, Any]]:
    """The ViT-S/16 config, shortened to ``pretrain_steps`` steps (warmup and cosine span them)."""
    per_epoch = int(0.875 * scale.folder_images) // scale.pretrain_batch
    epochs = -(-scale.pretrain_steps // per_epoch)
    rows = []
    for amp, grad_mode in (("bf16", "exact"), ("fp16", "exact"), ("none", "fast")):
        out = work / f"pretrain-{amp}-{grad_mode}"
        args = ["pretrain", "--config", "configs/vit_small_patch16_pretrain.yaml", "--data", str(folder)]
        args += ["--model", scale.pretrain_model, "--img-size", str(scale.img_size), "--device", scale.device]
        args += ["--amp", amp, "--grad-mode", grad_mode, "--batch-size", str(scale.pretrain_batch)]
        args += ["--epochs", str(epochs), "--max-steps", str(scale.pretrain_steps), "--warmup-epochs", "1"]
        args += ["--blr", "1.5e-3", "--log-every", "1", "--no-tensorboard", "--out", str(out)]
        start = time.perf_counter()
        code, printed = run_cli(args, scale)
        records = read_metrics(out / "metrics.jsonl") if code == 0 else []
        losses = [r["loss"] for r in records]
        tenth = max(1, len(losses) // 10)
        first, last = (sum(losses[:tenth]) / tenth, sum(losses[-tenth:]) / tenth) if losses else (None, None)
        finite = bool(losses) and all(torch.isfinite(torch.tensor(losses)).tolist())
        # the last restoration step's error over the corruption's: below 1 once restoration helps
        ratios = [r[max(k for k in r if k.startswith("loss_step"))] / r["corrupted_loss"] for r in records]
        rows.append({
            "amp": amp, "grad_mode": grad_mode, "exit": code, "logged_steps": len(losses),
            "loss_first_tenth": first, "loss_last_tenth": last, "finite": finite,
            "lower_at_end": finite and last < first, "seconds": time.perf_counter() - start,
            "restored_over_corrupted_first": sum(ratios[:tenth]) / tenth if ratios else None,
            "restored_over_corrupted_last": sum(ratios[-tenth:]) / tenth if ratios else None,
            "alpha_first": records[0]["alpha"] if records else None,
            "alpha_last": records[-1]["alpha"] if records else None,
            "skipped_steps": records[-1].get("skipped_steps", 0) if records else None,
            "output_tail": printed[-600:] if code else "",
        })  # fmt: skip
    return rows


def evaluation(scale: Scale, folder: Path, work: Path) -> list[dict[str, Any]]:
    """``finetune`` in fp16 (GradScaler) and each probe, a few steps, from the bf16 run."""
    init = work / "pretrain-bf16-exact"
    common = ["--data", str(folder), "--init", str(init), "--device", scale.device, "--no-tensorboard"]
    commands = {"finetune fp16": ["finetune", "--amp", "fp16", "--epochs", "1", "--batch-size", "32"]}
    commands["finetune fp16"] += ["--max-steps", str(scale.eval_steps)]
    for protocol in ("linear", "mlp", "knn", "attentive"):
        commands[f"probe {protocol}"] = ["probe", "--protocol", protocol, "--epochs", "1"]
        commands[f"probe {protocol}"] += ["--max-steps", str(scale.eval_steps)]
    rows = []
    for name, args in commands.items():
        out = work / name.replace(" ", "-")
        code, printed = run_cli([*args, *common, "--out", str(out)], scale)
        top1 = json.loads((out / "results.json").read_text())["metrics"]["top1"] if code == 0 else None
        rows.append({"command": name, "exit": code, "top1": top1, "output_tail": printed[-600:] if code else ""})
    return rows


def report(results: dict[str, Any]) -> str:
    """gpu_check.md: every section as a table."""
    env = results.get("environment", {})
    lines = ["# Device check (benchmarks/gpu_check.py)", ""]
    lines += [f"- {k}: {v:.1f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in env.items()]
    lines += [f"- rerun of {', '.join(r['sections'])} at {r['at']}" for r in results.get("reruns", [])]
    sections = {
        "step_cost": ("Step cost, one training step", ["method", "amp", "img_per_s", "peak_gb", "gflops_per_image",
                                                     "tflops", "share_of_ceiling", "error"]),
        "compiled": ("Step cost with --compile (inductor; --smoke: aot_eager), each in its own process",
                     ["method", "amp", "img_per_s", "peak_gb", "tflops", "share_of_ceiling", "compile_s",
                      "grad_cosine_to_eager", "error"]),
        "predicted": ("The paper's schedules on 8 such GPUs at the measured rate (a lower bound)",
                      ["run", "measured_as", "gpus", "paper_hours", "predicted_hours", "paper_top1"]),
        "fidelity": ("Fast vs exact parameter gradient (cosine to exact mode in float32 with TF32 off)",
                     ["tf32", "gradient", "cosine_to_exact_fp32", "one_minus_cosine"]),
        "corruption_memory": ("Peak memory of each corruption, as a multiple of the batch's own size",
                              ["task", "peak_over_batch"]),
        "pretraining": ("Pretraining from the ViT-S/16 config on the embedded images at 224 px",
                        ["amp", "grad_mode", "exit", "logged_steps", "loss_first_tenth", "loss_last_tenth",
                         "finite", "lower_at_end", "restored_over_corrupted_first", "restored_over_corrupted_last",
                         "alpha_first", "alpha_last", "skipped_steps", "seconds"]),
        "evaluation": ("Fine-tuning and probes on the device", ["command", "exit", "top1"]),
    }  # fmt: skip
    for key, (title, columns) in sections.items():
        value = results.get(key)
        if value is None:
            continue
        lines += ["", f"## {title}", ""]
        if isinstance(value, dict) and "error" in value:
            lines.append(f"failed: {value['error']}")
            continue
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in value]
    if "auto_rule" in results:
        lines += ["", "## --grad-mode auto and --compile on this GPU", "", results["auto_rule"]]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "-" if value is None else str(value)


def auto_rule(rows: list[dict[str, Any]]) -> str:
    """Which of (exact, bf16) and (fast, float32) trains more images per second, per K."""
    rate = {(r["method"], r["amp"]): r["img_per_s"] for r in rows if "img_per_s" in r}
    lines = []
    for k in (1, 2):
        exact, fast = rate.get((f"energy K={k} exact", "bf16")), rate.get((f"energy K={k} fast", "fp32"))
        if exact and fast:
            winner = "exact bf16" if exact >= fast else "fast float32"
            lines.append(f"K={k}: exact bf16 {exact:.0f} img/s, fast float32 {fast:.0f} img/s: {winner} is faster.")
    return " ".join(lines)


def compile_rule(rows: list[dict[str, Any]]) -> str:
    """Whether --compile paid on this GPU for each measured method (the evidence a default needs)."""
    rate = {r["method"]: r["img_per_s"] for r in rows if "img_per_s" in r and r.get("amp") == "bf16"}
    said = []
    for method in COMPILED_METHODS:
        eager, compiled = rate.get(method), rate.get(f"{method}, compiled")
        if eager and compiled:
            said.append(f"{method}: compiled {compiled:.0f} img/s against eager {eager:.0f} ({compiled / eager:.2f}x).")
    return " ".join(said)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on a CPU: checks the code paths only")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run these sections")
    args = parser.parse_args()
    scale = SMOKE if args.smoke else REAL
    if scale.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --smoke")
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"smoke": args.smoke, "scale": vars(scale)}
    previous = out / "gpu_check.json"
    if set(args.only) != set(SECTIONS) and previous.is_file():  # a partial rerun keeps the other sections
        results = {**json.loads(previous.read_text()), **results}
        results.setdefault("reruns", []).append({"sections": args.only, "at": time.strftime("%Y-%m-%d %H:%M")})

    def section(name: str, run: Callable[[], Any]) -> Any:
        if name not in args.only:
            return None
        start = time.perf_counter()
        try:
            results[name] = run()
        except Exception as exc:  # keep the other sections: one run of the device is all there may be
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
        (out / "gpu_check.md").write_text(report(results))
        return results[name]

    env = section("environment", lambda: environment(scale)) or {}
    ceiling = env.get("bf16_matmul_tflops", float("nan"))
    costs = section("step_cost", lambda: step_costs(scale, ceiling))
    eager = costs if isinstance(costs, list) else results.get("step_cost", [])
    compiled = section("compiled", lambda: compiled_costs(scale, ceiling, eager if isinstance(eager, list) else []))
    if isinstance(eager, list):
        both = eager + (compiled if isinstance(compiled, list) else [])
        section("predicted", lambda: predicted_hours(both))
        results["auto_rule"] = auto_rule(eager) + " " + compile_rule(both)
    section("fidelity", lambda: fidelity(scale))
    section("corruption_memory", lambda: corruption_memory(scale))
    folder = work / "images"
    if not folder.is_dir():
        image_folder(folder, scale.folder_images, scale.img_size)
    section("pretraining", lambda: pretraining(scale, folder, work))
    section("evaluation", lambda: evaluation(scale, folder, work))
    print(report(results))


if __name__ == "__main__":
    main()
