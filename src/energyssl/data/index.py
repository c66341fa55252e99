"""An image folder's index: which of its images are readable, and the image mode and size of the
first, scanned once (in parallel) and kept where the data is, or in a cache folder when that is
read-only. It is keyed by the folder's listing (names, sizes, modification times), so that files
added, removed or rewritten are scanned again. Under torchrun one process per machine scans and
the others wait for its index, instead of every rank opening every file at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

INDEX_FILE = ".energyssl-index.json"
RESCAN = "ENERGYSSL_RESCAN"  # set to 1: ignore saved indexes (files changed in a way the listing misses)
WAIT_SECONDS = 1800.0  # how long a process waits for another's scan before scanning itself
PARALLEL_FROM = 512  # files below which one process scans (starting workers costs more)


@dataclass
class FolderIndex:
    readable: list[bool]  # per file, in the order given
    mode: str  # "L" or "RGB": what the first readable image converts to
    size: int  # the first readable image's shorter side


def cache_folder() -> Path:
    return Path(os.environ.get("ENERGYSSL_CACHE", "~/.cache/energyssl")).expanduser() / "index"


def listing_key(root: Path, files: list[Path]) -> str:
    """What the index is valid for: every file's name, size and modification time, in order."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def index_files(root: Path) -> list[Path]:
    """Where the index of ``root`` may be kept: in the folder, else in the cache folder."""
    name = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:32] + ".json"
    return [root / INDEX_FILE, cache_folder() / name]


def readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError):
        return False  # not an image, truncated, or so large that decoding it could exhaust memory


def first_image(path: Path) -> tuple[str, int]:
    with Image.open(path) as img:
        return ("L" if img.mode in ("L", "1", "I;16", "I") else "RGB"), min(img.size)


def scan(files: list[Path]) -> list[bool]:
    """Verify every file, in several processes for a large folder."""
    if len(files) < PARALLEL_FROM:
        return [readable(path) for path in files]
    workers = min(8, os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(readable, files, chunksize=max(1, len(files) // (16 * workers))))


def _load(file: Path, key: str) -> FolderIndex | None:
    try:
        saved = json.loads(file.read_text())
        return FolderIndex(**saved["index"]) if saved.get("key") == key else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save(files: list[Path], key: str, index: FolderIndex) -> None:
    """Atomically, in the first place that takes it (a read-only data folder is skipped)."""
    text = json.dumps({"key": key, "index": asdict(index)})
    for file in files:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            temporary = file.with_name(f"{file.name}.{os.getpid()}.tmp")
            temporary.write_text(text)
            temporary.replace(file)
            return
        except OSError:
            continue


def index_folder(root: Path, files: list[Path]) -> FolderIndex | None:
    """The index of ``files`` under ``root``: a saved one whose key matches, else a scan (which
    is saved); None when no file is readable."""
    key, places = listing_key(root, files), index_files(root)
    rescan = os.environ.get(RESCAN) == "1"
    found = None if rescan else next((i for i in map(lambda f: _load(f, key), places) if i is not None), None)
    if found is None and not rescan and os.environ.get("LOCAL_RANK", "0") != "0":
        found = _wait_for(places, key)
    if found is not None:
        return found
    verdicts = scan(files)
    first = next((path for path, ok in zip(files, verdicts, strict=True) if ok), None)
    if first is None:
        return None
    index = FolderIndex(verdicts, *first_image(first))
    _save(places, key, index)
    return index


def _wait_for(places: list[Path], key: str) -> FolderIndex | None:
    """Another process of this machine (local rank 0) scans: wait for its index, a while."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        for file in places:
            if (index := _load(file, key)) is not None:
                return index
        time.sleep(1.0)
    return None
