"""``energyssl pretrain``: build data, backbone and method from a config, train, checkpoint,
resume, and export the backbone as a timm state dict. Every method runs through the same
harness; what one needs beyond the loss it says through the hooks of :class:`~.methods.base.Method`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import checkpoint as ckpt
from .compiling import check_backend
from .config import PretrainConfig, refuse_changes, save_yaml
from .data import DataInfo, EpochSampler, SeededAugmentation, eval_transform, load_dataset, load_held_out, skip_batches
from .distributed import (
    StopRequest,
    World,
    loader_workers,
    max_across,
    process_group,
    random_states,
    resolve_device,
    resume_hint,
    seed_everything,
    set_random_states,
)
from .engine import LoopSettings, LrSchedule, NonFiniteLoss, TrainState, budget_spent, train_one_epoch
from .errors import Interrupted, UserError
from .methods import BuildContext, Method, build_method, method_class, method_options
from .methods.base import PrecisionChoice, Results, freeze_parameters, freeze_unreached_parameters
from .metrics import MetricsLogger
from .models import backbone_kwargs, create_backbone, default_patch_size
from .precision import AMP_CHOICES, Precision, channels_last_if_cnn
from .schedules import Clock

HELD_OUT_IMAGES = 512  # test images a method's report and figures may use
SHOWN = {"task": ", task {}", "steps": ", K={}"}  # a method's settings named in the start line, where it has them


def validate(cfg: PretrainConfig) -> None:
    """Reject impossible values before any work starts."""
    checks = [
        (cfg.amp in AMP_CHOICES, f"amp must be one of {AMP_CHOICES}, got '{cfg.amp}'"),
        (cfg.time_budget is None or cfg.time_budget > 0, f"time_budget must be > 0 minutes, got {cfg.time_budget}"),
        (len(cfg.crop_scale) == 2, f"crop_scale must be two numbers, got {cfg.crop_scale}"),
        (cfg.accum_iter >= 1, f"accum_iter must be >= 1, got {cfg.accum_iter}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    check_backend(cfg.compile)
    # an option that could not take effect is an error; config.yaml then records every option
    cfg.method_options = asdict(method_options(cfg.method, cfg.method_options))
    if not method_class(cfg.method).uses_crop_scale and cfg.crop_scale != PretrainConfig().crop_scale:
        raise UserError(f"--crop-scale does not apply to {cfg.method}, which crops as its paper does")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms and other 1-d or scalar parameters. The rule of timm's
    ``param_groups_weight_decay``, kept here because timm lists the groups the other way round,
    which the optimizer states of existing checkpoints would not load into."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def run_metadata(cfg: PretrainConfig, method: Method, img_size: int, in_chans: int, total_batch: int) -> dict[str, str]:
    """What a checkpoint must agree on to be resumed or loaded into this model."""
    own = method.metadata()
    return {
        "model": cfg.model,
        "img_size": str(img_size),
        "in_chans": str(in_chans),
        "patch_size": str(cfg.patch_size),
        "method": cfg.method,
        **{key: own[key] for key in method.resume_keys},
        "batch_size": str(total_batch),
    }


# What a resumed run may change: how far it goes, where, in which precision and how it logs
# (and the method's options it names safe); anything else would make it another run than the
# one its checkpoints continue.
SAFE_ON_RESUME = ("max_steps", "time_budget", "num_workers", "log_every", "tensorboard", "save_every", "device", "amp",
                  "grad_checkpointing", "compile")  # fmt: skip


def resume_changes(saved: PretrainConfig, cfg: PretrainConfig) -> list[str]:
    """What ``cfg`` changes of the run's own ``saved`` config, the method's options by name: a
    change that would alter the run is refused, the safe ones returned to be said."""
    old, new = saved.to_dict(), cfg.to_dict()
    old_options = asdict(method_options(saved.method, old.pop("method_options")))
    given = new.pop("method_options")  # read under another method only when the method is kept
    new_options = asdict(method_options(cfg.method, given)) if cfg.method == saved.method else old_options
    old |= {f"method_options.{key}": value for key, value in old_options.items()}
    new |= {f"method_options.{key}": value for key, value in new_options.items()}
    safe = {*SAFE_ON_RESUME, *(f"method_options.{key}" for key in method_class(saved.method).resume_safe)}
    return refuse_changes(old, new, safe)


def resume_folder(cfg: PretrainConfig) -> Path:
    return ckpt.find_checkpoint(Path(cfg.out) if cfg.resume == "auto" else Path(cfg.resume))


def saved_metadata(cfg: PretrainConfig) -> dict[str, str]:
    """The resumed checkpoint's metadata ({} for a new run): a resume keeps the choices it
    records (frozen parameters, a method's numeric mode)."""
    return ckpt.read_metadata(resume_folder(cfg) / ckpt.WEIGHTS) if cfg.resume else {}


@dataclass
class ModelSetup:
    """The model as training starts: what is checkpointed, what is trained, and how."""

    model: nn.Module
    method: Method
    precision: Precision
    choice: PrecisionChoice  # printed at start
    frozen: list[str]


def setup_model(
    cfg: PretrainConfig, info: DataInfo, img_size: int, example: list[torch.Tensor], device: torch.device,
    world: World,
) -> ModelSetup:  # fmt: skip
    """Build the backbone and method, choose the precision, freeze what cannot learn (a resumed
    run: what it froze), and for a new run let the method start on ``example`` (views of a few
    images)."""
    cfg.patch_size = cfg.patch_size or default_patch_size(cfg.model, img_size, announce=world.is_main)
    backbone = create_backbone(cfg.model, img_size=img_size, in_chans=info.in_chans, patch_size=cfg.patch_size)
    saved = saved_metadata(cfg)
    method = build_method(cfg.method, backbone, BuildContext(cfg, info))
    choice = method.configure_precision(cfg.amp, device, saved)
    if cfg.grad_checkpointing:
        said = method.set_grad_checkpointing(cfg.model)
        if world.is_main:
            print(said)
    precision = Precision.build(choice.dtype, device)
    model = method.checkpointed()
    channels_last_if_cnn(method.to(device), device)
    if "frozen" in saved:
        frozen = freeze_parameters(method, json.loads(saved["frozen"]))
    else:
        frozen = freeze_unreached_parameters(method, example)
    if not cfg.resume:  # before DDP, which broadcasts rank 0's
        for line in method.prepare(example):
            if world.is_main:
                print(line)
    return ModelSetup(model, method, precision, choice, frozen)


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume) a pretraining; returns the path of the exported backbone."""
    validate(cfg)
    with process_group(cfg.device) as world:
        return _pretrain(cfg, world)


def example_views(train_set: SeededAugmentation, device: torch.device, count: int = 8) -> list[torch.Tensor]:
    """Each view of the first ``count`` training images, batched: what setup is tried on."""
    items = [train_set[i][0] for i in range(min(count, len(train_set)))]
    return [torch.stack(view).to(device) for view in zip(*items, strict=True)]


def training_data(
    cfg: PretrainConfig, dataset: Dataset, info: DataInfo, img_size: int, world: World, device: torch.device
) -> tuple[SeededAugmentation, EpochSampler, DataLoader]:
    """The augmented training set, this process's share of it, and its loader (full batches).
    Augmentation and order depend on the seed and the epoch only, and the loader draws its
    worker seeds from its own generator, so training leaves the global random state to the
    model (dropout), which checkpoints save."""
    options = method_options(cfg.method, cfg.method_options)
    views = method_class(cfg.method).transform(info, img_size, tuple(cfg.crop_scale), options)
    train_set = SeededAugmentation(dataset, views, cfg.seed)
    sampler = EpochSampler(
        DistributedSampler(train_set, world.size, world.rank, shuffle=True, seed=cfg.seed, drop_last=True)
    )
    workers = loader_workers(cfg.num_workers, device, world)
    loader = DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    if len(loader) < cfg.accum_iter:
        raise UserError(
            f"{len(train_set)} images cannot fill {cfg.accum_iter} batch(es) of {cfg.batch_size} per process; "
            "lower --batch-size or --accum-iter"
        )
    return train_set, sampler, loader


def schedules(cfg: PretrainConfig, base_lr: float, steps_per_epoch: int) -> tuple[Clock, LrSchedule]:
    """The run's clock, over ``--epochs`` (``--max-steps`` stops early, never reshapes it; with a
    time budget the share of the budget spent), and the warmup plus cosine lr on it."""
    total_steps = schedule_steps(cfg, steps_per_epoch)
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total_steps)
    time_budget = None if cfg.time_budget is None else 60.0 * cfg.time_budget
    return Clock(total_steps, time_budget), LrSchedule(base_lr, cfg.min_lr, warmup)


def schedule_steps(cfg: PretrainConfig, steps_per_epoch: int) -> int:
    """Steps the schedule spans: ``--epochs`` may be a fraction, so a run can last exactly the
    steps a compute budget buys."""
    return max(1, round(cfg.epochs * steps_per_epoch))


def resume(
    cfg: PretrainConfig,
    setup: ModelSetup,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    metadata: dict[str, str],
    world: World,
) -> None:
    """Load weights, optimizer, loss scales and position from ``--resume`` (refusing another model's)."""
    folder = resume_folder(cfg)
    ckpt.load_weights(setup.model, folder / ckpt.WEIGHTS, expect=metadata)
    saved = ckpt.load_training_state(folder)
    optimizer.load_state_dict(saved["optimizer"])
    setup.precision.load_state_dict(saved)
    setup.method.load_training_state(saved)
    state.step, state.epoch, state.elapsed = saved["step"], saved["epoch"], saved.get("elapsed", 0.0)
    state.skipped = saved.get("skipped", 0)
    if "random" in saved:  # absent from checkpoints written before it was saved
        try:
            set_random_states(saved["random"], world)
        except ValueError as exc:
            raise UserError(f"cannot resume {folder} exactly: {exc}") from exc
    if world.is_main:
        print(f"resumed from {folder} at step {state.step} (epoch {state.epoch})")


@dataclass
class Run:
    """Everything a pretraining run holds while it trains."""

    cfg: PretrainConfig
    world: World
    device: torch.device
    out: Path
    info: DataInfo
    img_size: int
    sampler: EpochSampler
    loader: DataLoader
    setup: ModelSetup
    optimizer: torch.optim.Optimizer
    state: TrainState
    clock: Clock
    lr: LrSchedule
    metadata: dict[str, str]  # what a checkpoint must agree on to be resumed
    descriptive: dict[str, str]  # what tools reading the checkpoint later need
    trained: nn.Module  # the method, wrapped in DDP under torchrun
    logger: MetricsLogger | None = None
    held_out: torch.Tensor | None = None  # loaded on first use by the method's report and figures

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps: each takes ``accum_iter`` of the loader's batches."""
        return len(self.loader) // self.cfg.accum_iter

    @property
    def last_step(self) -> int:
        total = self.clock.total_steps
        return min(self.cfg.max_steps or total, total)

    def results(self) -> Results:
        """What the method's report and figures get (main process only)."""
        return Results(self.out, self.info, self.held_out_images, self.cfg.seed)

    def held_out_images(self) -> torch.Tensor:
        if self.held_out is None:
            self.held_out = held_out_images(self.cfg, self.info, self.img_size).to(self.device)
        return self.held_out


def start_run(cfg: PretrainConfig, world: World) -> Run:
    """Data, model, optimizer, schedule and (with --resume) the saved state: a run ready to train."""
    out = Path(cfg.out)
    # every process must refuse, or the others would wait for it forever
    if max_across(float((out / ckpt.LATEST).exists() and not cfg.resume), world) > 0:
        raise UserError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    device = resolve_device(cfg.device, world)
    seed_everything(cfg.seed + world.rank)
    dataset = load_dataset(cfg.data, train=True, val_fraction=cfg.val_fraction)
    info = dataset.info
    img_size = cfg.img_size or info.img_size
    train_set, sampler, loader = training_data(cfg, dataset, info, img_size, world, device)
    setup = setup_model(cfg, info, img_size, example_views(train_set, device), device, world)
    total_batch = cfg.batch_size * world.size * cfg.accum_iter
    base_lr = cfg.lr if cfg.lr is not None else cfg.blr * total_batch / 256
    optimizer = torch.optim.AdamW(param_groups(setup.model, cfg.weight_decay), lr=base_lr, betas=(0.9, 0.95))
    state = TrainState()
    metadata = run_metadata(cfg, setup.method, img_size, info.in_chans, total_batch)
    descriptive = {
        "mean": json.dumps(info.mean), "std": json.dumps(info.std), "frozen": json.dumps(setup.frozen),
        "val_fraction": str(cfg.val_fraction), "classes": json.dumps(list(info.classes)), **setup.method.metadata(),
    }  # fmt: skip
    if cfg.resume:
        resume(cfg, setup, optimizer, state, metadata, world)
    if cfg.compile:  # after the FLOP count and the resume, before DDP
        setup.method.compile_step(cfg.compile, world.is_main)
    trained: nn.Module = setup.method
    if world.distributed:
        ids = [device.index] if device.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(setup.method, device_ids=ids)
    clock, lr = schedules(cfg, base_lr, len(loader) // cfg.accum_iter)
    run = Run(cfg, world, device, out, info, img_size, sampler, loader, setup, optimizer, state, clock, lr, metadata,
              descriptive, trained)  # fmt: skip
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out / "config.yaml")
        run.logger = MetricsLogger(out, tensorboard=cfg.tensorboard)
        run.logger.forget_after(state.step)
        announce(run, len(train_set), getattr(dataset, "split", cfg.data), base_lr)
    return run


def announce(run: Run, images: int, source: str, base_lr: float) -> None:
    """The lines a run prints as it starts: what trains on what, and at which precision."""
    cfg, setup = run.cfg, run.setup
    dead = setup.frozen
    settings = "".join(SHOWN[key].format(value) for key, value in setup.method.metadata().items() if key in SHOWN)
    print(
        f"pretraining {cfg.model} ({sum(p.numel() for p in setup.model.parameters()) / 1e6:.2f}M params) with "
        f"{cfg.method} on {images} images of {source}{settings}" + f", lr {base_lr:.2e}, "
        f"{run.steps_per_epoch} steps/epoch x {cfg.epochs:g} epochs"
        + ("" if cfg.time_budget is None else f" within {cfg.time_budget:g} min")
        + f", {run.world.size} process(es), {run.device}"
        + (f"; frozen (no gradient path): {', '.join(dead)}" if dead else "")
    )
    choice = setup.choice
    dtype = "float32" if choice.dtype is None else str(choice.dtype).removeprefix("torch.")
    mode = f"{choice.mode}, " if choice.mode else ""
    print(f"precision: {mode}{dtype}" + (f" ({choice.why})" if choice.why else ""))


def save(run: Run) -> None:
    """A checkpoint of the run as it stands (weights, optimizer, scales, random states)."""
    states = random_states(run.world)  # collective under DDP
    if run.world.is_main:
        state = run.state
        training_state = {
            "random": states, "step": state.step, "epoch": state.epoch, "elapsed": state.elapsed,
            "optimizer": run.optimizer.state_dict(), "skipped": state.skipped, **run.setup.precision.state_dict(),
            **run.setup.method.training_state(), "config": json.dumps(run.cfg.to_dict()),
        }  # fmt: skip
        ckpt.save_checkpoint(run.out, run.setup.model, training_state, {**run.metadata, **run.descriptive})


def train_epoch(run: Run, stop: StopRequest) -> bool:
    """Train the rest of the current epoch (a resumed run skips the batches already trained on);
    True when a SIGINT or SIGTERM stopped it."""
    cfg, state = run.cfg, run.state
    run.sampler.set_epoch(state.epoch)
    done = state.step - state.epoch * run.steps_per_epoch
    skip = done * cfg.batch_size * cfg.accum_iter
    loader = skip_batches(run.loader, run.sampler, skip) if done else run.loader

    def log(record: dict[str, float]) -> None:  # every process computes the record: it averages across them
        if run.logger is not None:
            run.logger.log(state.step, record)

    loop = LoopSettings(
        run.world, run.device, run.clock, run.lr, run.setup.precision, cfg.seed, cfg.clip_grad, run.last_step,
        cfg.accum_iter, cfg.log_every, cfg.save_every, on_log=log, on_checkpoint=lambda: save(run),
        stop_asked=lambda: stop.asked,
    )  # fmt: skip
    return train_one_epoch(run.trained, loader, run.optimizer, state, loop)


def train(run: Run) -> None:
    """Epochs until the last step or the time budget; a checkpoint (and the method's end-of-epoch
    figures) after each; a signal or a non-finite loss saves and stops."""
    state = run.state
    try:
        with StopRequest() as stop:
            while not budget_spent(state, run.last_step, run.clock.time_budget):
                stopped = train_epoch(run, stop)
                if state.step - state.epoch * run.steps_per_epoch >= run.steps_per_epoch:
                    state.epoch += 1
                    if run.world.is_main:
                        run.setup.method.end_of_epoch(state.epoch, run.results())
                save(run)
                if stopped:
                    raise Interrupted(resume_hint("pretrain", run.out, state.step, run.world))
    except NonFiniteLoss as exc:
        save(run)
        causes = "; ".join(run.setup.method.nonfinite_causes() + [LR_CAUSE])
        raise UserError(f"stopped: {exc}; the last good state is saved in {run.out}. Likely causes: {causes}") from exc
    finally:
        if run.logger is not None:
            run.logger.close()


def finish(run: Run) -> Path:
    """The method's report and figures, then the backbone's export."""
    cfg, export_path = run.cfg, run.out / ckpt.BACKBONE
    if run.world.is_main:
        run.setup.method.report(run.results())
        kwargs = backbone_kwargs(cfg.model, run.img_size, run.info.in_chans, cfg.patch_size)
        ckpt.export_backbone(export_path, run.setup.method.backbone, cfg.model, kwargs)
        seen = run.state.step * cfg.batch_size * run.world.size * cfg.accum_iter
        print(f"done at step {run.state.step} ({seen} images, {run.state.elapsed:.0f} s); "
              f"backbone exported to {export_path}")  # fmt: skip
    return export_path


def _pretrain(cfg: PretrainConfig, world: World) -> Path:
    run = start_run(cfg, world)
    train(run)
    return finish(run)


LR_CAUSE = "a learning rate too high for this model and batch (lower --blr or set --clip-grad)"


def held_out_images(cfg: PretrainConfig, info: DataInfo, img_size: int) -> torch.Tensor:
    """Up to 512 images of the test split (the training split when there is none), for a
    method's report and figures."""
    held_out = load_held_out(cfg.data, val_fraction=cfg.val_fraction)
    transform = eval_transform(info, img_size)
    return torch.stack([transform(held_out[i][0]) for i in range(min(len(held_out), HELD_OUT_IMAGES))])
