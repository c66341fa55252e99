"""The bad-input matrix: messy folders train with the bad files skipped and counted; bad
arguments and files give one `error:` line and exit status 2, never a traceback."""

import io

import pytest
from PIL import Image

from energyssl.cli import main
from energyssl.data import load_dataset

RUN = ["--model", "essl_vit_micro_patch7", "--batch-size", "4", "--img-size", "28", "--no-tensorboard"]


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """Two classes of good images, an empty class folder, and every kind of awkward file."""
    root = tmp_path_factory.mktemp("messy")
    a, b = root / "a", root / "b"
    for folder in (a, b, root / "empty"):
        folder.mkdir()
    for i in range(10):
        Image.new("RGB", (32, 32), (20 * i, 100, 50)).save(a / f"good{i}.png")
        Image.new("RGB", (32, 32), (50, 20 * i, 100)).save(b / f"good{i}.png")
    (a / "zero-bytes.png").write_bytes(b"")
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(jpeg, "JPEG")
    (a / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (a / "text.png").write_text("not an image")
    Image.new("1", (20000, 20000)).save(a / "huge.png")  # beyond Pillow's decompression-bomb limit
    Image.new("CMYK", (32, 32), (1, 2, 3, 4)).save(a / "cmyk.jpg")
    Image.new("I;16", (32, 32), 3000).save(a / "sixteen-bit.png")
    Image.new("RGBA", (32, 32), (1, 2, 3, 100)).save(a / "alpha.png")
    frames = [Image.new("P", (32, 32), i) for i in range(3)]
    frames[0].save(a / "animated.gif", save_all=True, append_images=frames[1:])
    return root


def test_a_messy_folder_skips_what_it_cannot_read_and_converts_the_rest(messy, tmp_path, capsys):
    data = load_dataset(str(messy))
    assert data.skipped == 4 and data.classes == ["a", "b"]  # zero bytes, truncated, text, huge; empty class
    odd = [i for i, (path, _) in enumerate(data.samples) if not path.name.startswith("good")]
    assert len(odd) == 4 and all(data[i][0].mode == "RGB" and data[i][0].size == (32, 32) for i in odd)
    assert main(["pretrain", "--data", str(messy), *RUN, "--max-steps", "2", "--out", str(tmp_path / "run")]) == 0
    assert "skipped 4 unreadable image(s)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    (root / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    import torch
    from safetensors.torch import save_file

    save_file({"something.else": torch.zeros(3)}, str(root / "foreign.safetensors"))
    (root / "norun").mkdir()
    return root


@pytest.mark.parametrize(
    "args,message",
    [
        (["pretrain", "--set", "corruption.grid_mask.ratio=1.5"], "ratio must be in [0, 1]"),
        (["pretrain", "--set", "corruption.block_mask.count=0"], "count must be >= 1"),
        (["pretrain", "--set", "corruption.grid_mask.cell=0"], "cell must be >= 1"),
        (["pretrain", "--task", "denoise", "--set", "corruption.denoise.gamma=[0.5, 2]"], "gamma must be"),
        (["pretrain", "--task", "sorting", "--set", "corruption.sorting.token_drop=1"], "token_drop must be in"),
        (["pretrain", "--resume", "{files}/norun"], "no checkpoint found"),
        (["finetune", "--init", "{files}/corrupt.safetensors"], "cannot read checkpoint"),
        (["finetune", "--init", "{files}/foreign.safetensors"], "holds no backbone weights"),
        (["probe", "--init", "{files}/missing.safetensors"], "no such file or folder"),
        (["finetune", "--label-fraction", "0"], "label fraction must be in (0, 1]"),
        (["probe", "--val-fraction", "1"], "val_fraction must be in (0, 1), got 1.0"),
    ],
)
def test_bad_arguments_and_files_are_one_line(bad_files, tmp_path, capsys, args, message):
    args = [a.replace("{files}", str(bad_files)) for a in args]
    assert main([*args, *RUN, "--max-steps", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_file_without_read_permission_is_skipped(messy, monkeypatch):
    """Tests run as root, who reads any file: the refusal is simulated where Pillow opens it
    (which the folder's listing cannot see, so the saved index is set aside)."""
    import PIL.Image

    monkeypatch.setenv("ENERGYSSL_RESCAN", "1")

    locked = messy / "a" / "good0.png"
    original = PIL.Image.open

    def open_unless_locked(path, *args, **kwargs):
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", open_unless_locked)
    data = load_dataset(str(messy))
    assert data.skipped == 5 and locked not in [path for path, _ in data.samples]
