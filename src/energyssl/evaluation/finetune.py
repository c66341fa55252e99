"""``energyssl finetune``: full fine-tuning with the paper's recipe (AdamW, layer-wise lr decay,
drop path, RandAugment, mixup/cutmix, label smoothing, warmup + cosine), from a pretrained
checkpoint or from scratch (``--init none``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import FinetuneConfig
from ..data import TransformedDataset, eval_transform, finetune_transform
from ..distributed import World, loader_workers
from ..engine import grouped
from ..errors import UserError
from ..metrics import MetricsLogger
from ..precision import Precision, amp_dtype_for
from ..schedules import warmup_cosine
from .prepare import EvalData, prepare, results_record
from .results import evaluate_classifier, summary_line, write_results


def layer_decay_optimizer(model: nn.Module, cfg: FinetuneConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW with timm's layer-wise decay (needs ``group_matcher``; plain AdamW otherwise)."""
    decay = cfg.layer_decay if cfg.layer_decay < 1 and hasattr(model, "group_matcher") else None
    return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=cfg.weight_decay, layer_decay=decay)


def loaders(cfg: FinetuneConfig, data: EvalData, device: torch.device) -> tuple[DataLoader, DataLoader]:
    """The labeled subset, augmented and shuffled in full batches; the scored split."""
    batch = min(cfg.batch_size, len(data.train) // 2 * 2)
    if batch < 2:
        raise UserError(f"only {len(data.train)} labeled image(s): raise --label-fraction")
    if batch < cfg.batch_size:  # said, not silent: the lr (blr x batch / 256) shrinks with it
        print(f"only {len(data.train)} labeled images: batch {cfg.batch_size} -> {batch}, and the lr with it")
    workers, pin = loader_workers(cfg.num_workers, device, World()), device.type == "cuda"
    augment = finetune_transform(data.info, data.img_size, tuple(cfg.crop_scale), cfg.randaug)
    train = TransformedDataset(data.train, augment)
    scored = TransformedDataset(data.scored, eval_transform(data.info, data.img_size))
    return (
        DataLoader(train, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers, pin_memory=pin),
        DataLoader(scored, batch_size=256, num_workers=workers, pin_memory=pin),
    )


def criterion_and_mixup(cfg: FinetuneConfig, classes: int) -> tuple[nn.Module, Mixup | None]:
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing, num_classes=classes
        )
        return SoftTargetCrossEntropy(), mixup
    return (LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else nn.CrossEntropyLoss()), None


@dataclass
class Trainer:
    """The fine-tuning loop's state: one epoch at a time."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_at: Callable[[int], float]
    criterion: nn.Module
    mixup: Mixup | None
    ema: ModelEmaV3 | None
    precision: Precision
    device: torch.device
    logger: MetricsLogger
    cfg: FinetuneConfig
    step: int = 0

    @property
    def done(self) -> bool:
        return self.cfg.max_steps is not None and self.step >= self.cfg.max_steps

    def epoch(self, loader: DataLoader, epoch: int) -> None:
        """Optimizer steps of ``accum_iter`` micro-batches each (each loss divided by their number)."""
        self.model.train()
        accum = self.cfg.accum_iter
        steps = tqdm(grouped(loader, accum), total=len(loader) // accum, desc=f"epoch {epoch}", leave=False,
                     dynamic_ncols=True)  # fmt: skip
        for micro_batches in steps:
            if self.done:
                break
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(self.step) * group.get("lr_scale", 1.0)
            self.optimizer.zero_grad(set_to_none=True)
            losses = [self.backward(images, targets, accum) for images, targets in micro_batches]
            self.precision.step(self.optimizer)
            if self.ema is not None:
                self.ema.update(self.model, step=self.step)
            self.step += 1
            if self.step % self.cfg.log_every == 0:
                loss = losses[0] if accum == 1 else sum(losses) / accum
                self.logger.log(self.step, {"epoch": epoch, "loss": loss, "lr": self.lr_at(self.step - 1)})

    def backward(self, images: torch.Tensor, targets: torch.Tensor, accum: int) -> float:
        """One micro-batch's loss, backpropagated (divided by the step's number of them)."""
        images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        with self.precision.autocast(self.device):
            loss = self.criterion(self.model(images), targets)
        if not torch.isfinite(loss):
            raise UserError(f"fine-tuning loss is {loss.item()} at step {self.step}; lower --blr")
        self.precision.backward(loss if accum == 1 else loss / accum)
        return loss.item()

    def score(self, loader: DataLoader) -> dict[str, float]:
        metrics = evaluate_classifier(self.model, loader, self.device)
        if self.ema is not None:
            metrics.update(
                {f"ema_{k}": v for k, v in evaluate_classifier(self.ema.module, loader, self.device).items()}
            )
        return metrics


def finetune(cfg: FinetuneConfig) -> dict:
    if cfg.eval_every < 1 or cfg.epochs < 1:
        raise UserError(f"epochs and eval_every must be >= 1, got {cfg.epochs} and {cfg.eval_every}")
    if cfg.init == "pixels":
        raise UserError("--init pixels is for probes (the raw-pixel floor); fine-tuning needs a network")
    setup = prepare(cfg, drop_path_rate=cfg.drop_path)
    device, data, model = setup.device, setup.data, setup.model
    train_loader, scored_loader = loaders(cfg, data, device)
    if not 1 <= cfg.accum_iter <= len(train_loader):
        raise UserError(f"accum_iter must be in [1, {len(train_loader)}] (an epoch's batches), got {cfg.accum_iter}")
    total_batch = train_loader.batch_size * cfg.accum_iter
    base_lr = cfg.lr if cfg.lr is not None else cfg.blr * total_batch / 256
    steps = len(train_loader) // cfg.accum_iter
    lr_at = partial(warmup_cosine, base_lr=base_lr, min_lr=cfg.min_lr, warmup_steps=int(cfg.warmup_epochs * steps),
                    total_steps=cfg.epochs * steps)  # fmt: skip
    trainer = Trainer(
        model, layer_decay_optimizer(model, cfg, base_lr), lr_at, *criterion_and_mixup(cfg, data.info.num_classes),
        ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None,
        Precision.build(amp_dtype_for(cfg.amp, device), device), device,
        MetricsLogger(setup.out, tensorboard=cfg.tensorboard), cfg,
    )  # fmt: skip
    print(
        f"fine-tuning {setup.model_name} on {len(data.train)} labeled images of {cfg.data} "
        f"({cfg.label_fraction:.0%} of labels), "
        f"init {setup.init.path or 'random'}, lr {base_lr:.2e}, {steps} steps/epoch x {cfg.epochs} epochs"
    )
    best, metrics = (0.0, -1), {}
    for epoch in range(cfg.epochs):
        trainer.epoch(train_loader, epoch)
        last = epoch == cfg.epochs - 1 or trainer.done
        if last or (epoch + 1) % cfg.eval_every == 0:
            metrics = trainer.score(scored_loader)
            best = max(best, (metrics["top1"], epoch))
            trainer.logger.log(
                trainer.step, {"epoch": epoch, **{f"{cfg.eval_split}_{k}": v for k, v in metrics.items()}}
            )
            print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
        if last:
            break
    trainer.logger.close()
    if cfg.eval_split == "val":  # epochs are chosen on validation; the best test epoch is never reported
        metrics["top1_best"], metrics["best_epoch"] = best
    record = results_record(cfg, setup, "finetune", metrics, len(data.train))
    write_results(setup.out, record)
    print(summary_line(record))
    return record
