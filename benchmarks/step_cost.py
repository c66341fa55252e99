"""Images per second and peak memory of one training step of each method, on one backbone and
batch, measured in one run (median of repeats) and as ratios to the supervised step.

Each method runs in its own process, so its peak memory is its own: on CPU the growth of the
peak resident set over the process's size before the first step, on CUDA the peak allocated.

    python benchmarks/step_cost.py --model essl_vit_mini_patch7 --batch-size 64 --repeats 5
    python benchmarks/step_cost.py --profile --methods supervised "energy K=1 exact"   # top operators of a step

``--profile`` runs one step of each method under ``torch.profiler`` (after a warm-up) and prints
its operators by self time, and how many operator calls the step makes: where an energy step's
time goes (the double backward's many small kernels); a ``, compiled`` variant is profiled after
its compile (inductor's fused kernels in place of the aten operators).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from energyssl import create_backbone
from energyssl.compiling import compile_forward
from energyssl.flops import count_flops
from energyssl.methods import method_class, method_for
from energyssl.methods.base import freeze_unreached_parameters

MEAN, STD = (0.286,), (0.353,)
METHODS = (
    "supervised",
    "energy K=1 exact",
    "energy K=2 exact",
    "energy K=1 fast",
    "energy K=2 fast",
    "mae",
    "ae",
    "cae",
    "mocov3",
    "dino",
    "ijepa",
    "energy K=2 exact, checkpointed",  # --grad-checkpointing
    "energy K=4 exact",
    "energy K=4 exact, checkpointed",
    "mae, checkpointed",
    "supervised, compiled",  # --compile (inductor)
    "energy K=1 exact, compiled",
    "energy K=2 exact, compiled",
    "mae, compiled",
)
# the views of methods trained on more than one: MoCo v3's pair, DINO's 2 global and 8 local crops
VIEWS = {
    "mocov3": lambda x: [x, x.flip(-1)],
    "dino": lambda x: [x, x.flip(-1), *[x[..., : x.shape[-2] // 2, : x.shape[-1] // 2]] * 8],
}


def build_step(
    method: str, model_name: str, batch: int, task: str, device: str
) -> tuple[Callable[[], None], Callable[[], float] | None]:
    """A closure running forward + backward + AdamW step of ``method`` on a fixed batch
    (``, checkpointed``: with ``--grad-checkpointing``; ``, compiled``: with ``--compile``), and
    for a compiled one, the cosine of its parameter gradient to eager's (the first compiled call)."""
    compiled, method = method.endswith(", compiled"), method.removesuffix(", compiled")
    method, checkpointed = method.removesuffix(", checkpointed"), method.endswith(", checkpointed")
    images = torch.randn(batch, 1, 28, 28, device=device)
    backbone = create_backbone(model_name, img_size=28, in_chans=1).to(device)
    generator = torch.Generator().manual_seed(0)
    if method == "supervised":
        backbone.reset_classifier(10)
        labels = torch.randint(0, 10, (batch,), device=device)
        module, loss_of = backbone, lambda m, g: F.cross_entropy(m(images), labels)
    else:
        options = {}
        if method.startswith("energy"):
            _, k, grad_mode = method.split()
            method, options = "energy", {**options, "steps": int(k[2:]), "grad_mode": grad_mode}
        if "task" in method_class(method).Options.__dataclass_fields__:  # the methods with a pretext task
            options["task"] = task
        module = method_for(method, backbone, 1, MEAN, STD, **options).to(device)
        views = VIEWS[method](images) if method in VIEWS else [images]
        freeze_unreached_parameters(module, [v[:4] for v in views])
        if checkpointed:
            module.set_grad_checkpointing(model_name)
        loss_of = lambda m, g: m(views, g).loss  # noqa: E731
    check = None
    if compiled:
        eager = copy.deepcopy(module)
        if method == "supervised":
            compile_forward(module, "inductor", announce=False)
        else:
            module.compile_step("inductor", announce=False)
        check = lambda: gradient_cosine(eager, module, loss_of)  # noqa: E731
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss = loss_of(module, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device != "cpu":
            torch.cuda.synchronize()

    return step, check


def gradient_cosine(eager: torch.nn.Module, compiled: torch.nn.Module, loss_of: Callable) -> float:
    """Cosine between the two modules' parameter gradients on the same batch and draws."""
    flat = []
    for module in (eager, compiled):
        module.zero_grad(set_to_none=True)
        loss_of(module, torch.Generator().manual_seed(1)).backward()
        flat.append(torch.cat([p.grad.flatten().double() for p in module.parameters() if p.grad is not None]))
    return F.cosine_similarity(flat[0], flat[1], dim=0).item()


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(method: str, args: argparse.Namespace) -> dict[str, float]:
    """Run in a fresh process: images/s (median over repeats) and peak memory of ``method``."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    setup = (args.model, args.batch_size, args.task, args.device)
    step, check = build_step(method, *setup)
    before = _resident_mb()
    start = time.perf_counter()
    cosine = check() if check is not None else None  # a compiled step's first call compiles it
    step()  # warm-up
    first = time.perf_counter() - start
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.iters):
            step()
        rates.append(args.batch_size * args.iters / (time.perf_counter() - start))
    if args.device == "cpu":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    else:
        peak = torch.cuda.max_memory_allocated() / 2**20
    median = statistics.median(rates)
    eager = method.removesuffix(", compiled")  # generated code dispatches no aten ops to count: count eager's
    flops = count_flops(step if eager == method else build_step(eager, *setup)[0])
    return {"img_per_s": median, "spread": (max(rates) - min(rates)) / median, "peak_mb": peak, "gflops": flops / 1e9,
            "first_step_s": first, "grad_cosine": cosine}  # fmt: skip


def profile(method: str, args: argparse.Namespace) -> dict:
    """Run in a fresh process: one profiled step of ``method``, its top operators by self time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    step, _ = build_step(method, args.model, args.batch_size, args.task, args.device)
    step()  # warm-up
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (args.device != "cpu")
    with profiler(activities=activities) as prof:
        step()
    events = prof.key_averages()
    key = "self_cpu_time_total" if args.device == "cpu" else "self_device_time_total"
    table = events.table(sort_by=key, row_limit=args.top)
    return {"calls": sum(e.count for e in events if e.key.startswith("aten::")), "table": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="essl_vit_mini_patch7")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--task", default="grid_mask", help="corruption of the energy and AE steps")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3, help="steps per repeat")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results/step_cost")
    parser.add_argument("--profile", action="store_true", help="print each step's top operators instead")
    parser.add_argument("--top", type=int, default=15, help="--profile: operators shown")
    args = parser.parse_args()
    if args.profile:
        write_profiles(args)
        return
    if "supervised" not in args.methods:
        parser.error("--methods must include supervised (the ratios' reference)")
    results = {}
    context = multiprocessing.get_context("spawn")
    for method in args.methods:
        with context.Pool(1) as pool:
            r = results[method] = pool.apply(measure, (method, args))
        print(f"{method:<18} {r['img_per_s']:8.1f} img/s {r['peak_mb']:8.0f} MB", flush=True)
    base = results["supervised"]
    rows = [
        "| step | img/s | cost vs supervised | GFLOPs | FLOPs vs supervised | peak memory (MB) | memory vs supervised "
        "| spread of repeats | first step (s; compiles) | gradient cosine to eager |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        r["cost_ratio"] = base["img_per_s"] / r["img_per_s"]
        r["memory_ratio"] = r["peak_mb"] / max(base["peak_mb"], 1e-9)
        cosine = "-" if r["grad_cosine"] is None else f"{r['grad_cosine']:.6f}"
        rows.append(
            f"| {name} | {r['img_per_s']:.1f} | {r['cost_ratio']:.2f}x | {r['gflops']:.2f} | "
            f"{r['gflops'] / base['gflops']:.2f}x | {r['peak_mb']:.0f} | "
            f"{r['memory_ratio']:.2f}x | {100 * r['spread']:.0f}% | {r['first_step_s']:.1f} | {cosine} |"
        )
    for name, r in results.items():
        plain = name.removesuffix(", compiled")
        if plain != name and plain in results:
            ratio = results[plain]["img_per_s"] / r["img_per_s"]
            rows.append(
                f"\n{plain}: compiled, a step takes {ratio:.2f}x eager's time ({r['first_step_s']:.0f} s to compile)."
            )
    for k in (1, 2):
        exact, fast = results.get(f"energy K={k} exact"), results.get(f"energy K={k} fast")
        if exact and fast:
            rows.append(
                f"\nK={k}: fast mode is {fast['img_per_s'] / exact['img_per_s']:.2f}x faster than exact and "
                f"holds {fast['peak_mb'] / exact['peak_mb']:.2f}x its peak memory."
            )
    meta = {k: getattr(args, k) for k in ("model", "batch_size", "task", "threads", "device", "repeats", "iters")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"setup": meta, "results": results}, indent=2))
    header = f"{args.model}, batch {args.batch_size}, task {args.task}, {args.threads} threads, {args.device}"
    command = shlex.join(["python", f"benchmarks/{Path(__file__).name}", *sys.argv[1:]])
    table = f"{header}, median of {args.repeats} repeats of {args.iters} steps\n\nRegenerate: `{command}`\n\n"
    table += "\n".join(rows)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


def write_profiles(args: argparse.Namespace) -> None:
    """Each method's profile in its own process, printed and saved as ``{out}_profile.md``."""
    context, parts = multiprocessing.get_context("spawn"), []
    for method in args.methods:
        with context.Pool(1) as pool:
            result = pool.apply(profile, (method, args))
        parts.append(f"### {method}: {result['calls']} aten operator calls in one step\n\n```\n{result['table']}```\n")
        print(parts[-1], flush=True)
    header = f"{args.model}, batch {args.batch_size}, task {args.task}, {args.threads} threads, {args.device}"
    command = shlex.join(["python", f"benchmarks/{Path(__file__).name}", *sys.argv[1:]])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + "_profile.md").write_text(f"{header}\n\nRegenerate: `{command}`\n\n" + "\n".join(parts))


if __name__ == "__main__":
    main()
