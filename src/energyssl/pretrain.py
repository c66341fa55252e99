"""``energyssl pretrain``: build data, model and pretext objective from a config, train, checkpoint,
resume, and export the backbone as a timm state dict."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import checkpoint as ckpt
from .config import PretrainConfig, save_yaml
from .corruptions import task_corruptions, tasks_in_use
from .data import (
    DataInfo,
    EpochSampler,
    SeededAugmentation,
    eval_transform,
    load_dataset,
    load_held_out,
)
from .distributed import (
    StopRequest,
    World,
    cleanup,
    init_distributed,
    loader_workers,
    max_across,
    random_states,
    resolve_device,
    seed_everything,
    set_random_states,
)
from .energy import GRAD_MODES, EnergyModel, non_smooth_layers
from .engine import (
    Loop,
    NonFiniteLoss,
    TrainState,
    budget_spent,
    cosine_lr,
    evaluate_restoration,
    evaluate_sorting,
    restoration_blocks,
    train_one_epoch,
)
from .errors import Interrupted, UserError
from .methods import BuildContext, Method, build_method, method_class, method_options
from .metrics import MetricsLogger
from .models import backbone_kwargs, create_backbone, default_patch_size
from .objective import SORTING, PretextObjective, freeze_parameters, freeze_unreached_parameters
from .precision import AMP_CHOICES, Precision, amp_dtype_for, channels_last_if_cnn, choose_precision
from .visualize import save_restoration_grid

LOSS_CHOICES = ("mse", "smooth_l1")
GRAD_MODE_CHOICES = ("auto", *GRAD_MODES)
RESTORATION_EVAL_IMAGES = 512
GRID_IMAGES = 4


def validate(cfg: PretrainConfig) -> None:
    """Reject impossible values before any work starts."""
    checks = [
        (cfg.amp in AMP_CHOICES, f"amp must be one of {AMP_CHOICES}, got '{cfg.amp}'"),
        (cfg.loss in LOSS_CHOICES, f"loss must be one of {LOSS_CHOICES}, got '{cfg.loss}'"),
        (cfg.steps >= 1, f"steps must be >= 1, got {cfg.steps}"),
        (cfg.grad_mode in GRAD_MODE_CHOICES, f"grad_mode must be one of {GRAD_MODE_CHOICES}, got '{cfg.grad_mode}'"),
        (cfg.grad_mode != "fast" or cfg.method == "energy", "grad_mode fast applies to the energy method only"),
        (cfg.grad_mode != "fast" or cfg.amp in ("auto", "none"), "grad_mode fast needs float32: use --amp none"),
        (cfg.time_budget is None or cfg.time_budget > 0, f"time_budget must be > 0 minutes, got {cfg.time_budget}"),
        (cfg.alpha_init is None or cfg.alpha_init > 0, f"alpha_init must be > 0, got {cfg.alpha_init}"),
        (isinstance(cfg.corruption, dict), "corruption must be a mapping of task name to parameters"),
        (len(cfg.crop_scale) == 2, f"crop_scale must be two numbers, got {cfg.crop_scale}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    refuse_unused_options(cfg)


def refuse_unused_options(cfg: PretrainConfig) -> None:
    """An option that could not take effect is an error, not silently ignored."""
    if cfg.method == "energy" and cfg.method_options:
        raise UserError("--method-options apply to the other methods; the energy method's settings are its flags")
    method_options(cfg.method, cfg.method_options)
    if not method_class(cfg.method).uses_crop_scale and cfg.crop_scale != PretrainConfig().crop_scale:
        raise UserError(f"--crop-scale does not apply to {cfg.method}, which crops as its paper does")
    if not method_class(cfg.method).uses_task:
        if cfg.task != PretrainConfig.task or cfg.corruption:
            raise UserError(f"--task and corruption parameters do not apply to {cfg.method}, which has its own views")
        return
    unused = sorted(set(cfg.corruption) - tasks_in_use(cfg.task, cfg.corruption))
    if unused:
        raise UserError(f"corruption parameters for {', '.join(unused)} do not apply to task {cfg.task}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases, norms, embeddings' 1-d params and alpha (as MAE/timm)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolve_precision(
    cfg: PretrainConfig, backbone: nn.Module, device: torch.device
) -> tuple[str, torch.dtype | None, str]:
    """(grad mode, autocast dtype, why): see :func:`energyssl.precision.choose_precision`."""
    if cfg.method != "energy":
        return "exact", amp_dtype_for(cfg.amp, device), ""
    kinked = non_smooth_layers(backbone)
    if cfg.grad_mode == "fast" and kinked:
        raise UserError(
            f"grad_mode fast needs a smooth backbone; {cfg.model} has {', '.join(kinked)} (use --grad-mode exact)"
        )
    return choose_precision(cfg.grad_mode, cfg.amp, kinked, device)


def run_metadata(cfg: PretrainConfig, img_size: int, in_chans: int, total_batch: int) -> dict[str, str]:
    """What a checkpoint must agree on to be resumed or loaded into this model."""
    return {
        "model": cfg.model,
        "img_size": str(img_size),
        "in_chans": str(in_chans),
        "patch_size": str(cfg.patch_size),
        "method": cfg.method,
        "task": cfg.task,
        "steps": str(cfg.steps),
        "batch_size": str(total_batch),
    }


def resume_folder(cfg: PretrainConfig) -> Path:
    return ckpt.find_checkpoint(Path(cfg.out) if cfg.resume == "auto" else Path(cfg.resume))


def previous_choices(cfg: PretrainConfig) -> dict[str, str]:
    """The resumed run's resolved gradient mode and frozen parameters ({} for a new run): kept,
    so that ``auto`` resolving otherwise on this machine cannot change the optimizer's groups."""
    if not cfg.resume:
        return {}
    metadata = ckpt.read_metadata(resume_folder(cfg) / ckpt.WEIGHTS)
    return {key: metadata[key] for key in ("grad_mode", "frozen") if key in metadata}


@dataclass
class ModelSetup:
    """The model as training starts: what is checkpointed, what is trained, and how."""

    model: nn.Module
    objective: Method
    grad_mode: str
    precision: Precision
    why: str  # the reason for the precision, printed at start
    frozen: list[str]


def setup_model(
    cfg: PretrainConfig, info: DataInfo, img_size: int, example: list[torch.Tensor], device: torch.device,
    world: World,
) -> ModelSetup:  # fmt: skip
    """Build the backbone and objective, choose the precision, freeze what cannot learn (a resumed
    run: what it froze), and for a new run prime BatchNorm and size alpha on ``example`` (views
    of a few images)."""
    cfg.patch_size = cfg.patch_size or default_patch_size(cfg.model, img_size, announce=world.is_main)
    backbone = create_backbone(cfg.model, img_size=img_size, in_chans=info.in_chans, patch_size=cfg.patch_size)
    previous = previous_choices(cfg)
    if cfg.grad_mode == "auto" and "grad_mode" in previous:
        cfg.grad_mode = previous["grad_mode"]
    grad_mode, amp_dtype, why = resolve_precision(cfg, backbone, device)
    precision = Precision.build(amp_dtype, device, energy=cfg.method == "energy")
    objective = build_method(cfg.method, backbone, BuildContext(cfg, info, grad_mode, precision.input_scale))
    model = objective.checkpointed()
    channels_last_if_cnn(objective.to(device), device)
    if "frozen" in previous:
        frozen = freeze_parameters(objective, json.loads(previous["frozen"]))
    else:
        frozen = freeze_unreached_parameters(objective, example)
    if not cfg.resume and isinstance(objective, PretextObjective):  # before DDP, which broadcasts rank 0's
        objective.model.prime_batchnorm(example[0])
        if cfg.alpha_init is None:
            alpha = objective.calibrate_alpha(example[0])
            if world.is_main:
                print(f"alpha starts at {alpha:.3g}: the first step covers half the corruption of a batch")
    return ModelSetup(model, objective, grad_mode, precision, why, frozen)


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume) a pretraining; returns the path of the exported backbone."""
    validate(cfg)
    world = init_distributed(cfg.device)
    try:
        return _pretrain(cfg, world)
    finally:
        cleanup(world)


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
    if len(loader) == 0:
        raise UserError(
            f"{len(train_set)} images cannot fill one batch of {cfg.batch_size} per process; lower --batch-size"
        )
    return train_set, sampler, loader


def lr_schedule(
    cfg: PretrainConfig, base_lr: float, steps_per_epoch: int, state: TrainState, time_budget: float | None
) -> Callable[[int], float]:
    """Warmup plus cosine over ``--epochs`` (``--max-steps`` stops early, never reshapes it); with
    a time budget (seconds) the schedule's position is the share of the budget spent."""
    total_steps = schedule_steps(cfg, steps_per_epoch)
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total_steps)

    def lr_at(step: int) -> float:
        if time_budget is not None:
            step = min(total_steps, int(state.elapsed / time_budget * total_steps))
        return cosine_lr(step, base_lr, cfg.min_lr, warmup, total_steps)

    return lr_at


def schedule_steps(cfg: PretrainConfig, steps_per_epoch: int) -> int:
    """Steps the schedule spans: ``--epochs`` may be a fraction, so a run can last exactly the
    steps a compute budget buys."""
    return max(1, round(cfg.epochs * steps_per_epoch))


def resume(
    cfg: PretrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    state: TrainState,
    metadata: dict[str, str],
    world: World,
) -> None:
    """Load weights, optimizer, loss scales and position from ``--resume`` (refusing another model's)."""
    folder = resume_folder(cfg)
    ckpt.load_weights(model, folder / ckpt.WEIGHTS, expect=metadata)
    saved = ckpt.load_training_state(folder)
    optimizer.load_state_dict(saved["optimizer"])
    precision.load_state_dict(saved)
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
    lr_at: Callable[[int], float]
    metadata: dict[str, str]  # what a checkpoint must agree on to be resumed
    descriptive: dict[str, str]  # what tools reading the checkpoint later need
    trained: nn.Module  # the method, wrapped in DDP under torchrun
    logger: MetricsLogger | None = None
    held_out: torch.Tensor | None = None  # images for restoration figures (energy method, main process)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    @property
    def last_step(self) -> int:
        total = schedule_steps(self.cfg, self.steps_per_epoch)
        return min(self.cfg.max_steps or total, total)

    @property
    def time_budget(self) -> float | None:
        return None if self.cfg.time_budget is None else 60.0 * self.cfg.time_budget

    @property
    def figures(self) -> PretextObjective | None:
        objective = self.setup.objective
        return objective if isinstance(objective, PretextObjective) and self.held_out is not None else None


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
    total_batch = cfg.batch_size * world.size
    base_lr = cfg.lr if cfg.lr is not None else cfg.blr * total_batch / 256
    optimizer = torch.optim.AdamW(param_groups(setup.model, cfg.weight_decay), lr=base_lr, betas=(0.9, 0.95))
    state = TrainState()
    time_budget = None if cfg.time_budget is None else 60.0 * cfg.time_budget
    metadata = run_metadata(cfg, img_size, info.in_chans, total_batch)
    descriptive = {
        "mean": json.dumps(info.mean), "std": json.dumps(info.std), "grad_mode": setup.grad_mode,
        "frozen": json.dumps(setup.frozen), "corruption": json.dumps(cfg.corruption),
        "val_fraction": str(cfg.val_fraction),
    }  # fmt: skip
    if cfg.resume:
        resume(cfg, setup.model, optimizer, setup.precision, state, metadata, world)
    trained: nn.Module = setup.objective
    if world.distributed:
        ids = [device.index] if device.type == "cuda" else None
        trained = nn.parallel.DistributedDataParallel(setup.objective, device_ids=ids)
    lr_at = lr_schedule(cfg, base_lr, len(loader), state, time_budget)
    run = Run(cfg, world, device, out, info, img_size, sampler, loader, setup, optimizer, state, lr_at, metadata,
              descriptive, trained)  # fmt: skip
    if world.is_main:
        if isinstance(setup.objective, PretextObjective):
            run.held_out = held_out_images(cfg, info, img_size).to(device)
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
    print(
        f"pretraining {cfg.model} ({sum(p.numel() for p in setup.model.parameters()) / 1e6:.2f}M params) with "
        f"{cfg.method} on {images} images of {source}, task {cfg.task}"
        + (f", K={cfg.steps}" if cfg.method == "energy" else "")
        + f", lr {base_lr:.2e}, "
        f"{run.steps_per_epoch} steps/epoch x {cfg.epochs:g} epochs"
        + ("" if cfg.time_budget is None else f" within {cfg.time_budget:g} min")
        + f", {run.world.size} process(es), {run.device}"
        + (f"; frozen (no gradient path): {', '.join(dead)}" if dead else "")
    )
    dtype = "float32" if setup.precision.dtype is None else str(setup.precision.dtype).removeprefix("torch.")
    gradient = f"{setup.grad_mode} gradient, " if cfg.method == "energy" else ""
    print(f"precision: {gradient}{dtype}" + (f" ({setup.why})" if setup.why else ""))


def save(run: Run) -> None:
    """A checkpoint of the run as it stands (weights, optimizer, scales, random states)."""
    states = random_states(run.world)  # collective under DDP
    if run.world.is_main:
        state = run.state
        training_state = {
            "random": states, "step": state.step, "epoch": state.epoch, "elapsed": state.elapsed,
            "optimizer": run.optimizer.state_dict(), "skipped": state.skipped, **run.setup.precision.state_dict(),
            "config": json.dumps(run.cfg.to_dict()),
        }  # fmt: skip
        ckpt.save_checkpoint(run.out, run.setup.model, training_state, {**run.metadata, **run.descriptive})


def train_epoch(run: Run, stop: StopRequest) -> bool:
    """Train the rest of the current epoch (a resumed run skips the batches already trained on);
    True when a SIGINT or SIGTERM stopped it."""
    cfg, state = run.cfg, run.state
    run.sampler.set_epoch(state.epoch)
    done = state.step - state.epoch * run.steps_per_epoch
    loader = _skip_batches(run.loader, run.sampler, done * cfg.batch_size) if done else run.loader

    def log(record: dict[str, float]) -> None:  # every process computes the record: it averages across them
        if run.logger is not None:
            run.logger.log(state.step, record)

    loop = Loop(
        run.world, run.device, run.setup.precision, cfg.seed, cfg.clip_grad, run.last_step, run.time_budget,
        cfg.log_every, cfg.save_every, on_log=log, on_checkpoint=lambda: save(run), stop_asked=lambda: stop.asked,
    )  # fmt: skip
    return train_one_epoch(run.trained, loader, run.optimizer, run.lr_at, state, loop)


def train(run: Run) -> None:
    """Epochs until the last step or the time budget; a checkpoint (and, every --vis-every epochs,
    a restoration grid) after each; a signal or a non-finite loss saves and stops."""
    cfg, state = run.cfg, run.state
    try:
        with StopRequest() as stop:
            while not budget_spent(state, run.last_step, run.time_budget):
                stopped = train_epoch(run, stop)
                if state.step - state.epoch * run.steps_per_epoch >= run.steps_per_epoch:
                    state.epoch += 1
                    if run.figures is not None and cfg.vis_every > 0 and state.epoch % cfg.vis_every == 0:
                        grid = run.out / "restorations" / f"epoch-{state.epoch:03d}.png"
                        save_grid(run.figures, cfg, run.held_out, run.info, grid)
                save(run)
                if stopped:
                    raise Interrupted(resume_hint(run.out, state.step, run.world))
    except NonFiniteLoss as exc:
        save(run)
        causes = "; ".join(nonfinite_causes(cfg, run.setup.model, run.setup.precision))
        raise UserError(f"stopped: {exc}; the last good state is saved in {run.out}. Likely causes: {causes}") from exc
    finally:
        if run.logger is not None:
            run.logger.close()


def finish(run: Run) -> Path:
    """Restoration report and figures (energy method), then the backbone's export."""
    cfg, export_path = run.cfg, run.out / ckpt.BACKBONE
    if run.figures is not None:
        report_restoration(run.figures, cfg, run.held_out, run.out)
        save_grid(run.figures, cfg, run.held_out, run.info, run.out / "restorations" / "final.png")
    if run.world.is_main:
        kwargs = backbone_kwargs(cfg.model, run.img_size, run.info.in_chans, cfg.patch_size)
        ckpt.export_backbone(export_path, run.setup.model.backbone, cfg.model, kwargs)
        seen = run.state.step * cfg.batch_size * run.world.size
        print(f"done at step {run.state.step} ({seen} images, {run.state.elapsed:.0f} s); "
              f"backbone exported to {export_path}")  # fmt: skip
    return export_path


def _pretrain(cfg: PretrainConfig, world: World) -> Path:
    run = start_run(cfg, world)
    train(run)
    return finish(run)


def resume_hint(out: Path, step: int, world: World) -> str:
    """The line printed when a signal stopped the run: where the work is and how to go on."""
    launcher = " (under torchrun, as before)" if world.distributed else ""
    return (
        f"interrupted at step {step}; checkpoint saved in {out}. Resume with: "
        f"energyssl pretrain --config {out / 'config.yaml'} --resume{launcher}"
    )


def nonfinite_causes(cfg: PretrainConfig, model: nn.Module, precision: Precision) -> list[str]:
    """What makes this run's loss NaN or infinite, most specific first, each with its fix."""
    causes = []
    if precision.input_scale is not None:
        causes.append("fp16 overflows at every loss scale (use --amp bf16 or none)")
    if isinstance(model, EnergyModel):
        causes.append(
            f"the input gradient dE/dx exploded (alpha is {model.alpha.item():.3g}; lower --head-init-std or "
            "--alpha-init, or set --clip-grad)"
        )
    causes.append("a learning rate too high for this model and batch (lower --blr or set --clip-grad)")
    return causes


def held_out_images(cfg: PretrainConfig, info: DataInfo, img_size: int) -> torch.Tensor:
    """Up to 512 images of the test split (the training split when there is none), for the
    restoration report and the grids."""
    held_out = load_held_out(cfg.data, val_fraction=cfg.val_fraction)
    transform = eval_transform(info, img_size)
    return torch.stack([transform(held_out[i][0]) for i in range(min(len(held_out), RESTORATION_EVAL_IMAGES))])


def report_restoration(objective: PretextObjective, cfg: PretrainConfig, images: torch.Tensor, out: Path) -> None:
    """Restoration error (pixel tasks) and sorting accuracy on held-out images: printed and
    saved as ``restoration.json``."""
    model = objective.model
    report: dict[str, dict[str, float]] = {}
    if objective.corruption is not None:
        corruptions = task_corruptions(objective.corruption, cfg.task)
        report = evaluate_restoration(model, images, corruptions, cfg.steps, seed=cfg.seed)
    if objective.sorting is not None and objective.table is not None:
        report[SORTING] = evaluate_sorting(model, objective.sorting, objective.table, images, cfg.steps, cfg.seed)
    (out / "restoration.json").write_text(json.dumps({"images": len(images), "tasks": report}, indent=2))
    print(f"on {len(images)} held-out images, corrupted -> restored after K={cfg.steps} steps:")
    for task, row in report.items():
        if task == SORTING:
            print(f"  {task:<18} accuracy {row['shuffled_accuracy']:.3f} -> {row['sorted_accuracy']:.3f}")
        else:
            print(f"  {task:<18} MSE {row['corrupted_mse']:.4f} -> {row['restored_mse']:.4f}")


def save_grid(
    objective: PretextObjective, cfg: PretrainConfig, images: torch.Tensor, info: DataInfo, path: Path
) -> None:
    """Corrupted / each step / original for the first held-out images, one block per pixel task."""
    if objective.corruption is None:
        return
    corruptions = task_corruptions(objective.corruption, cfg.task)
    blocks = restoration_blocks(objective.model, corruptions, images[:GRID_IMAGES], cfg.steps, cfg.seed)
    save_restoration_grid(path, blocks, info.mean, info.std, title=path.stem)


def _skip_batches(loader: DataLoader, sampler: EpochSampler, skip_samples: int) -> DataLoader:
    """A loader over the same epoch order minus its first ``skip_samples`` indices."""
    indices = list(iter(sampler))[skip_samples:]
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=indices,
        num_workers=loader.num_workers,
        drop_last=True,
        pin_memory=loader.pin_memory,
        generator=loader.generator,
    )
