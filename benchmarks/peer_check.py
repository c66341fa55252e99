"""Is our MAE as strong as a reference implementation? Trains lightly's MAE (its
``MaskedVisionTransformerTIMM`` and ``MAEDecoderTIMM``, decoder 512 wide and 1 deep as in
lightly's example) around the same backbone, on the same data, augmentation, batch, learning
rate, schedule, seed and number of steps as a finished run of ours, then scores both encoders
with the same evaluation (fine-tuning on 1% of the labels with the protocol's recipe, and kNN),
on the validation split.

Needs lightly, a benchmark-only dependency: ``pip install lightly==1.6.0``.

    python benchmarks/peer_check.py --ours runs/protocol/mae/<setting>/b2-s0/pretrain
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from energyssl import checkpoint as ckpt
from energyssl.checkpoint import find_checkpoint, load_training_state
from energyssl.config import PretrainConfig
from energyssl.data import load_dataset
from energyssl.distributed import World, seed_everything
from energyssl.models import backbone_kwargs, create_backbone
from energyssl.pretrain import schedule_steps, training_data
from energyssl.schedules import warmup_cosine

sys.path.insert(0, str(Path(__file__).parent))
import accuracy_per_compute as protocol  # noqa: E402


class LightlyMAE(nn.Module):
    """lightly's MAE around a timm ViT: encoder on the kept tokens, decoder with mask tokens,
    loss on the masked patches' pixels."""

    def __init__(self, vit: nn.Module, decoder_dim: int = 512, decoder_depth: int = 1, mask_ratio: float = 0.75):
        super().__init__()
        from lightly.models.modules import MAEDecoderTIMM, MaskedVisionTransformerTIMM

        self.mask_ratio, self.patch = mask_ratio, vit.patch_embed.patch_size[0]
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.decoder = MAEDecoderTIMM(
            num_patches=vit.patch_embed.num_patches, patch_size=self.patch, in_chans=vit.patch_embed.proj.in_channels,
            embed_dim=vit.embed_dim, decoder_embed_dim=decoder_dim, decoder_depth=decoder_depth,
            decoder_num_heads=16, mlp_ratio=4.0,
        )  # fmt: skip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from lightly.models import utils

        batch, length = len(images), self.backbone.sequence_length
        keep, mask = utils.random_token_mask(size=(batch, length), mask_ratio=self.mask_ratio, device=images.device)
        encoded = self.backbone.encode(images=images, idx_keep=keep)
        tokens = utils.repeat_token(self.decoder.mask_token, (batch, length))
        tokens = utils.set_at_index(tokens, keep, self.decoder.embed(encoded).type_as(tokens))
        prediction = self.decoder.predict(utils.get_at_index(self.decoder.decode(tokens), mask))
        target = utils.get_at_index(utils.patchify(images, self.patch), mask - 1)
        return F.mse_loss(prediction, target)


def train_lightly(ours: Path, out: Path) -> Path:
    """lightly's MAE with our run's data, batch, lr, schedule, seed and steps; its backbone
    exported as ours are."""
    if (out / ckpt.BACKBONE).exists():
        return out
    known = PretrainConfig.__dataclass_fields__  # an older run's config.yaml also has the energy method's flags
    cfg = PretrainConfig(**{k: v for k, v in yaml.safe_load((ours / "config.yaml").read_text()).items() if k in known})
    steps = load_training_state(find_checkpoint(ours))["step"]
    seed_everything(cfg.seed)
    dataset = load_dataset(cfg.data, train=True, val_fraction=cfg.val_fraction)
    img_size = cfg.img_size or dataset.info.img_size
    _, sampler, loader = training_data(cfg, dataset, dataset.info, img_size, World(), torch.device("cpu"))
    vit = create_backbone(cfg.model, img_size=img_size, in_chans=dataset.info.in_chans, patch_size=cfg.patch_size)
    model = LightlyMAE(vit)
    base_lr = cfg.lr if cfg.lr is not None else cfg.blr * cfg.batch_size / 256
    optimizer = torch.optim.AdamW(model.parameters(), lr=base_lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    total, warmup = schedule_steps(cfg, len(loader)), int(cfg.warmup_epochs * len(loader))
    step, epoch = 0, 0
    while step < steps:
        sampler.set_epoch(epoch)
        for views, _ in loader:
            if step >= steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(step, base_lr, cfg.min_lr, warmup, total)
            loss = model(views[0])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if step % 100 == 0:
                print(f"  lightly MAE step {step}/{steps}: loss {loss.item():.4f}", flush=True)
        epoch += 1
    out.mkdir(parents=True, exist_ok=True)
    kwargs = backbone_kwargs(cfg.model, img_size, dataset.info.in_chans, cfg.patch_size)
    ckpt.export_backbone(out / ckpt.BACKBONE, vit, cfg.model, kwargs)
    (out / "config.yaml").write_text(yaml.safe_dump({"ours": str(ours), "steps": steps, "base_lr": base_lr}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ours", required=True, help="a finished pretraining run of our MAE")
    parser.add_argument("--protocol-out", default="runs/protocol", help="the protocol's runs (its recipe.json)")
    parser.add_argument("--out", default="runs/peer-check")
    parser.add_argument("--results", default="benchmarks/results/peer_check.md")
    args = parser.parse_args()
    try:
        import lightly  # noqa: F401
    except ImportError:
        sys.exit("error: peer_check needs lightly, a benchmark-only dependency: pip install lightly==1.6.0")
    ours, out = Path(args.ours), Path(args.out)
    data = yaml.safe_load((ours / "config.yaml").read_text())["data"]
    out.mkdir(parents=True, exist_ok=True)  # the protocol's fine-tuning recipe, read from here
    shutil.copyfile(Path(args.protocol_out) / "recipe.json", out / "recipe.json")
    evaluation = protocol.parse_args(["--stage", "report", "--out", str(out), "--data", data])
    lightly_run = train_lightly(ours, out / "lightly-mae")
    rows = []
    # our run's own scores on validation, where the protocol put them (kept if already there)
    for name, run, folder in (("ours", ours, ours.parent), ("lightly", lightly_run, out / "eval-lightly")):
        ft = protocol.finetune(evaluation, str(run), folder / "val-ft0.01-s0", 0.01, "val", 0,
                               *protocol.recipe(evaluation, 0.01))  # fmt: skip
        knn = protocol.probe(evaluation, str(run), folder / "val-knn", "knn", "val")
        rows.append(f"| {name} | {ft:.2f} | {knn:.2f} |")
    steps = yaml.safe_load((lightly_run / "config.yaml").read_text())["steps"]
    text = [
        f"Our MAE (`{ours}`) against lightly 1.6.0's MAE (decoder 512 x 1) trained with the same data, "
        f"batch, lr, schedule, seed and {steps} steps; both scored on validation with the protocol's recipe.",
        "",
        "| MAE | fine-tune 1% (val) | kNN (val) |",
        "|---|---|---|",
        *rows,
    ]
    Path(args.results).write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
