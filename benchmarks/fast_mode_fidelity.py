"""Gradient fidelity of fast mode: cosine similarity and relative error of its parameter
gradient against exact mode's (double backward), in float32, for several finite-difference
steps and backbones, on one batch of the embedded data.

    python benchmarks/fast_mode_fidelity.py --models essl_vit_mini_patch7 essl_resnet_tiny
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from unittest import mock

import torch

import energyssl.methods.energy.model as energy_module
from energyssl import EnergyModel, create_backbone
from energyssl.data import eval_transform, load_dataset
from energyssl.methods.base import freeze_unreached_parameters
from energyssl.methods.energy import EnergyMethod
from energyssl.methods.energy.commands import load_energy_model


def parameter_gradient(objective: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Every parameter's gradient (alpha excluded), flattened; BatchNorm statistics are put back
    afterwards so that both modes see the same network."""
    buffers = {name: b.clone() for name, b in objective.named_buffers()}
    objective.zero_grad(set_to_none=True)
    objective([images], torch.Generator().manual_seed(0)).loss.backward()
    objective.load_state_dict(buffers, strict=False)
    return torch.cat([p.grad.flatten() for p in objective.parameters() if p.grad is not None and p.ndim > 0])


def compare(model_name: str, images: torch.Tensor, task: str, steps: int, fd_steps: list[float]) -> list[dict]:
    """``model_name`` is a backbone at random init, or a pretraining run folder (trained weights)."""
    torch.manual_seed(0)
    if Path(model_name).is_dir():
        model = load_energy_model(model_name).model.train()
    else:
        model = EnergyModel(create_backbone(model_name, img_size=28, in_chans=1), head_init_std=10.0)
    model.grad_mode = "exact"
    objective = EnergyMethod.around(model, task, steps=steps, mean=(0.286,), std=(0.353,))
    freeze_unreached_parameters(objective, [images[:4]])
    exact = parameter_gradient(objective, images)
    model.grad_mode = "fast"
    rows = []
    for fd_step in fd_steps:
        with mock.patch.object(energy_module, "FD_STEP", fd_step):
            fast = parameter_gradient(objective, images)
        rows.append(
            {
                "model": model_name,
                "fd_step": fd_step,
                "cosine": torch.nn.functional.cosine_similarity(fast.double(), exact.double(), dim=0).item(),
                "relative_error": ((fast - exact).norm() / exact.norm()).item(),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        nargs="+",
        default=["essl_vit_mini_patch7", "essl_resnet_tiny"],
        help="backbone names (random init) or pretraining run folders (trained weights)",
    )
    parser.add_argument("--task", default="mixed")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--fd-steps", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3, 1e-4, 1e-5])
    parser.add_argument("--out", default="benchmarks/results/fast_mode_fidelity")
    args = parser.parse_args()
    dataset = load_dataset("embedded", train=True)
    transform = eval_transform(dataset.info, 28)
    images = torch.stack([transform(dataset[i][0]) for i in range(args.batch_size)])
    rows = [row for name in args.models for row in compare(name, images, args.task, args.steps, args.fd_steps)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    command = shlex.join(["python", f"benchmarks/{Path(__file__).name}", *sys.argv[1:]])
    lines = [
        f"Fast vs exact parameter gradient, float32, task {args.task}, K={args.steps}, batch {args.batch_size}, "
        f"random init (head std 10) or a run's weights, one batch of the embedded data.\n",
        f"Regenerate: `{command}`\n",
        "| model | FD step | cosine | relative error |",
        "|---|---|---|---|",
        *(f"| {r['model']} | {r['fd_step']:g} | {r['cosine']:.6f} | {r['relative_error']:.2e} |" for r in rows),
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
