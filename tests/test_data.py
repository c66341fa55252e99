import gzip
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from energyssl.data import eval_transform, load_dataset, load_held_out, pretrain_transform
from energyssl.errors import UserError


def test_embedded_subset_is_balanced_fashion_mnist():
    train, test = load_dataset("embedded"), load_dataset("embedded", train=False)
    assert (len(train), len(test)) == (4000, 1000)
    assert np.bincount(train.labels).tolist() == [400] * 10
    image, label = train[0]
    assert image.size == (28, 28) and image.mode == "L" and 0 <= label < 10
    assert train.info.in_chans == 1 and 0.2 < train.info.mean[0] < 0.4


def test_image_folder_with_classes_skips_unreadable_files(tmp_path, capsys):
    for cls, colour in (("cat", 10), ("dog", 200)):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.new("RGB", (20, 16), (colour, i, 0)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not an image")
    ds = load_dataset(str(tmp_path))
    assert len(ds) == 18 and ds.skipped == 1 and ds.classes == ["cat", "dog"]
    assert "skipped 1 unreadable" in capsys.readouterr().out
    image, label = ds[17]
    assert label == 1 and image.mode == "RGB"
    assert ds.info.in_chans == 3


def test_a_folder_without_splits_keeps_a_fixed_tenth_of_each_class_apart(tmp_path):
    for cls in ("a", "b", "c"):
        (tmp_path / cls).mkdir()
        for i in range(20):
            Image.new("L", (8, 8), i).save(tmp_path / cls / f"{i}.png")
    train, test = load_dataset(str(tmp_path)), load_dataset(str(tmp_path), train=False)
    assert (len(train), len(test)) == (54, 6)
    assert sorted(label for _, label in test.samples) == [0, 0, 1, 1, 2, 2]
    assert not {path for path, _ in train.samples} & {path for path, _ in test.samples}
    assert test.samples == load_dataset(str(tmp_path), train=False).samples  # the same every time
    assert [p for p, _ in load_held_out(str(tmp_path)).samples] == [p for p, _ in test.samples]
    assert "a fixed 10% of each class" in test.split
    assert len(load_dataset(str(tmp_path), train=False, val_fraction=0.25)) == 15


def test_flat_unlabeled_folder(tmp_path):
    for i in range(4):
        Image.new("L", (30, 30), i * 40).save(tmp_path / f"{i}.jpg")
    ds = load_dataset(str(tmp_path))
    assert len(ds) == 3 and ds[0][1] == -1 and ds.info.in_chans == 1


def test_missing_and_empty_data_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_dataset(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no readable images"):
        load_dataset(str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        load_dataset(f"cifar10:{tmp_path}")


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_fashion_mnist_idx_files_from_a_user_folder(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 9], dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    ds = load_dataset(f"fashion-mnist:{tmp_path}", train=False)
    assert len(ds) == 5 and ds[4][1] == 9
    assert np.array_equal(np.asarray(ds[2][0]), images[2])


def test_cifar10_python_format(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batch = {b"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    ds = load_dataset(f"cifar10:{tmp_path}", train=False)
    image, label = ds[1]
    assert image.size == (32, 32) and image.mode == "RGB" and label == 1
    assert np.array_equal(np.asarray(image)[..., 0], batch[b"data"][1, :1024].reshape(32, 32))


def test_transforms_give_normalised_tensors_of_the_requested_size():
    ds = load_dataset("embedded")
    torch.manual_seed(0)
    x = pretrain_transform(ds.info, 24)(ds[0][0])
    assert x.shape == (1, 24, 24)
    y = eval_transform(ds.info, 28)(ds[0][0])
    assert y.shape == (1, 28, 28)
    batch = torch.stack([eval_transform(ds.info, 28)(ds[i][0]) for i in range(200)])
    assert abs(batch.mean().item()) < 0.15 and abs(batch.std().item() - 1) < 0.15


def test_image_folder_splits_and_a_missing_test_split(tmp_path):
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("L", (8, 8), 0).save(tmp_path / split / cls / "0.png")
    assert load_dataset(str(tmp_path), train=True).classes == ["cat", "dog"]
    assert load_dataset(str(tmp_path), train=False).samples[0][0].parent.parent == tmp_path / "val"
    (tmp_path / "val").rename(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="no test/ or val/ split"):
        load_dataset(str(tmp_path), train=False)
    assert load_held_out(str(tmp_path)).classes == ["cat", "dog"]  # falls back to train/, not to the root


def test_cifar_files_that_are_not_pickles_are_one_clear_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"these are not pickled batches")
    with pytest.raises(UserError, match="is not a CIFAR-10 batch file"):
        load_dataset(f"cifar10:{tmp_path}")


def test_a_named_fashion_mnist_folder_that_is_missing_is_an_error(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        load_dataset(f"fashion-mnist:{tmp_path / 'missing'}")
