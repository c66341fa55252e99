"""``energyssl finetune``: full fine-tuning with the paper's recipe (AdamW, layer-wise lr decay,
drop path, RandAugment, mixup/cutmix, label smoothing, warmup + cosine), from a pretrained
checkpoint or from scratch (``--init none``). Runs on one process or under ``torchrun`` (DDP:
each process trains on its shard of every epoch and scores its shard of the evaluation split),
checkpoints every ``--save-every`` steps and resumes exactly (``--resume``). The same loop
runs MAE's linear probe (``probe --recipe mae``, a :class:`Route`): a linear head on the frozen
backbone, trained with LARS on images augmented on the fly."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from timm.data import Mixup
from timm.layers import trunc_normal_
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import Lars, create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from .. import checkpoint as ckpt
from ..compiling import check_backend, compile_forward
from ..config import EvalConfig, FinetuneConfig, refuse_changes
from ..data import (
    EpochSampler,
    SeededAugmentation,
    TransformedDataset,
    eval_transform,
    finetune_transform,
    skip_batches,
)
from ..distributed import (
    StopRequest,
    World,
    all_finite,
    broadcast_buffers,
    loader_workers,
    max_across,
    mean_across,
    process_group,
    random_states,
    resume_hint,
    seed_everything,
    set_random_states,
    shard,
    stop_agreed,
    sum_across,
)
from ..engine import Throughput, grouped
from ..errors import Interrupted, UserError
from ..metrics import MetricsLogger
from ..models import enable_grad_checkpointing
from ..precision import Precision, amp_dtype_for
from ..schedules import warmup_cosine
from .prepare import EvalData, EvalSetup, load_eval_data, prepare, results_record
from .results import accuracy_from_counts, correct_counts, scored_ks, summary_line, write_results

# What a resumed fine-tune may change of its config: how far it goes, where and how it logs.
SAFE_ON_RESUME = ("max_steps", "num_workers", "log_every", "tensorboard", "save_every", "device", "amp",
                  "grad_checkpointing", "compile")  # fmt: skip


def resume_changes(saved: FinetuneConfig, cfg: FinetuneConfig) -> list[str]:
    return refuse_changes(saved.to_dict(), cfg.to_dict(), SAFE_ON_RESUME)


def layer_decay_optimizer(model: nn.Module, cfg: FinetuneConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW with timm's layer-wise decay (needs ``group_matcher``; plain AdamW otherwise)."""
    decay = cfg.layer_decay if cfg.layer_decay < 1 and hasattr(model, "group_matcher") else None
    return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=cfg.weight_decay, layer_decay=decay)


class LinearProbe(nn.Module):
    """MAE's linear probe: the frozen backbone (kept in eval mode, so neither its BatchNorm
    statistics nor its dropout move) under BatchNorm without affine and a linear layer."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        fc = classifier.get_classifier()
        self.backbone = classifier.requires_grad_(False)
        self.norm = nn.BatchNorm1d(fc.in_features, affine=False, eps=1e-6)
        self.fc = nn.Linear(fc.in_features, fc.out_features)
        trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)
        return self.fc(self.norm(features.float()))


def lars_optimizer(model: nn.Module, cfg: FinetuneConfig, lr: float) -> torch.optim.Optimizer:
    """timm's LARS as MAE's linear probe uses it: momentum 0.9, trust coefficient 0.001, the
    trust ratio on weight matrices (even without weight decay) and not on biases."""
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trained if p.ndim > 1], "weight_decay": cfg.weight_decay, "always_adapt": True},
        {"params": [p for p in trained if p.ndim <= 1], "weight_decay": 0.0},
    ]
    return Lars(groups, lr=lr, momentum=0.9, trust_coeff=0.001)


@dataclass(frozen=True)
class Route:
    """What the loop trains and scores, and how the run names itself: the full fine-tune of a
    classifier, MAE's linear probe (``probe --recipe mae``, whose own config is the one saved and
    resumed), or a dense task (``segment``: its own data, transforms, loss and score)."""

    command: str = "finetune"  # the command that resumes the run
    protocol: str = "finetune"  # results.json's protocol
    model: Callable[[nn.Module], nn.Module] = lambda classifier: classifier
    optimizer: Callable[[nn.Module, FinetuneConfig, float], torch.optim.Optimizer] = layer_decay_optimizer
    saved: EvalConfig | None = None  # the config in config.yaml (default: the fine-tune's)
    primary: str = "top1"  # the metric that ranks scored epochs
    any_size: bool = False  # a ViT pretrained at another image size is resampled to this data's
    joint: bool = False  # the transforms take (image, target) pairs (dense targets)
    collate: Callable | None = None  # how scored batches are put together (default: stacked)
    scored_batch: int = 256  # images per scoring batch

    def load_data(self, cfg: EvalConfig, out: Path, world: World) -> EvalData:
        return load_eval_data(cfg, out, world)

    def transforms(self, cfg: FinetuneConfig, data: EvalData) -> tuple[Callable, Callable]:
        """(the training augmentation, the evaluation transform)."""
        augment = finetune_transform(data.info, data.img_size, tuple(cfg.crop_scale), cfg.randaug)
        return augment, eval_transform(data.info, data.img_size)

    def scored_dataset(self, data: EvalData, world: World, transform: Callable) -> Dataset:
        """This process's shard of the scored split, transformed."""
        return TransformedDataset(shard(data.scored, world), transform, self.joint)

    def criterion_and_mixup(self, cfg: FinetuneConfig, classes: int) -> tuple[nn.Module, Mixup | None]:
        if cfg.mixup > 0 or cfg.cutmix > 0:
            mixup = Mixup(
                mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing, num_classes=classes
            )
            return SoftTargetCrossEntropy(), mixup
        return (LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else nn.CrossEntropyLoss()), None

    def counts(self, model: nn.Module, loader: DataLoader, device: torch.device, classes: int) -> torch.Tensor:
        """What scoring adds up over the scored split (sums: disjoint shards' counts add)."""
        return correct_counts(model, loader, device, scored_ks(classes))

    def metrics(self, counts: torch.Tensor, classes: tuple[str, ...]) -> dict:
        """The scores of the summed counts."""
        return accuracy_from_counts(counts, scored_ks(len(classes)))


FINETUNE = Route()


def loaders(
    cfg: FinetuneConfig, data: EvalData, setup: EvalSetup, route: Route
) -> tuple[EpochSampler, DataLoader, DataLoader]:
    """This process's share of the labeled subset, augmented (seeded per image and epoch, so a
    resumed run sees the same crops) in full batches; its share of the scored split."""
    world, device = setup.world, setup.device
    per_process = len(data.train) // world.size
    batch = min(cfg.batch_size, per_process // 2 * 2)
    if batch < 2:
        raise UserError(f"only {len(data.train)} labeled image(s) for {world.size} process(es): raise --label-fraction")
    if batch < cfg.batch_size and world.is_main:  # said, not silent: the lr (blr x batch / 256) shrinks with it
        where = " per process" if world.distributed else ""
        print(f"only {per_process} labeled images{where}: batch {cfg.batch_size} -> {batch}, and the lr with it")
    workers, pin = loader_workers(cfg.num_workers, device, world), device.type == "cuda"
    augment, evaluate = route.transforms(cfg, data)
    train = SeededAugmentation(data.train, augment, cfg.seed, route.joint)
    sampler = EpochSampler(DistributedSampler(train, world.size, world.rank, shuffle=True, seed=cfg.seed,
                                              drop_last=True))  # fmt: skip
    scored = route.scored_dataset(data, world, evaluate)
    return (
        sampler,
        DataLoader(
            train,
            batch_size=batch,
            sampler=sampler,
            drop_last=True,
            num_workers=workers,
            pin_memory=pin,
            generator=torch.Generator().manual_seed(cfg.seed),
        ),  # fmt: skip
        DataLoader(scored, route.scored_batch, num_workers=workers, pin_memory=pin, collate_fn=route.collate),
    )


@dataclass
class Trainer:
    """The fine-tuning loop's state: one epoch at a time, checkpointed as it goes."""

    net: nn.Module  # the classifier; ``trained`` is it inside DDP under torchrun
    trained: nn.Module
    optimizer: torch.optim.Optimizer
    lr_at: Callable[[int], float]
    criterion: nn.Module
    mixup: Mixup | None
    ema: ModelEmaV3 | None
    precision: Precision
    setup: EvalSetup
    metadata: dict[str, str]  # what a checkpoint must agree on to be resumed
    steps_per_epoch: int
    cfg: FinetuneConfig
    route: Route = FINETUNE
    logger: MetricsLogger | None = None
    step: int = 0
    epoch: int = 0
    best: tuple[float, int] = (0.0, -1)  # (top-1, epoch) of the best scored epoch
    meter: Throughput = field(default_factory=Throughput)

    @property
    def world(self) -> World:
        return self.setup.world

    @property
    def last_step(self) -> int:
        total = self.cfg.epochs * self.steps_per_epoch
        return min(self.cfg.max_steps or total, total)

    def train_epoch(self, loader: DataLoader, stop: StopRequest) -> bool:
        """The rest of the current epoch, in optimizer steps of ``accum_iter`` micro-batches;
        True when a signal asked every process to stop."""
        self.trained.train()
        accum, end = self.cfg.accum_iter, min((self.epoch + 1) * self.steps_per_epoch, self.last_step)
        bar = tqdm(grouped(loader, accum), total=end - self.step, desc=f"epoch {self.epoch}", leave=False,
                   dynamic_ncols=True, disable=not self.world.is_main)  # fmt: skip
        for micro_batches in bar:
            if self.step >= end:
                break
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr_at(self.step) * group.get("lr_scale", 1.0)
            self.optimizer.zero_grad(set_to_none=True)
            losses = [self.backward(*batch, last=i == accum - 1) for i, batch in enumerate(micro_batches)]
            self.precision.step(self.optimizer)
            if self.ema is not None:
                self.ema.update(self.net, step=self.step)
            self.step += 1
            self.meter.seen += accum * len(micro_batches[0][0])
            if self.step % self.cfg.log_every == 0:
                self.log_step(sum(losses) / accum, bar)
            if stop_agreed(stop.asked, self.world):
                return True
            if self.step % self.cfg.save_every == 0 and self.step < end:  # the epoch's end saves after scoring
                self.save()
        return False

    def backward(self, images: torch.Tensor, targets: torch.Tensor, last: bool) -> float:
        """One micro-batch's loss, backpropagated (divided by the step's number of them); DDP
        averages the gradients across processes on the step's last micro-batch only."""
        device = self.setup.device
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        sync = last or not self.world.distributed
        with contextlib.nullcontext() if sync else self.trained.no_sync():  # type: ignore[operator]
            with self.precision.autocast(device):
                loss = self.criterion(self.trained(images), targets)
            if not all_finite(loss, self.world):
                raise UserError(f"fine-tuning loss is not finite at step {self.step}; lower --blr")
            self.precision.backward(loss / self.cfg.accum_iter)
        return loss.item()

    def log_step(self, loss: float, bar: tqdm) -> None:
        """The loss averaged over processes, the lr and the images per second of all of them."""
        loss, rate = mean_across(loss, self.world), self.meter.images_per_second(self.world)
        bar.set_postfix({"loss": f"{loss:.4f}"})
        if self.logger is not None:
            record = {"epoch": self.epoch, "loss": loss, "lr": self.lr_at(self.step - 1), "img_per_s": rate}
            self.logger.log(self.step, record)

    def score(self, loader: DataLoader) -> dict[str, float]:
        """The route's scores over the whole scored split: each process counts its shard, the
        counts add."""
        broadcast_buffers(self.net, self.world)
        info = self.setup.data.info
        models = {"": self.net, **({"ema_": self.ema.module} if self.ema is not None else {})}
        metrics = {}
        for prefix, model in models.items():
            counts = sum_across(self.route.counts(model, loader, self.setup.device, info.num_classes), self.world)
            metrics |= {prefix + key: value for key, value in self.route.metrics(counts, info.classes).items()}
        return metrics

    def save(self) -> None:
        """Weights, optimizer, loss scale, EMA, every process's random states, position, best."""
        states = random_states(self.world)  # collective under DDP
        if not self.world.is_main:
            return
        training_state = {
            "step": self.step, "epoch": self.epoch, "best": list(self.best), "random": states,
            "optimizer": self.optimizer.state_dict(), **self.precision.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else {},
            "labeled_subset": torch.from_numpy(self.setup.data.subset), "config": json.dumps(self.cfg.to_dict()),
        }  # fmt: skip
        ckpt.save_checkpoint(self.setup.out, self.net, training_state, self.metadata)

    def resume(self, folder: Path) -> None:
        """Continue from a checkpoint of this fine-tune (refusing another model's or subset's)."""
        ckpt.load_weights(self.net, folder / ckpt.WEIGHTS, expect=self.metadata)
        saved = ckpt.load_training_state(folder)
        if not torch.equal(saved["labeled_subset"], torch.from_numpy(self.setup.data.subset)):
            raise UserError(f"{folder} was trained on another labeled subset (the data or its split changed)")
        self.optimizer.load_state_dict(saved["optimizer"])
        self.precision.load_state_dict(saved)
        if self.ema is not None:
            self.ema.module.load_state_dict(saved["ema"])
        self.step, self.epoch, self.best = saved["step"], saved["epoch"], (saved["best"][0], saved["best"][1])
        try:
            set_random_states(saved["random"], self.world)
        except ValueError as exc:
            raise UserError(f"cannot resume {folder} exactly: {exc}") from exc
        if self.world.is_main:
            print(f"resumed from {folder} at step {self.step} (epoch {self.epoch})")


def validate(cfg: FinetuneConfig) -> None:
    if cfg.eval_every < 1 or cfg.epochs < 1:
        raise UserError(f"epochs and eval_every must be >= 1, got {cfg.epochs} and {cfg.eval_every}")
    if cfg.save_every < 1 or cfg.accum_iter < 1:
        raise UserError(f"save_every and accum_iter must be >= 1, got {cfg.save_every} and {cfg.accum_iter}")
    if cfg.init == "pixels":
        raise UserError("--init pixels is for probes (the raw-pixel floor); fine-tuning needs a network")
    check_backend(cfg.compile)


def finetune(cfg: FinetuneConfig, route: Route = FINETUNE) -> dict:
    """Run (or resume) a fine-tune, or what ``route`` trains; returns the record written to results.json."""
    validate(cfg)
    with process_group(cfg.device) as world:
        return _finetune(cfg, world, route)


def start(cfg: FinetuneConfig, world: World, route: Route) -> tuple[Trainer, EpochSampler, DataLoader, DataLoader]:
    """Data, classifier, optimizer and schedule (and with --resume the saved state)."""
    out = Path(cfg.out)
    if max_across(float((out / ckpt.LATEST).exists() and not cfg.resume), world) > 0:  # every process refuses
        raise UserError(f"{out} already holds a {route.protocol} run: pass --resume to continue it, or another --out")
    setup = prepare(cfg, world, route.saved, route.load_data, route.any_size, drop_path_rate=cfg.drop_path)
    seed_everything(cfg.seed + world.rank)  # the model is alike on every process; drop path and mixup are not
    sampler, train_loader, scored_loader = loaders(cfg, setup.data, setup, route)
    if not 1 <= cfg.accum_iter <= len(train_loader):
        raise UserError(f"accum_iter must be in [1, {len(train_loader)}] (an epoch's batches), got {cfg.accum_iter}")
    total_batch = train_loader.batch_size * world.size * cfg.accum_iter  # type: ignore[operator]
    base_lr = cfg.lr if cfg.lr is not None else cfg.blr * total_batch / 256
    steps = len(train_loader) // cfg.accum_iter
    lr_at = partial(warmup_cosine, base_lr=base_lr, min_lr=cfg.min_lr, warmup_steps=int(cfg.warmup_epochs * steps),
                    total_steps=cfg.epochs * steps)  # fmt: skip
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(setup.model, setup.model_name)
    model = setup.model = route.model(setup.model)
    info = setup.data.info
    metadata = {"model": setup.model_name, "num_classes": str(info.num_classes), "img_size": str(setup.data.img_size),
                "in_chans": str(info.in_chans), "batch_size": str(total_batch)}  # fmt: skip
    trainer = Trainer(
        model, model, route.optimizer(model, cfg, base_lr), lr_at, *route.criterion_and_mixup(cfg, info.num_classes),
        ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay else None,
        Precision.build(amp_dtype_for(cfg.amp, setup.device), setup.device), setup, metadata, steps, cfg, route,
    )  # fmt: skip
    if cfg.resume:
        trainer.resume(ckpt.find_checkpoint(out if cfg.resume == "auto" else Path(cfg.resume)))
    if cfg.compile:  # after the EMA's copy, before DDP
        compile_forward(model, cfg.compile, world.is_main)
    if world.distributed:
        trainer.trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[setup.device.index] if setup.device.type == "cuda" else None
        )
    if world.is_main:
        trainer.logger = MetricsLogger(out, tensorboard=cfg.tensorboard)
        trainer.logger.forget_after(trainer.step)
        print(
            f"{route.protocol}: {setup.model_name} on {len(setup.data.train)} labeled images of {cfg.data} "
            f"({cfg.label_fraction:.0%} of labels), init {setup.init.path or 'random'}, lr {base_lr:.2e}, "
            f"{steps} steps/epoch x {cfg.epochs} epochs, {world.size} process(es), {setup.device}"
        )
    return trainer, sampler, train_loader, scored_loader


def _finetune(cfg: FinetuneConfig, world: World, route: Route) -> dict:
    trainer, sampler, train_loader, scored_loader = start(cfg, world, route)
    metrics: dict = {}
    try:
        with StopRequest() as stop:
            while trainer.epoch < cfg.epochs:
                sampler.set_epoch(trainer.epoch)
                done = trainer.step - trainer.epoch * trainer.steps_per_epoch
                skip = done * train_loader.batch_size * cfg.accum_iter  # type: ignore[operator]
                stopped = trainer.train_epoch(skip_batches(train_loader, sampler, skip) if done else train_loader, stop)
                if stopped:
                    trainer.save()
                    raise Interrupted(resume_hint(route.command, Path(cfg.out), trainer.step, world))
                metrics = end_of_epoch(trainer, scored_loader)
                if trainer.step >= trainer.last_step:
                    break
    finally:
        if trainer.logger is not None:
            trainer.logger.close()
    return finish(trainer, metrics)


def end_of_epoch(trainer: Trainer, scored_loader: DataLoader) -> dict:
    """Score when due (every ``eval_every`` epochs and after the last step), then checkpoint."""
    cfg, epoch = trainer.cfg, trainer.epoch
    metrics: dict = {}
    if trainer.step >= trainer.last_step or (epoch + 1) % cfg.eval_every == 0:
        metrics = trainer.score(scored_loader)
        trainer.best = max(trainer.best, (metrics[trainer.route.primary], epoch))
        if trainer.logger is not None:
            scores = {f"{cfg.eval_split}_{k}": v for k, v in metrics.items()}
            trainer.logger.log(trainer.step, {"epoch": epoch, **scores})
        if trainer.world.is_main:
            print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float)))
    if trainer.step == (epoch + 1) * trainer.steps_per_epoch:
        trainer.epoch += 1
    trainer.save()
    return metrics


def finish(trainer: Trainer, metrics: dict) -> dict:
    """results.json and the summary line, once."""
    cfg, setup = trainer.cfg, trainer.setup
    if cfg.eval_split == "val":  # epochs are chosen on validation; the best test epoch is never reported
        metrics[f"{trainer.route.primary}_best"], metrics["best_epoch"] = trainer.best
    record = results_record(trainer.route.saved or cfg, setup, trainer.route.protocol, metrics, len(setup.data.train))
    if trainer.world.is_main:
        write_results(setup.out, record)
        print(summary_line(record))
    return record
