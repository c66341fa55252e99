"""``energyssl probe``: frozen-backbone protocols on features extracted once.

* linear -- BatchNorm without affine, then a linear classifier (as MAE); with ``--recipe mae``
  MAE's whole protocol instead: LARS, images augmented on the fly through the frozen backbone,
  run by the fine-tuning loop (torchrun, accumulation, checkpoints, resume);
* mlp -- a 3-layer head;
* knn -- cosine similarity, k neighbours, votes weighted by exp(cos / T) (as DINO);
* attentive -- a cross-attention unit with its own class token over the patch tokens, then
  a linear classifier (as CAE). CNN feature maps count as tokens (one per position).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..checkpoint import atomic_write, read_metadata
from ..compiling import check_backend, compile_forward
from ..config import EvalConfig, FinetuneConfig, ProbeConfig
from ..data import TransformedDataset, eval_transform
from ..distributed import World, barrier, gather_shards, loader_workers, max_across, process_group, shard
from ..errors import UserError
from ..schedules import warmup_cosine
from .finetune import LinearProbe, Route, finetune, lars_optimizer
from .prepare import MAIN, prepare, results_record
from .results import accuracy_metrics, summary_line, write_results

PROTOCOLS = ("linear", "mlp", "knn", "attentive")
RECIPES = ("cached", "mae")
TOKEN_LABELS = "token-labels.safetensors"


def frozen_tokens(model: nn.Module, images: Tensor) -> Tensor:
    """(B, N, D) tokens without prefix (class/register) tokens; CNN maps become (B, H*W, C)."""
    features = model.forward_features(images)
    if features.ndim == 4:
        return features.flatten(2).transpose(1, 2)
    return features[:, getattr(model, "num_prefix_tokens", 0) :]


@torch.no_grad()
def token_shape(model: nn.Module, in_chans: int, img_size: int, device: torch.device) -> list[int]:
    """(tokens, width) of an image's patch tokens (one probe image, on the model's device, in
    eval mode so a BatchNorm accepts a batch of one)."""
    model.eval()
    return list(frozen_tokens(model, torch.zeros(1, in_chans, img_size, img_size, device=device)).shape[1:])


@torch.no_grad()
def extract(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[Tensor, Tensor]:
    """Pooled features and labels of a whole split (patch tokens go to a :class:`TokenCache`)."""
    model.eval()
    feats, labels = [], []
    for images, targets in tqdm(loader, desc="features", leave=False, dynamic_ncols=True):
        images = images.to(device, non_blocking=True)
        feats.append(model.forward_head(model.forward_features(images), pre_logits=True).float().cpu())
        labels.append(targets)
    return torch.cat(feats), torch.cat(labels)


def cached_features(
    model: nn.Module, loaders: dict[str, DataLoader], device: torch.device, cache: Path, key: str, world: World = MAIN
) -> dict[str, Tensor] | None:
    """Features of every split, from ``cache`` when it was made for the same ``key``. Under
    torchrun each process extracts its shard and the main process gathers them, in dataset
    order (it alone gets the features; the others get None)."""
    if cache.is_file() and read_metadata(cache).get("key") == key:
        return load_file(str(cache)) if world.is_main else None
    out: dict[str, Tensor] = {}
    for split, loader in loaders.items():
        x, y = extract(model, loader, device)
        x, y = gather_shards(x, world), gather_shards(y, world)
        if x is not None and y is not None:
            out[f"{split}_x"], out[f"{split}_y"] = x, y
    if not world.is_main:
        return None
    atomic_write(cache, lambda p: save_file(out, str(p), metadata={"key": key}))
    return out


class TokenCache:
    """The patch tokens of one split in a float16 file on disk, read and written by rows: host
    memory holds a batch of them, whatever the size of the split (ViT-B/16 tokens of ImageNet's
    training split are about 385 GB)."""

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        self.path, self.shape = path, shape
        self.row_bytes = 2 * math.prod(shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def write(self, rows: Tensor, values: Tensor) -> None:
        with self.path.open("r+b") as f:
            for row, value in zip(rows.tolist(), values.half().numpy(), strict=True):
                f.seek(row * self.row_bytes)
                f.write(value.tobytes())

    def __getitem__(self, rows: Tensor) -> Tensor:
        with self.path.open("rb") as f:
            return torch.stack([self._read(f, row) for row in rows.tolist()])

    def _read(self, f: BinaryIO, row: int) -> Tensor:
        f.seek(row * self.row_bytes)
        return torch.from_numpy(np.frombuffer(f.read(self.row_bytes), np.float16).reshape(self.shape[1:]).copy())

    def split(self, size: int) -> Iterator[Tensor]:
        for start in range(0, len(self), size):
            yield self[torch.arange(start, min(start + size, len(self)))]


def cached_tokens(
    model: nn.Module, loaders: dict[str, DataLoader], shapes: dict[str, list[int]], device: torch.device,
    folder: Path, key: str, world: World,
) -> dict[str, Tensor | TokenCache] | None:  # fmt: skip
    """Patch tokens of every split (of ``shapes``: images, tokens, width) in :class:`TokenCache`
    files, reused when made for the same ``key``. Under torchrun each process writes the rows of
    its shard; the main process alone gets the result."""
    record = folder / "tokens.json"
    saved = json.loads(record.read_text()) if record.is_file() else {}
    if saved.get("key") != key:
        if world.is_main:  # the files are rewritten: no record may vouch for them meanwhile
            record.unlink(missing_ok=True)
        saved = {"key": key, **shapes}
        write_tokens(model, loaders, device, folder, saved, world)
        if world.is_main:
            atomic_write(record, lambda p: p.write_text(json.dumps(saved)))
    if not world.is_main:
        return None
    labels = load_file(str(folder / TOKEN_LABELS))
    out: dict[str, Tensor | TokenCache] = {}
    for split in loaders:
        out[f"{split}_x"], out[f"{split}_y"] = TokenCache(folder / f"tokens-{split}.bin", saved[split]), labels[split]
    return out


@torch.no_grad()
def write_tokens(
    model: nn.Module, loaders: dict[str, DataLoader], device: torch.device, folder: Path, shapes: dict, world: World
) -> None:
    """Fill the token files, after checking the disk holds them (one error line if not)."""
    need = sum(2 * math.prod(shapes[split]) for split in loaders)
    free = shutil.disk_usage(folder).free if world.is_main else 0
    if max_across(float(world.is_main and need > free), world) > 0:
        raise UserError(
            f"the attentive probe's token cache needs {need / 1e9:.1f} GB in {folder}, which has {free / 1e9:.1f} GB "
            "free: choose an --out on a larger disk"
        )
    if world.is_main:
        for split in loaders:
            with (folder / f"tokens-{split}.bin").open("wb") as f:
                f.truncate(2 * math.prod(shapes[split]))
    barrier(world)
    model.eval()
    labels = {}
    for split, loader in loaders.items():
        cache, seen, targets = TokenCache(folder / f"tokens-{split}.bin", shapes[split]), 0, []
        for images, batch_targets in tqdm(loader, desc="tokens", leave=False, dynamic_ncols=True):
            rows = world.rank + world.size * torch.arange(seen, seen + len(images))  # this shard's rows
            cache.write(rows, frozen_tokens(model, images.to(device, non_blocking=True)).cpu())
            seen = seen + len(images)
            targets.append(batch_targets)
        labels[split] = gather_shards(torch.cat(targets), world)
    barrier(world)
    if world.is_main:
        atomic_write(folder / TOKEN_LABELS, lambda p: save_file(labels, str(p)))


def knn_predict(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, k: int, temperature: float, classes: int,
    device: torch.device | str = "cpu", chunk: int = 1024,
) -> Tensor:  # fmt: skip
    """Class scores from the k most cosine-similar training features, weighted by exp(sim / T),
    on ``device``, ``chunk`` test images at a time: memory holds the training features and one
    chunk's similarities, whatever the size of the test set."""
    train_x, train_y = F.normalize(train_x.to(device).float(), dim=1), train_y.to(device)
    scores = []
    for part in test_x.split(chunk):
        sim, idx = (F.normalize(part.to(device).float(), dim=1) @ train_x.T).topk(min(k, len(train_x)), dim=1)
        votes = torch.zeros(len(part), classes, device=device)
        scores.append(votes.scatter_add_(1, train_y[idx], (sim / temperature).exp()).cpu())
    return torch.cat(scores)


class AttentiveHead(nn.Module):
    """A learned class token attends to the (frozen) patch tokens; a linear layer classifies it."""

    def __init__(self, dim: int, classes: int, heads: int = 4) -> None:
        super().__init__()
        heads = heads if dim % heads == 0 else 1
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm_tokens = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_out = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        tokens = self.norm_tokens(tokens.float())
        pooled, _ = self.attn(self.query.expand(len(tokens), -1, -1), tokens, tokens, need_weights=False)
        return self.fc(self.norm_out(pooled.squeeze(1)))


def probe_head(protocol: str, dim: int, classes: int) -> nn.Module:
    if protocol == "linear":
        return nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, classes))
    if protocol == "mlp":
        hidden = 512
        return nn.Sequential(
            nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, classes),
        )  # fmt: skip
    return AttentiveHead(dim, classes)


def train_head(head: nn.Module, x: Tensor, y: Tensor, cfg: ProbeConfig, device: torch.device) -> nn.Module:
    """AdamW with warmup + cosine on cached features."""
    head.to(device)
    batch = min(cfg.batch_size, len(x))
    lr = cfg.lr if cfg.lr is not None else cfg.blr * batch / 256
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(x) // batch)
    total = cfg.epochs * steps_per_epoch
    generator = torch.Generator().manual_seed(cfg.seed)
    step = 0
    for _ in tqdm(range(cfg.epochs), desc=f"{cfg.protocol} head", leave=False, dynamic_ncols=True):
        head.train()
        order = torch.randperm(len(x), generator=generator)
        for i in range(steps_per_epoch):
            if cfg.max_steps is not None and step >= cfg.max_steps:
                return head
            idx = order[i * batch : (i + 1) * batch]
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine(step, lr, cfg.min_lr, int(cfg.warmup_epochs * steps_per_epoch), total)
            loss = F.cross_entropy(head(x[idx].to(device).float()), y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return head


@torch.no_grad()
def predict(head: nn.Module, x: Tensor, device: torch.device) -> Tensor:
    head.eval()
    return torch.cat([head(chunk.to(device).float()).cpu() for chunk in x.split(512)])


def probe(cfg: ProbeConfig) -> dict:
    """Run a probe (under torchrun: the features extracted by every process, the head trained
    and the results written by the main one); returns the record written to results.json."""
    validate(cfg)
    if cfg.recipe == "mae":
        return mae_linear_probe(cfg)
    with process_group(cfg.device) as world:
        return _probe(cfg, world)


def validate(cfg: ProbeConfig) -> None:
    """Refuse a protocol or recipe that does not exist, and the options that would not apply."""
    if cfg.protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol '{cfg.protocol}'; choose one of: {', '.join(PROTOCOLS)}")
    if cfg.recipe not in RECIPES:
        raise UserError(f"unknown recipe '{cfg.recipe}'; choose one of: {', '.join(RECIPES)}")
    if cfg.recipe == "mae" and (cfg.protocol != "linear" or cfg.init == "pixels"):
        raise UserError("--recipe mae is a linear probe through a network: give --protocol linear and a --init")
    if cfg.recipe == "cached" and (cfg.accum_iter != 1 or cfg.resume):
        raise UserError("--accum-iter and --resume apply to --recipe mae only (the cached probe runs in minutes)")
    check_backend(cfg.compile)


def mae_linear_probe(cfg: ProbeConfig) -> dict:
    """MAE's linear probe as a fine-tune of a linear head on the frozen backbone: the recipe's
    fixed parts here (crop scale 0.08-1 + flip, no mixup, smoothing or drop path, LARS), its
    hyperparameters from ``cfg``; scored once, at the end."""
    shared = {f.name: getattr(cfg, f.name) for f in fields(EvalConfig)}
    run = FinetuneConfig(
        **shared, accum_iter=cfg.accum_iter, save_every=cfg.save_every, resume=cfg.resume, eval_every=cfg.epochs,
        layer_decay=1.0, drop_path=0.0, smoothing=0.0, mixup=0.0, cutmix=0.0, randaug="", crop_scale=[0.08, 1.0],
    )  # fmt: skip
    return finetune(run, Route("probe", "linear-mae", LinearProbe, lars_optimizer, saved=cfg))


def _probe(cfg: ProbeConfig, world: World) -> dict:
    setup = prepare(cfg, world)
    device, data, model = setup.device, setup.data, setup.model
    if cfg.compile:  # the feature extraction
        compile_forward(model, cfg.compile, world.is_main, "forward_features")
    classes = data.info.num_classes
    tokens = cfg.protocol == "attentive"
    width = token_shape(model, data.info.in_chans, data.img_size, device) if tokens else []
    if tokens and width[0] < 1:
        raise UserError(f"{setup.model_name} gives no patch tokens for the attentive probe")
    transform = eval_transform(data.info, data.img_size)
    workers = loader_workers(cfg.num_workers, device, world)
    loaders = {
        split: DataLoader(
            TransformedDataset(shard(ds, world), transform),
            batch_size=256,
            num_workers=workers,
            pin_memory=device.type == "cuda",
        )
        for split, ds in (("train", data.train), ("test", data.scored))
    }
    key = ":".join(
        map(
            str,
            (
                setup.init.sha256,
                setup.model_name,
                cfg.data,
                cfg.label_fraction,
                cfg.seed,
                data.img_size,
                tokens,
                cfg.val_size,
                cfg.eval_split,
            ),
        )
    )
    if tokens:
        shapes = {"train": [len(data.train), *width], "test": [len(data.scored), *width]}
        feats = cached_tokens(model, loaders, shapes, device, setup.out, key, world)
    else:
        feats = cached_features(model, loaders, device, setup.out / "features.safetensors", key, world)
    if feats is None:  # not the main process: its share is done
        return {}
    train_x, train_y, test_x, test_y = feats["train_x"], feats["train_y"], feats["test_x"], feats["test_y"]
    source = setup.init.path or ("raw pixels" if cfg.init == "pixels" else "random init")
    print(f"{cfg.protocol} probe of {setup.model_name} ({source}): {len(train_x)} train / {len(test_x)} test")

    if cfg.protocol == "knn":
        scores = knn_predict(train_x, train_y, test_x, cfg.knn_k, cfg.knn_temperature, classes, device)
    else:
        head = train_head(probe_head(cfg.protocol, train_x.shape[-1], classes), train_x, train_y, cfg, device)
        scores = predict(head, test_x, device)
    metrics = accuracy_metrics(scores, test_y)
    record = results_record(cfg, setup, cfg.protocol, metrics, len(train_x))
    write_results(setup.out, record)
    print(summary_line(record))
    return record
