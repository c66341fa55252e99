"""An image folder's index: scanned once, then read instead of opening every image; a changed
folder is scanned again; a read-only folder keeps its index in the cache folder."""

import PIL.Image
import pytest
from PIL import Image

import energyssl.data.index as index_module
from energyssl.data import load_dataset
from energyssl.data.index import INDEX_FILE


def folder(root, count=6):
    for name in ("a", "b"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("L", (28, 28), 30 * i).save(root / name / f"{i}.png")
    (root / "a" / "broken.png").write_text("not an image")
    return root


@pytest.fixture
def opened(monkeypatch):
    """Counts the images Pillow opens."""
    calls = []
    original = PIL.Image.open

    def counting(path, *args, **kwargs):
        calls.append(path)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting)
    return calls


def test_a_second_start_opens_no_image(tmp_path, opened, monkeypatch):
    monkeypatch.setenv("ENERGYSSL_CACHE", str(tmp_path / "cache"))
    root = folder(tmp_path / "data")
    first = load_dataset(str(root))
    assert len(opened) > 0 and (root / INDEX_FILE).is_file()
    opened.clear()
    second = load_dataset(str(root))
    assert opened == [] and second.samples == first.samples and second.skipped == 1
    assert second.info == first.info


def test_a_changed_folder_is_scanned_again(tmp_path, monkeypatch):
    monkeypatch.setenv("ENERGYSSL_CACHE", str(tmp_path / "cache"))
    root = folder(tmp_path / "data")
    before = len(load_dataset(str(root), train=True).samples) + len(load_dataset(str(root), train=False).samples)
    Image.new("L", (28, 28), 7).save(root / "b" / "new.png")
    (root / "a" / "broken.png").unlink()
    after = load_dataset(str(root), train=True), load_dataset(str(root), train=False)
    assert len(after[0].samples) + len(after[1].samples) == before + 1 and after[0].skipped == 0


def test_a_read_only_folder_keeps_its_index_in_the_cache(tmp_path, monkeypatch, opened):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ENERGYSSL_CACHE", str(cache))
    root = folder(tmp_path / "data")
    (root / INDEX_FILE).mkdir()  # the data folder refuses the file (as a read-only one would)
    load_dataset(str(root))
    assert len(list((cache / "index").glob("*.json"))) == 1
    opened.clear()
    load_dataset(str(root))
    assert opened == []


def test_the_parallel_scan_agrees_with_the_serial_one(tmp_path, monkeypatch):
    monkeypatch.setenv("ENERGYSSL_CACHE", str(tmp_path / "cache"))
    root = folder(tmp_path / "data")
    serial = load_dataset(str(root))
    monkeypatch.setattr(index_module, "PARALLEL_FROM", 1)
    monkeypatch.setenv("ENERGYSSL_RESCAN", "1")
    parallel = load_dataset(str(root))
    assert parallel.samples == serial.samples and parallel.skipped == serial.skipped == 1
