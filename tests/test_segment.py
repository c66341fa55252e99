"""``energyssl segment``: mIoU against counts made by hand, the data (ADE20K's label shift, the
generic folder, the embedded garment scenes, masks moving with their images), bad inputs, short
runs of both protocols on a ViT and a CNN (from scratch and from a pretraining export at another
image size), torchrun scoring as one process does, and an exact resume."""

import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from conftest import TORCHRUN
from energyssl.data import TransformedDataset
from energyssl.data.segmentation import (
    IGNORE,
    Paired,
    collate_masks,
    eval_transform,
    garment_canvases,
    load_segmentation,
    train_transform,
)
from energyssl.evaluation.backbone import build_classifier
from energyssl.evaluation.segment import LinearSegmenter, confusion_counts, segmentation_metrics
from test_eval_scale import ENV, cli, losses

RUN = ["segment", "--model", "essl_vit_micro_patch7", "--img-size", "28", "--label-fraction", "0.05"]
RUN += ["--epochs", "2", "--batch-size", "8", "--log-every", "1", "--no-tensorboard", "--seed", "1"]


def miou(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["metrics"]


class Fixed(nn.Module):
    """A 'model' whose logits are given: one-hot of ``predicted``."""

    def __init__(self, predicted: torch.Tensor, classes: int) -> None:
        super().__init__()
        self.logits = nn.functional.one_hot(predicted, classes).permute(0, 3, 1, 2).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(images)]


def test_miou_pixel_and_class_accuracy_match_counts_by_hand():
    truth = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, IGNORE]]])
    predicted = torch.tensor([[[0, 1, 1, 1], [0, 2, 0, 2]]])
    loader = [(torch.zeros(1, 1, 2, 4), [truth[0]])]
    counts = confusion_counts(Fixed(predicted, 3), loader, torch.device("cpu"), 3)  # type: ignore[arg-type]
    metrics = segmentation_metrics(counts, ("a", "b", "c"))
    # class a: truth 3 px, predicted 3, hit 2 -> 2/4; b: truth 2, predicted 3, hit 2 -> 2/3; c: truth 2, pred 1, hit 1
    # -> 1/2; the ignored pixel (predicted c) counts nowhere
    assert metrics["per_class_iou"] == {"a": 50.0, "b": pytest.approx(66.67), "c": 50.0}
    assert metrics["miou"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert metrics["pixel_acc"] == pytest.approx(100 * 5 / 7)
    assert metrics["macc"] == pytest.approx(100 * (2 / 3 + 1 + 1 / 2) / 3)


def test_a_class_absent_from_truth_and_prediction_is_left_out_of_the_mean():
    counts = torch.zeros(9, dtype=torch.float64)
    counts[0], counts[4] = 5, 5  # a and b always right, c never seen
    metrics = segmentation_metrics(counts, ("a", "b", "c"))
    assert metrics["miou"] == 100.0 and metrics["per_class_iou"]["c"] is None


def test_predictions_are_scored_at_each_masks_own_size():
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0, :, 0], logits[0, 1, :, 1] = 1.0, 1.0  # left half class 0, right half class 1
    mask = torch.zeros(4, 4, dtype=torch.int64)
    mask[:, 2:] = 1

    class Half(nn.Module):
        def forward(self, images):
            return logits

    counts = confusion_counts(Half(), [(torch.zeros(1, 1, 2, 2), [mask])], torch.device("cpu"), 2)  # type: ignore[arg-type]
    assert counts.sum() == 16 and segmentation_metrics(counts, ("l", "r"))["miou"] == 100.0


def write_pair(images: Path, masks: Path, stem: str, labels: np.ndarray, size: tuple[int, int] | None = None) -> None:
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    height, width = size or labels.shape
    Image.fromarray(np.full((height, width), 90, np.uint8)).save(images / f"{stem}.jpg")
    Image.fromarray(labels.astype(np.uint8)).save(masks / f"{stem}.png")


def test_ade20k_ignores_label_zero_and_shifts_the_rest_down(tmp_path):
    labels, root = np.array([[0, 1], [2, 150]]), tmp_path
    for split in ("training", "validation"):
        write_pair(root / "images" / split, root / "annotations" / split, "ADE_1", labels)
    data = load_segmentation(str(root), train=True)
    _, mask = data[0]
    assert data.num_classes == 150 and mask.tolist() == [[IGNORE, 0], [1, 149]]
    assert "validation" in load_segmentation(str(root), train=False).split


def test_a_generic_folder_reads_label_zero_as_a_class_and_counts_classes(tmp_path):
    for i in range(10):
        write_pair(tmp_path / "images", tmp_path / "masks", f"x{i}", np.array([[0, 1], [3, IGNORE]]))
    train, test = load_segmentation(str(tmp_path), True), load_segmentation(str(tmp_path), False)
    assert train.num_classes == 4 and len(train) == 9 and len(test) == 1
    assert train[0][1].tolist() == [[0, 1], [3, IGNORE]]
    assert {p for p, _ in train.pairs}.isdisjoint(p for p, _ in test.pairs)


def test_the_embedded_scenes_are_garments_on_background_and_fixed():
    scenes = garment_canvases(train=False)
    again = garment_canvases(train=False)
    assert np.array_equal(scenes.images, again.images) and np.array_equal(scenes.masks, again.masks)
    assert scenes.num_classes == 11 and scenes.classes[0] == "background" and scenes.images.shape[1:] == (56, 56)
    assert (scenes.masks[scenes.images == 0] == 0).all()  # black is background
    assert (scenes.images[scenes.masks > 0] > 25).all()  # a garment's pixels are its own
    assert len(np.unique(scenes.masks)) == 11


def test_the_mask_moves_with_its_image_through_scale_crop_and_flip():
    scenes = garment_canvases(train=False)
    info = scenes.info
    augment = Paired(train_transform(info, 28, (0.5, 2.0)))
    torch.manual_seed(0)
    for index in range(8):
        image, mask = scenes[index]
        pixels, labels = augment(image, mask)
        assert pixels.shape == (1, 28, 28) and labels.shape == (28, 28) and labels.dtype == torch.int64
        raw = pixels[0] * info.std[0] + info.mean[0]
        labelled = (labels != IGNORE) & (labels > 0)
        assert (raw[labels == IGNORE].abs() < 1e-6).all()  # padding: black image, ignored mask
        assert raw[labelled].mean() > raw[labels == 0].mean() + 0.2  # garments stay where their labels went


@pytest.mark.parametrize("protocol", ["linear", "upernet"])
@pytest.mark.parametrize("model", ["essl_vit_micro_patch7", "essl_resnet_tiny"])
def test_five_steps_of_each_protocol_score_every_class(tmp_path, protocol, model):
    args = [*RUN, "--model", model, "--protocol", protocol, "--max-steps", "5", "--out", str(tmp_path)]
    done = cli(*args)
    assert done.returncode == 0, done.stderr[-1500:]
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["protocol"] == f"segment-{protocol}" and record["model"] == model
    metrics = record["metrics"]
    assert 0 < metrics["miou"] < 100 and 0 < metrics["pixel_acc"] < 100
    assert len(metrics["per_class_iou"]) == 11 and "background" in metrics["per_class_iou"]
    assert record["config"]["protocol"] == protocol and len(losses(tmp_path)) == 5
    table = cli("report", str(tmp_path)).stdout  # energyssl report lists it, mIoU where top-1 would be
    assert f"| segment-{protocol} | {model} |" in table and f"| {metrics['miou']:.2f} |" in table


def test_a_pretrained_vit_segments_at_another_image_size(tmp_path):
    pre = tmp_path / "pre"
    args = ["pretrain", "--model", "essl_vit_micro_patch7", "--max-steps", "2", "--batch-size", "8"]
    assert cli(*args, "--no-tensorboard", "--out", str(pre)).returncode == 0
    for protocol in ("linear", "upernet"):
        out = tmp_path / protocol
        done = cli(*RUN, "--img-size", "56", "--init", str(pre), "--protocol", protocol, "--max-steps", "2",
                   "--out", str(out))  # fmt: skip
        assert done.returncode == 0, done.stderr[-1500:]
        assert json.loads((out / "results.json").read_text())["loaded_tensors"] > 0
    classifier, _, _ = build_classifier(str(pre), None, 11, 1, 56, any_size=True)
    saved = load_file(str(pre / "backbone.safetensors"))["pos_embed"]
    assert saved.shape[1] == 1 + 16 and classifier.pos_embed.shape[1] == 1 + 64  # 4x4 grid -> 8x8
    assert torch.equal(classifier.pos_embed[0, 0], saved[0, 0])  # the class token's position is kept


def test_two_processes_score_as_one_process_scores_their_weights(tmp_path):
    out = tmp_path / "ddp"
    cmd = [*TORCHRUN, "-m", "energyssl", *RUN, "--max-steps", "4", "--save-every", "4", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("segment-linear | ") == 1 and "2 process(es)" in done.stdout
    checkpoint = out / (out / "latest").read_text().strip()
    classifier, _, _ = build_classifier("none", "essl_vit_micro_patch7", 11, 1, 28)
    model = LinearSegmenter(classifier, 11)
    model.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    info = load_segmentation("embedded", True).info
    scored = TransformedDataset(load_segmentation("embedded", False), Paired(eval_transform(info, 28), False), True)
    loader = DataLoader(scored, batch_size=64, collate_fn=collate_masks)
    counts = confusion_counts(model, loader, torch.device("cpu"), 11)
    assert miou(out)["miou"] == pytest.approx(segmentation_metrics(counts, garment_canvases(False).classes)["miou"])


def test_a_killed_segmentation_resumes_exactly(tmp_path):
    whole, out = tmp_path / "whole", tmp_path / "run"
    assert cli(*RUN, "--out", str(whole)).returncode == 0
    killed = cli(*RUN, "--save-every", "3", "--out", str(out), signal_at=("SIGKILL", 11))  # epoch 1 (8 steps each)
    assert killed.returncode == -signal.SIGKILL
    resumed = cli(*RUN, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-1500:]
    assert "at step 9 (epoch 1)" in resumed.stdout
    assert losses(out) == losses(whole) and miou(out) == miou(whole)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("size", "is 4x4, its image 5x5"),
        ("label", "has label 7, above the 4 classes"),
        ("orphan", "without a mask"),
        ("empty", "no images in"),
        ("layout", "is not a segmentation folder"),
    ],
)
def test_bad_segmentation_data_is_one_error_line(tmp_path, damage, message):
    root = tmp_path / "data"
    for i in range(6):
        write_pair(root / "images", root / "masks", f"x{i}", np.array([[0, 1], [2, 3]]))
    if damage == "size":
        write_pair(root / "images", root / "masks", "x0", np.zeros((4, 4)), size=(5, 5))
    elif damage == "label":  # in every mask: whichever the run reads first
        for i in range(6):
            write_pair(root / "images", root / "masks", f"x{i}", np.full((2, 2), 7))
    elif damage == "orphan":
        (root / "masks" / "x0.png").unlink()
    elif damage == "empty":
        for file in (root / "images").iterdir():
            file.unlink()
    else:
        (root / "masks").rename(root / "labels")
    args = ["--data", str(root), "--img-size", "28", "--max-steps", "1", "--out", str(tmp_path / "out")]
    extra = ["--num-classes", "4"] if damage == "label" else []
    done = cli("segment", "--model", "essl_vit_micro_patch7", *args, *extra, "--label-fraction", "1", "--val-size", "0")
    assert done.returncode == 2, done.stderr[-800:]
    lines = done.stderr.strip().splitlines()  # a mask read mid-run stops it under the progress bar
    assert [line for line in lines if "error" in line] == lines[-1:] and lines[-1].startswith("error: ")
    assert message in lines[-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--protocol", "fcn"], "unknown protocol 'fcn'"),
        (["--init", "pixels"], "segment needs a network"),
        (["--drop-path", "0.1"], "apply to --protocol upernet only"),
        (["--scale-range", "2", "1"], "scale_range must be two numbers"),
        (["--data", "embedded", "--num-classes", "5"], "the embedded set has 11 classes"),
    ],
)
def test_options_that_do_not_apply_are_refused(tmp_path, args, message):
    done = cli("segment", *args, "--max-steps", "1", "--out", str(tmp_path))
    assert done.returncode == 2 and message in done.stderr, done.stderr[-800:]
