"""Images per second of one training step of each method, on one backbone and
batch, measured in one run (median of repeats) and as ratios to the supervised step.

    python benchmarks/step_cost.py --model essl_vit_mini_patch7 --batch-size 64 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from energyssl import EnergyModel, create_backbone
from energyssl.baselines import build_baseline
from energyssl.objective import build_objective, freeze_unreached_parameters

MEAN, STD = (0.286,), (0.353,)


def step_fns(model_name: str, batch: int, task: str) -> dict[str, Callable[[], torch.Tensor]]:
    """One closure per method, each running forward + backward + AdamW step on a fixed batch."""
    images = torch.randn(batch, 1, 28, 28)
    labels = torch.randint(0, 10, (batch,))
    fns: dict[str, Callable[[], torch.Tensor]] = {}

    def trainer(module: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)

        def step() -> torch.Tensor:
            loss = loss_fn()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss

        return step

    classifier = create_backbone(model_name, img_size=28, in_chans=1)
    classifier.reset_classifier(10)
    fns["supervised"] = trainer(classifier, lambda: F.cross_entropy(classifier(images), labels))
    for k in (1, 2):
        model = EnergyModel(create_backbone(model_name, img_size=28, in_chans=1))
        objective = build_objective(model, task, {}, 1, MEAN, STD)
        freeze_unreached_parameters(objective, images[:4])
        fns[f"energy K={k}"] = trainer(
            objective, lambda o=objective, k=k: o(images, torch.Generator().manual_seed(0), steps=k).loss
        )
    for method in ("mae", "ae", "cae"):
        baseline = build_baseline(
            method, create_backbone(model_name, img_size=28, in_chans=1), task, {}, {}, 1, MEAN, STD
        )
        fns[method] = trainer(baseline, lambda b=baseline: b(images, torch.Generator().manual_seed(0)).loss)
    return fns


def measure(fn: Callable[[], torch.Tensor], batch: int, repeats: int, iters: int) -> dict[str, float]:
    fn()  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        rates.append(batch * iters / (time.perf_counter() - start))
    return {"img_per_s": statistics.median(rates), "spread": (max(rates) - min(rates)) / statistics.median(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="essl_vit_mini_patch7")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--task", default="grid_mask", help="corruption of the energy and AE steps")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3, help="steps per repeat")
    parser.add_argument("--out", default="benchmarks/results/step_cost")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {}
    for name, fn in step_fns(args.model, args.batch_size, args.task).items():
        results[name] = measure(fn, args.batch_size, args.repeats, args.iters)
        print(f"{name:<12} {results[name]['img_per_s']:8.1f} img/s", flush=True)
    base = results["supervised"]["img_per_s"]
    rows = ["| step | img/s | cost vs supervised (x) | spread of repeats |", "|---|---|---|---|"]
    for name, r in results.items():
        r["cost_ratio"] = base / r["img_per_s"]
        rows.append(f"| {name} | {r['img_per_s']:.1f} | {r['cost_ratio']:.2f} | {100 * r['spread']:.0f}% |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "batch_size": args.batch_size, "task": args.task, "threads": torch.get_num_threads()}
    out.with_suffix(".json").write_text(json.dumps({"setup": meta, "results": results}, indent=2))
    table = f"{args.model}, batch {args.batch_size}, task {args.task}, {meta['threads']} threads\n\n" + "\n".join(rows)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
