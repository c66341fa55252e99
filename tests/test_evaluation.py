"""Fine-tuning, probes and reports on the embedded data with a one-block ViT."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from energyssl.checkpoint import BACKBONE, find_checkpoint
from energyssl.cli import main
from energyssl.evaluation.backbone import build_classifier
from energyssl.evaluation.probe import knn_predict
from energyssl.evaluation.results import balanced_subset
from energyssl.metrics import read_metrics

MICRO = ["--model", "essl_vit_micro_patch7", "--no-tensorboard"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    args = ["pretrain", *MICRO, "--out", str(out), "--max-steps", "20", "--batch-size", "32", "--task", "grid_mask"]
    assert main(args) == 0
    return out


def _results(out):
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("protocol", ["linear", "mlp", "knn", "attentive"])
def test_probes_beat_chance(pretrained, tmp_path, protocol):
    out = tmp_path / protocol
    assert main(["probe", "--protocol", protocol, "--init", str(pretrained), "--out", str(out), "--epochs", "20"]) == 0
    r = _results(out)
    assert r["metrics"]["top1"] > 30.0, r["metrics"]
    assert r["protocol"] == protocol and r["checkpoint"].endswith(BACKBONE) and len(r["checkpoint_sha256"]) == 64
    assert r["labeled_images"] == 3600  # the training labels minus the validation tenth


def test_raw_pixels_are_a_probe_floor_and_not_a_fine_tuning_init(tmp_path, capsys):
    assert main(["probe", "--protocol", "knn", "--init", "pixels", "--out", str(tmp_path / "knn")]) == 0
    r = _results(tmp_path / "knn")
    assert r["model"] == "pixels" and r["metrics"]["top1"] > 60.0  # kNN on Fashion-MNIST pixels is strong
    features = load_file(tmp_path / "knn" / "features.safetensors")
    assert features["train_x"].shape == (3600, 28 * 28)
    assert main(["finetune", "--init", "pixels", "--out", str(tmp_path / "ft")]) == 2
    assert "--init pixels is for probes" in capsys.readouterr().err


def test_probe_features_are_cached(pretrained, tmp_path, capsys):
    out = tmp_path / "knn"
    args = ["probe", "--protocol", "knn", "--init", str(pretrained), "--out", str(out)]
    assert main(args) == 0
    cache = out / "features.safetensors"
    stamp = cache.stat().st_mtime_ns
    assert main(args) == 0
    assert cache.stat().st_mtime_ns == stamp
    assert _results(out)["metrics"]["top1"] > 30.0


def test_finetune_from_pretrained_and_from_scratch(pretrained, tmp_path):
    common = [
        "--epochs",
        "6",
        "--warmup-epochs",
        "0.5",
        "--label-fraction",
        "0.25",
        "--mixup",
        "0",
        "--cutmix",
        "0",
        "--randaug",
        "",
        *MICRO,
    ]
    for init in (str(pretrained), "none"):
        out = tmp_path / ("pre" if init != "none" else "scratch")
        every, split = (4, "test") if init == "none" else (1, "val")
        flags = ["--blr", "1e-2", "--eval-every", str(every), "--eval-split", split]
        assert main(["finetune", "--init", init, "--out", str(out), *common, *flags]) == 0
        evaluated = [row["epoch"] for row in read_metrics(out / "metrics.jsonl") if f"{split}_top1" in row]
        assert evaluated == ([3, 5] if every == 4 else list(range(6)))  # every N epochs, and the last
        r = _results(out)
        assert r["metrics"]["top1"] > 18.0 and "top5" in r["metrics"]  # 10 classes: chance is 10
        if split == "val":  # the epoch to keep is chosen on validation, never on test
            assert r["metrics"]["top1_best"] >= r["metrics"]["top1"] and 0 <= r["metrics"]["best_epoch"] < 6
        else:
            assert "top1_best" not in r["metrics"]
        assert r["labeled_images"] == 1000 and r["eval_split"].startswith(split)
    assert _results(tmp_path / "pre")["loaded_tensors"] > 0 and _results(tmp_path / "scratch")["checkpoint"] is None


def test_pretrained_weights_are_loaded_whole(pretrained):
    model, name, init = build_classifier(str(pretrained), None, 10, 1, 28)
    saved = load_file(pretrained / BACKBONE)
    assert name == "essl_vit_micro_patch7" and init.loaded_tensors == len(saved)
    own = model.state_dict()
    for key, value in saved.items():
        torch.testing.assert_close(own[key], value)
    assert model.get_classifier().out_features == 10
    # the energy-model checkpoint works as well, without its head and alpha
    from_ckpt, _, init = build_classifier(str(find_checkpoint(pretrained)), None, 10, 1, 28)
    assert init.path.endswith("model.safetensors") and init.loaded_tensors == len(saved)
    torch.testing.assert_close(from_ckpt.patch_embed.proj.weight, own["patch_embed.proj.weight"])


def test_mismatched_checkpoints_are_named(pretrained, tmp_path, capsys):
    saved = load_file(pretrained / BACKBONE)
    meta = {
        "model": "essl_vit_micro_patch7",
        "model_kwargs": json.dumps({"in_chans": 1, "img_size": 28}),
        "format": "timm",
    }
    partial = {k: v for k, v in saved.items() if k != "blocks.0.attn.qkv.weight"}
    save_file(partial, tmp_path / "partial.safetensors", metadata=meta)
    assert main(["probe", "--init", str(tmp_path / "partial.safetensors"), "--out", str(tmp_path / "a")]) == 2
    assert "missing 1 tensor(s) e.g. ['blocks.0.attn.qkv.weight']" in capsys.readouterr().err
    assert main(["probe", "--init", str(pretrained), "--model", "essl_resnet_tiny", "--out", str(tmp_path / "b")]) == 2
    assert "is a essl_vit_micro_patch7, but --model is essl_resnet_tiny" in capsys.readouterr().err
    other = dict(meta, model="essl_vit_mini_patch7")
    save_file(saved, tmp_path / "other.safetensors", metadata=other)
    assert main(["probe", "--init", str(tmp_path / "other.safetensors"), "--out", str(tmp_path / "c")]) == 2
    assert "shape mismatch" in capsys.readouterr().err


def test_labeled_subset_is_balanced_and_reproducible():
    labels = np.repeat(np.arange(10), [100, 200, 50, 100, 100, 100, 100, 100, 100, 150])
    a, b = balanced_subset(labels, 0.1, seed=3), balanced_subset(labels, 0.1, seed=3)
    assert np.array_equal(a, b)
    assert np.bincount(labels[a]).tolist() == [10, 20, 5, 10, 10, 10, 10, 10, 10, 15]
    assert not np.array_equal(a, balanced_subset(labels, 0.1, seed=4))
    assert np.bincount(labels[balanced_subset(labels, 0.001, seed=0)]).tolist() == [1] * 10


@pytest.mark.parametrize("fraction", [0.01, 0.1, 1.0])
def test_no_validation_or_test_image_is_ever_trained_on(tmp_path, fraction):
    from energyssl.config import FinetuneConfig
    from energyssl.evaluation.prepare import load_eval_data

    test_images = load_eval_data(FinetuneConfig(eval_split="test"), tmp_path).scored
    subsets, vals = [], []
    for seed in (0, 1, 2):
        data = load_eval_data(FinetuneConfig(label_fraction=fraction, seed=seed, eval_split="val"), tmp_path)
        assert not set(data.subset) & set(data.val)  # chosen-on images are never learnt from
        assert [data.scored.indices, data.train.indices] == [data.val.tolist(), data.subset.tolist()]
        assert data.scored.dataset is data.train.dataset is not test_images  # val comes from the training split
        subsets.append(data.subset)
        vals.append(data.val)
    labels = data.train.dataset.labels
    assert all(np.array_equal(v, vals[0]) for v in vals)  # one validation split whatever the seed
    assert np.bincount(labels[vals[0]]).tolist() == [40] * 10  # 10% of each of 10 classes of 400
    assert len(subsets[0]) == round(fraction * 4000) - (400 if fraction == 1 else 0)
    assert fraction == 1 or not np.array_equal(subsets[0], subsets[1])


def test_knn_votes_follow_the_nearest_neighbours():
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    train_y = torch.tensor([0, 0, 1])
    scores = knn_predict(train_x, train_y, torch.tensor([[1.0, 0.05], [0.1, 1.0]]), k=1, temperature=0.1, classes=2)
    assert scores.argmax(1).tolist() == [0, 1]


def test_report_gathers_results(pretrained, tmp_path, capsys):
    for protocol in ("knn", "linear"):
        assert (
            main(["probe", "--protocol", protocol, "--init", str(pretrained), "--out", str(tmp_path / protocol)]) == 0
        )
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "table.md")]) == 0
    table = (tmp_path / "table.md").read_text()
    assert table.count("| essl_vit_micro_patch7 |") == 2 and "| knn |" in table and "| linear |" in table
    assert "skipped" in capsys.readouterr().err and "broken" not in table
    assert main(["report", str(tmp_path / "nothing-here")]) == 2


def test_evaluation_on_a_folder_without_splits_uses_the_held_out_tenth(tmp_path, capsys):
    data = tmp_path / "data"
    for cls in ("a", "b"):
        (data / cls).mkdir(parents=True)
        for i in range(10):
            Image.new("L", (28, 28), 20 * i + (100 if cls == "b" else 0)).save(data / cls / f"{i}.png")
    args = ["finetune", "--data", str(data), "--model", "essl_vit_micro_patch7", "--epochs", "1", "--batch-size", "4"]
    assert main([*args, "--no-tensorboard", "--out", str(tmp_path / "ft")]) == 0
    record = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert record["labeled_images"] == 16 and "a fixed 10% of each class" in record["eval_split"]
    assert "scored on a fixed 10% of each class" in capsys.readouterr().out


def test_finetune_accumulating_two_micro_batches_matches_one_batch_twice_as_large(tmp_path):
    """No mixup, cutmix, RandAugment or drop path (and no BatchNorm in the ViT): batch 8 x 2
    trains as batch 16, the same losses to float rounding, the same lr and accuracy."""
    args = ["finetune", "--model", "essl_vit_micro_patch7", "--label-fraction", "0.05", "--epochs", "1"]
    args += ["--mixup", "0", "--cutmix", "0", "--randaug", "", "--drop-path", "0", "--log-every", "1"]
    args += ["--no-tensorboard"]
    assert main([*args, "--batch-size", "16", "--out", str(tmp_path / "big")]) == 0
    assert main([*args, "--batch-size", "8", "--accum-iter", "2", "--out", str(tmp_path / "accum")]) == 0
    big, accum = ([r for r in read_metrics(tmp_path / n / "metrics.jsonl") if "loss" in r] for n in ("big", "accum"))
    assert len(accum) == len(big) > 5 and [r["lr"] for r in accum] == [r["lr"] for r in big]
    assert [r["loss"] for r in accum] == pytest.approx([r["loss"] for r in big], rel=1e-4)
    top1 = [json.loads((tmp_path / n / "results.json").read_text())["metrics"]["top1"] for n in ("big", "accum")]
    assert top1[0] == pytest.approx(top1[1], abs=0.2)


def test_knn_in_chunks_scores_as_in_one():
    """The chunk bounds memory (one chunk's similarities at a time) and changes no score."""
    generator = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(50, 8, generator=generator), torch.randn(23, 8, generator=generator)
    train_y = torch.randint(0, 4, (50,), generator=generator)
    whole = knn_predict(train_x, train_y, test_x, k=5, temperature=0.1, classes=4)
    assert torch.allclose(knn_predict(train_x, train_y, test_x, 5, 0.1, 4, chunk=4), whole)
    assert whole.shape == (23, 4) and (whole.sum(1) > 0).all()
