"""Command configurations: one dataclass per command whose fields are the YAML keys and the
command-line flags (``--batch-size`` sets ``batch_size``). Precedence: defaults, then
the ``--config`` file, then flags. Unknown keys are an error that suggests the closest."""

from __future__ import annotations

import argparse
import difflib
import types
import typing
from collections.abc import Collection, Sequence
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import yaml

from .errors import UserError


def option(default: Any, help: str, flag: bool = False, **extra: Any) -> Any:
    """A config key (or, in a method's ``Options``, an option) with its help; ``flag``: a method
    option that is also a ``pretrain`` flag and a top-level config key (``--steps`` sets the
    energy method's ``steps``)."""
    metadata = {"help": help, "flag": flag, **extra}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


_opt = option


ConfigT = TypeVar("ConfigT", bound="CommonConfig")
# the help of keys that pretrain and finetune both have
ACCUM_ITER_HELP = (
    "micro-batches per optimizer step (gradient accumulation): the total batch is batch_size x processes x "
    "accum_iter, and the lr and the schedule's steps follow it"
)
GRAD_CHECKPOINTING_HELP = "recompute activations in the backward pass, not keeping them: less memory, more compute"
COMPILE_HELP = (
    "torch.compile the model's forward (its backward follows) with this backend: the flag alone is inductor; "
    "aot_eager traces without generating code (to check that a model compiles); off by default"
)


@dataclass
class CommonConfig:
    """Keys shared by every command (data, model, optimisation, output)."""

    data: str = _opt(
        "embedded",
        "dataset: embedded, fashion-mnist[:DIR], cifar10:DIR, cifar100:DIR, torchvision:NAME:DIR or an image folder",
    )
    model: str = _opt(
        "essl_vit_mini_patch7",
        "timm model name or energyssl preset "
        "(essl_vit_tiny_patch4, essl_vit_mini_patch7, essl_vit_micro_patch7, essl_resnet_tiny, essl_convnext_tiny)",
    )
    val_fraction: float = _opt(
        0.1, "share of each class held out for evaluation in a folder without test/ or val/ (fixed, never trained on)"
    )
    img_size: int | None = _opt(None, "input size (default: the dataset's image size)")
    patch_size: int | None = _opt(None, "patch size override for token models")
    epochs: int = _opt(10, "training epochs")
    max_steps: int | None = _opt(
        None, "stop after this many optimizer steps in total (smoke runs; the lr schedule still spans --epochs)"
    )
    batch_size: int = _opt(64, "images per process and step")
    blr: float = _opt(4e-3, "base learning rate; the actual lr is blr * total batch / 256")
    lr: float | None = _opt(None, "absolute learning rate (overrides blr)")
    min_lr: float = _opt(0.0, "learning rate at the end of the cosine decay")
    warmup_epochs: float = _opt(1.0, "linear warmup length in epochs")
    weight_decay: float = _opt(0.05, "AdamW weight decay (not applied to norms, biases and other 1-d parameters)")
    amp: str = _opt("auto", "mixed precision: auto (bf16 on a GPU that supports it, else off), bf16, fp16, none")
    num_workers: int | None = _opt(
        None, "data loader worker processes (default: 0 on a CPU; on a GPU, the CPUs per GPU process, at most 8)"
    )
    seed: int = _opt(0, "random seed (data order, corruptions, init)")
    device: str = _opt("auto", "auto, cpu, cuda or cuda:N")
    out: str = _opt("runs/pretrain", "output folder: checkpoints, metrics.jsonl, config.yaml, TensorBoard logs")
    log_every: int = _opt(10, "append metrics every N steps")
    tensorboard: bool = _opt(True, "write TensorBoard logs")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PretrainConfig(CommonConfig):
    epochs: float = _opt(
        10.0, "training epochs; a fraction is fine: warmup and cosine span exactly round(epochs x steps/epoch) steps"
    )
    method: str = _opt(
        "energy", "energy (the method), or another in the same harness: mae, ae (AE + --task), cae, mocov3, dino, ijepa"
    )
    method_options: dict = _opt(
        {},
        "the method's options, e.g. {mask_ratio: 0.75, decoder_depth: 2} for mae (see energyssl.methods); the "
        "flags below marked (METHOD) set its options too",
    )
    time_budget: float | None = _opt(
        None,
        "stop after this many minutes of training steps; the lr schedule then follows the share of the budget "
        "spent, shaped as if it were --epochs epochs (which still cap the run)",
    )
    accum_iter: int = _opt(1, ACCUM_ITER_HELP)
    clip_grad: float | None = _opt(None, "clip the gradient norm to this value")
    grad_checkpointing: bool = _opt(False, GRAD_CHECKPOINTING_HELP)
    compile: str | None = _opt(None, COMPILE_HELP)
    crop_scale: list = _opt([0.2, 1.0], "RandomResizedCrop scale range")
    save_every: int = _opt(200, "save a checkpoint every N steps (and at each epoch end)")
    resume: str | None = _opt(
        None, "resume from a checkpoint folder, or 'auto' for the latest in --out (the flag alone)"
    )


@dataclass
class EvalConfig(CommonConfig):
    """Keys shared by the downstream commands (fine-tune and probes)."""

    init: str = _opt(
        "none", "pretrained run folder, checkpoint folder or .safetensors file; 'none': random init; 'pixels' (probes)"
    )
    model: str | None = _opt(None, "backbone name (default: the checkpoint's; essl_vit_mini_patch7 with --init none)")
    label_fraction: float = _opt(
        1.0, "fraction of the training labels learnt from, drawn class-balanced (--seed) outside the validation split"
    )
    val_size: float = _opt(
        0.1, "share of each class of the training labels kept apart as the validation split (fixed; 0: none)"
    )
    eval_split: str = _opt("test", "split scored: val (to choose settings) or test (once, for the final numbers)")
    compile: str | None = _opt(None, COMPILE_HELP)
    blr: float = _opt(2e-3, "base learning rate; the actual lr is blr * batch / 256")
    out: str = _opt("runs/eval", "output folder: results.json, metrics.jsonl, config.yaml")


@dataclass
class LoopConfig(EvalConfig):
    """Keys of the commands the fine-tuning loop runs (finetune, segment)."""

    accum_iter: int = _opt(1, ACCUM_ITER_HELP)
    grad_checkpointing: bool = _opt(False, GRAD_CHECKPOINTING_HELP)
    eval_every: int = _opt(1, "score the --eval-split every N epochs (and always after the last)")
    save_every: int = _opt(500, "save a checkpoint every N steps (and at each epoch end)")
    resume: str | None = _opt(
        None, "resume from a checkpoint folder, or 'auto' for the latest in --out (the flag alone)"
    )


@dataclass
class FinetuneConfig(LoopConfig):
    epochs: int = _opt(20, "training epochs")
    layer_decay: float = _opt(0.75, "layer-wise lr decay (ViT blocks; stages for CNNs); 1 disables")
    drop_path: float = _opt(0.1, "stochastic depth rate")
    smoothing: float = _opt(0.1, "label smoothing")
    mixup: float = _opt(0.8, "mixup alpha (0 disables)")
    cutmix: float = _opt(1.0, "cutmix alpha (0 disables)")
    randaug: str = _opt("rand-m9-mstd0.5-inc1", "timm RandAugment spec ('' disables)")
    crop_scale: list = _opt([0.35, 1.0], "RandomResizedCrop scale range")
    ema_decay: float | None = _opt(None, "keep an EMA of the weights with this decay and evaluate it too")
    out: str = _opt("runs/finetune", "output folder: checkpoints, results.json, metrics.jsonl, config.yaml")


# MAE's linear probe (its appendix A.2, main_linprobe.py): what ``probe --recipe mae`` changes of
# the probe's defaults (a flag or file still overrides each).
MAE_LINEAR_PROBE = {"epochs": 90, "warmup_epochs": 10.0, "blr": 0.1, "weight_decay": 0.0}


@dataclass
class ProbeConfig(EvalConfig):
    protocol: str = _opt("linear", "linear, mlp, knn or attentive (frozen backbone)")
    recipe: str = _opt(
        "cached",
        "how the linear probe trains: cached (AdamW on features extracted once, no augmentation; fast on small data) "
        "or mae (MAE's: LARS, BatchNorm without affine, crop + flip through the frozen backbone on the fly, "
        "resumable, under torchrun; its defaults: epochs 90, warmup 10, blr 0.1, weight decay 0) (default: cached)",
        presets={"mae": MAE_LINEAR_PROBE},
    )
    epochs: int = _opt(50, "epochs of the probe head")
    batch_size: int = _opt(256, "feature vectors (--recipe mae: images) per process and step")
    weight_decay: float = _opt(0.0, "weight decay of the probe head")
    blr: float = _opt(1e-2, "base learning rate; the actual lr is blr * total batch / 256")
    accum_iter: int = _opt(1, "--recipe mae: micro-batches per optimizer step (the total batch and lr follow)")
    save_every: int = _opt(500, "--recipe mae: save a checkpoint every N steps (and at each epoch end)")
    resume: str | None = _opt(None, "--recipe mae: resume from a checkpoint folder, or 'auto' for the latest in --out")
    knn_k: int = _opt(20, "neighbours for kNN")
    knn_temperature: float = _opt(0.07, "temperature of kNN vote weights exp(cos / T)")
    out: str = _opt("runs/probe", "output folder: results.json, config.yaml, cached features")


# What each segmentation protocol changes of segment's defaults (a flag or file still overrides
# each): the linear probe trains a head only (no layer decay, drop path or weight decay); UperNet
# fine-tunes with MAE's ADE20K recipe (lr 1e-4 at batch 16, layer decay 0.65, weight decay 0.05,
# drop path 0.1; mmsegmentation's crops, random scales and flips). The linear probe's blr is the
# segmentation benchmark's: every row scored higher on validation at 6.4e-2 than at 1.6e-2, and at most
# 0.5 mIoU below its best (2.56e-1, the grid's edge, was ahead by 0.14 on average).
SEGMENT_LINEAR = {"blr": 6.4e-2, "weight_decay": 0.0, "layer_decay": 1.0, "drop_path": 0.0}
SEGMENT_UPERNET = {"blr": 1.6e-3, "weight_decay": 0.05, "layer_decay": 0.65, "drop_path": 0.1}


@dataclass
class SegmentConfig(LoopConfig):
    protocol: str = _opt(
        "linear",
        "linear (the frozen backbone's last patch features, BatchNorm and a 1x1 conv, as DINOv2's linear "
        "segmentation) or upernet (the backbone fine-tuned under a UPerNet decoder on 4 feature levels, MAE's "
        f"ADE20K recipe: blr {SEGMENT_UPERNET['blr']:g}, layer decay {SEGMENT_UPERNET['layer_decay']:g}, weight "
        f"decay {SEGMENT_UPERNET['weight_decay']:g}, drop path {SEGMENT_UPERNET['drop_path']:g}) (default: linear: "
        f"blr {SEGMENT_LINEAR['blr']:g}, no weight decay)",
        presets={"linear": SEGMENT_LINEAR, "upernet": SEGMENT_UPERNET},
    )
    data: str = _opt(
        "embedded",
        "segmentation data: embedded (garments on a 56 px canvas), an ADE20K folder (images/training, "
        "annotations/training, ...) or a folder of images/ and masks/",
    )
    num_classes: int | None = _opt(
        None, "classes in the masks (default: the data's: 11 embedded, 150 ADE20K, else the largest label + 1)"
    )
    img_size: int | None = _opt(None, "crop size trained on and size scored at (default: the data's image size)")
    epochs: int = _opt(20, "training epochs")
    batch_size: int = _opt(16, "images per process and step")
    # the default protocol's preset: one place for each value
    blr: float = _opt(SEGMENT_LINEAR["blr"], "base learning rate; the actual lr is blr * total batch / 256")
    weight_decay: float = _opt(SEGMENT_LINEAR["weight_decay"], "AdamW weight decay")
    layer_decay: float = _opt(
        SEGMENT_LINEAR["layer_decay"], "layer-wise lr decay of the backbone under the decoder (upernet); 1 disables"
    )
    drop_path: float = _opt(SEGMENT_LINEAR["drop_path"], "stochastic depth rate of the backbone (upernet)")
    scale_range: list = _opt([0.5, 2.0], "random scale of the shorter side, as a multiple of the crop size")
    decoder_channels: int | None = _opt(None, "UPerNet decoder width (default: the backbone's last width, <= 512)")
    eval_every: int = _opt(5, "score the --eval-split every N epochs (and always after the last)")
    out: str = _opt("runs/segment", "output folder: checkpoints, results.json, metrics.jsonl, config.yaml")


METHOD_OPTIONS = "method_options"  # where the method options given as flags go
FLAG_CONSTS = {"resume": "auto", "compile": "inductor"}  # flags that may be given without a value


def _default(f: Field) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


def flags_of(cls: type, marked_only: bool = False) -> list[Flag]:
    """The fields of a config or options dataclass as flags (only those made with
    ``option(..., flag=True)`` when ``marked_only``)."""
    hints = typing.get_type_hints(cls)
    return [
        Flag(f.name, hints[f.name], _default(f), f.metadata["help"])
        for f in fields(cls)
        if not marked_only or f.metadata.get("flag")
    ]


class Flag(NamedTuple):
    """A method option that is also a ``pretrain`` flag and config key (see :func:`option`)."""

    name: str
    hint: Any
    default: Any
    help: str


def _base_type(hint: Any) -> type:
    """``int | None`` -> int; used to parse command-line values."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _check_keys(keys: list[str], where: str, cls: type[ConfigT], flags: Sequence[Flag] = ()) -> None:
    known = [f.name for f in fields(cls)] + [f.name for f in flags]
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"unknown config key '{key}' in {where}{hint}")


def load_yaml(path: str, cls: type[ConfigT], flags: Sequence[Flag] = ()) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    _check_keys(list(data), path, cls, flags)
    return data


def add_arguments(parser: argparse.ArgumentParser, cls: type[ConfigT], flags: Sequence[Flag] = ()) -> None:
    """One flag per field of the config dataclass ``cls`` (and per method option in ``flags``),
    with its help and default."""
    parser.add_argument("--config", help="YAML file of config keys (flags override it)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any key, dotted for nested ones (value parsed as YAML), e.g. corruption.grid_mask.ratio=0.5",
    )
    for f in [*flags_of(cls), *flags]:
        flag = "--" + f.name.replace("_", "-")
        # a help that explains its default keeps it; others get the value
        help_text = f.help if "default" in f.help else f"{f.help} (default: {f.default})"
        kind = _base_type(f.hint)
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif kind is dict:
            parser.add_argument(flag, dest=f.name, type=_yaml_mapping, default=None, metavar="YAML", help=help_text)
        elif kind is list:
            parser.add_argument(flag, dest=f.name, type=float, nargs="+", default=None, help=help_text)
        elif f.name in FLAG_CONSTS:
            parser.add_argument(flag, dest=f.name, nargs="?", const=FLAG_CONSTS[f.name], default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=help_text)


def _yaml_mapping(text: str) -> dict[str, Any]:
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        example = "{grid_mask: {ratio: 0.5}}"
        raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{example}', got {text!r}")
    return value


def _set_dotted(
    target: dict[str, Any], dotted: str, value: Any, cls: type[ConfigT], flags: Sequence[Flag] = ()
) -> None:
    keys = dotted.split(".")
    _check_keys(keys[:1], "--set", cls, flags)
    if keys[0] in {f.name for f in flags}:
        target = target.setdefault(METHOD_OPTIONS, {})
    node = target
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: '{key}' is not a mapping")
    node[keys[-1]] = value


def resolve(
    args: argparse.Namespace, cls: type[ConfigT], flags: Sequence[Flag] = (), base: Path | None = None
) -> ConfigT:
    """Defaults, then ``base`` (a resumed run's own config.yaml), then the YAML file, then
    ``--set`` values, then explicit flags. The method options in ``flags`` are set in
    ``method_options`` wherever they are given."""
    values = _layered(cls().to_dict(), args, cls, flags, base)
    if preset := _preset(cls, values):  # the defaults a chosen recipe changes, then the same layers on them
        values = _layered({**cls().to_dict(), **preset}, args, cls, flags, base)
    config = cls(**values)
    check_types(config)
    check_ranges(config)
    return config


def _preset(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """The defaults that the chosen values of ``cls``'s preset keys (``option(presets=...)``) set."""
    chosen: dict[str, Any] = {}
    for f in fields(cls):
        if "presets" in f.metadata and isinstance(values[f.name], str):
            chosen |= f.metadata["presets"].get(values[f.name], {})
    return chosen


def _layered(
    values: dict[str, Any], args: argparse.Namespace, cls: type, flags: Sequence[Flag], base: Path | None
) -> dict[str, Any]:
    """``values`` under ``base``, the YAML file, ``--set`` values and explicit flags, in that order."""
    flag_names = {f.name for f in flags}
    for file in [str(base)] * (base is not None) + [args.config] * bool(args.config):
        for key, value in load_yaml(file, cls, flags).items():
            _put(values, key, value, flag_names)
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"--set expects KEY=VALUE, got '{item}'")
        _set_dotted(values, key.strip(), yaml.safe_load(raw), cls, flags)
    for f in [*fields(cls), *flags]:
        value = getattr(args, f.name, None)
        if value is not None:
            _put(values, f.name, value, flag_names)
    return values


def _put(values: dict[str, Any], key: str, value: Any, flag_names: set[str]) -> None:
    """Set ``key`` (a method option given as a flag: in ``method_options``); a mapping is merged
    into the one already there, as a YAML file's mapping is."""
    node = values.setdefault(METHOD_OPTIONS, {}) if key in flag_names else values
    node[key] = {**node[key], **value} if isinstance(value, dict) and isinstance(node.get(key), dict) else value


def check_types(config: Any) -> None:
    """Each key of a config or options dataclass holds a value of its type (ints for ints,
    numbers for floats, ...), else one line."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
        if value is None and optional:
            continue
        kind = _base_type(hint)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(config, f.name, float(value))
            continue
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list",
                     dict: "a mapping"}  # fmt: skip
            raise UserError(f"config key '{f.name}' must be {names.get(kind, kind.__name__)}, got {value!r}")


def check_ranges(config: CommonConfig) -> None:
    """Values every command needs in range; the commands check their own keys beyond these."""
    checks = [
        (config.batch_size >= 1, f"batch_size must be >= 1, got {config.batch_size}"),
        (config.epochs > 0, f"epochs must be > 0, got {config.epochs}"),
        (config.blr > 0, f"blr must be > 0, got {config.blr}"),
        (config.lr is None or config.lr > 0, f"lr must be > 0, got {config.lr}"),
        (config.min_lr >= 0, f"min_lr must be >= 0, got {config.min_lr}"),
        (config.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {config.warmup_epochs}"),
        (config.weight_decay >= 0, f"weight_decay must be >= 0, got {config.weight_decay}"),
        (config.img_size is None or config.img_size >= 8, f"img_size must be >= 8, got {config.img_size}"),
        (0 < config.val_fraction < 1, f"val_fraction must be in (0, 1), got {config.val_fraction}"),
        (config.patch_size is None or config.patch_size >= 1, f"patch_size must be >= 1, got {config.patch_size}"),
        (config.max_steps is None or config.max_steps >= 1, f"max_steps must be >= 1, got {config.max_steps}"),
        (config.log_every >= 1, f"log_every must be >= 1, got {config.log_every}"),
        (config.num_workers is None or config.num_workers >= 0, f"num_workers must be >= 0, got {config.num_workers}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def run_config_file(out: str, resume: str) -> Path | None:
    """The config.yaml of the run ``--resume`` continues (its folder, or a checkpoint's parent)."""
    folder = Path(out) if resume == "auto" else Path(resume)
    found = [f / "config.yaml" for f in (folder, folder.parent) if (f / "config.yaml").is_file()]
    return found[0] if found else None


def refuse_changes(old: dict[str, Any], new: dict[str, Any], safe: Collection[str]) -> list[str]:
    """What ``new`` changes of a resumed run's own config ``old``: a change that would make it
    another run than the one its checkpoints continue is one error naming it; the ``safe`` ones
    (how far it goes, where, how it logs) are returned as lines to print."""
    changed = {key: (old.get(key), new.get(key)) for key in {*old, *new} - {"resume"} if old.get(key) != new.get(key)}
    refused = sorted(key for key in changed if key not in safe)
    if refused:
        key = refused[0]
        raise UserError(
            f"--resume continues a run made with {key}={changed[key][0]}, not {changed[key][1]}; "
            f"a resumed run keeps its {', '.join(refused)} (start a new run in another --out to change it)"
        )
    return [f"resuming with {key} {new!r} (the run had {old!r})" for key, (old, new) in sorted(changed.items())]


def save_yaml(config: CommonConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
