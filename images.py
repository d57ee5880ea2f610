"""Image files as training reads them: decoding rules, training sizes, masks, and the stat index of what is known
about each file.

Decoding (_decode, for targets, controls and masks): EXIF orientation first (every size check sees the upright
image), 16-bit grayscale scaled to 8 bits, transparency composited on DataConfig.background (masks: on black).
Masks (white = edit region, any bit depth) are thresholded at 0.5 (mask_latent, for training and sample.py --mask).
Training sizes (target_size): the image's own (or DataConfig.resize; with bucket kontext the Kontext resolution
nearest in aspect), shrunk to max_pixels, floored to 16.

Start-up: hashing and decoding every image costs ~37 ms per 1024^2 pair, so a stat index in the cache folder
(stat-index-<dataset>.json) remembers, per image file, its content hash and decoded size under its (size, mtime_ns,
ctime_ns, inode); a warm start stats the files and re-reads only those whose stat changed. scan_dataset +
validate_dataset + cache_paths, 2 shared CPU cores: 2000 pairs of 64x64 PNGs 1.3 s cold, 0.3 s warm; 2000 of 256x256
6.5 s / 0.3 s; 100 of 1024x1024 3.8 s (38 ms a pair) / 0.01 s. What is left warm is scan_dataset (listing, captions).
data.py validates with the index; cache.py keys the cache by its hashes.
"""

import hashlib
import io
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from atomic import temp_beside
from config import DataConfig
from encode import kontext_size, preprocess_image

INDEX_VERSION = 2  # 2: "hw" is the upright (EXIF-transposed) size
# A file whose mtime/ctime is this recent when it is hashed is not remembered: a rewrite within the same timestamp
# tick (coarse kernel clocks, 2 s on FAT) would keep its stat, so its hash is only trusted once it is older (git's
# "racy" rule).
RACY_NS = 2_000_000_000


class DatasetError(ValueError):
    """Every problem found in a dataset, listed with file names."""


class DatasetWarning(UserWarning):
    """A dataset oddity that does not stop training (empty caption, unknown column, aspect change)."""


# ---------------------------------------------------------------- the stat index: what is known about each file


@dataclass
class StatIndex:
    """Per image file (absolute path): {"stat": [size, mtime_ns, ctime_ns, inode], "sha256": content hash, "hw":
    [height, width] once a full decode succeeded}. An entry whose stat no longer matches is dropped, so a changed
    file is re-hashed and re-decoded. `file` None: in memory only (nothing remembered between runs)."""

    file: Path | None = None
    files: dict = field(default_factory=dict)
    seen: set = field(default_factory=set)  # paths looked up this run: what write_index keeps
    changed: bool = False


def read_index(cache_dir: Path | None, cfg: DataConfig) -> StatIndex:
    """The dataset's stat index in cache_dir (one file per dataset path). A missing, unreadable or old-version index
    is an empty one: it only saves work, every fact in it is re-derived when absent."""
    if cache_dir is None:
        return StatIndex()
    file = Path(cache_dir) / f"stat-index-{hashlib.sha256(os.path.abspath(cfg.path).encode()).hexdigest()[:16]}.json"
    try:
        stored = json.loads(file.read_text())
        files = stored["files"] if stored.get("version") == INDEX_VERSION else {}
        files = {k: e for k, e in files.items() if isinstance(e, dict) and isinstance(e.get("stat"), list)}
    except (OSError, ValueError, KeyError, AttributeError):
        files = {}
    return StatIndex(file, files)


def write_index(idx: StatIndex) -> None:
    """Atomically (temp file + rename), keeping only the files looked up this run; a no-op when nothing changed."""
    if idx.file is None or not (idx.changed or idx.seen != set(idx.files)):
        return
    text = json.dumps({"version": INDEX_VERSION, "files": {k: v for k, v in idx.files.items() if k in idx.seen}})
    tmp = None
    try:
        idx.file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_beside(idx.file)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, idx.file)  # readers (other ranks, a second run) see the old index or the new, never half
    except OSError as e:  # a read-only cache still trains; only the next start is slower
        warnings.warn(f"could not write the stat index {idx.file} ({e}); the next start re-hashes every image")
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    idx.changed = False


def _entry(idx: StatIndex, path: Path) -> dict:
    """The index entry of path, emptied if the file's stat changed (the returned dict is updated in place)."""
    name = os.path.abspath(path)
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise DatasetError(f"image file {str(path)!r} does not exist") from None
    # ctime and inode as well as size and mtime: a file replaced by rename, or whose mtime was set back (touch -d,
    # rsync -t), still reads as changed.
    stat = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    idx.seen.add(name)
    entry = idx.files.get(name)
    if entry is None or entry.get("stat") != stat:
        entry = {"stat": stat}
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) >= RACY_NS:
            idx.files[name], idx.changed = entry, True
        else:  # too fresh to trust its stat next time: used for this run only
            idx.files.pop(name, None)
    return entry


def file_digest(path: Path | None, idx: StatIndex) -> str:
    """sha256 of the file's bytes, read only when the index does not know the file under its current stat."""
    if path is None:
        return "-"
    entry = _entry(idx, path)
    if "sha256" not in entry:
        entry["sha256"], idx.changed = hashlib.sha256(Path(path).read_bytes()).hexdigest(), True
    return entry["sha256"]


# ---------------------------------------------------------------- decoding, sizes, masks


WHITE, BLACK = (255, 255, 255), (0, 0, 0)
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PNG's 16-bit grayscale opens as I;16 (I: 32-bit ints)


def _decode(data: bytes, path: Path, mode: str, background: tuple[int, int, int] = WHITE):
    """Fully decode (a truncated file fails here, not mid-training), in this order: EXIF orientation applied (what
    a viewer shows; the sizes validate_dataset checks are these), 16-bit grayscale scaled to 8 bits (Pillow's
    convert clips it: everything above 255 turns white), transparency composited on `background` (else convert
    keeps the hidden RGB under alpha 0), then `mode`."""
    import numpy as np
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            if im.mode in SIXTEEN_BIT:
                # 65535 / 257 = 255: the full 16-bit range onto the full 8-bit range
                a = np.asarray(im).astype(np.float32) / 257
                im = Image.fromarray(a.round().clip(0, 255).astype(np.uint8))
            if im.has_transparency_data:
                im = Image.alpha_composite(Image.new("RGBA", im.size, (*background, 255)), im.convert("RGBA"))
            return im.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: unreadable or corrupt image ({e})") from None


def open_image(path: Path, mode: str = "RGB", background: tuple[int, int, int] = WHITE):
    """Fully decode an image: upright (EXIF), 8-bit, transparency on `background` (DataConfig.background)."""
    if not Path(path).is_file():
        raise DatasetError(f"image file {str(path)!r} does not exist")
    return _decode(Path(path).read_bytes(), path, mode, background)


def _checked_size(path: Path, mode: str, idx: StatIndex) -> tuple[int, int]:
    """(height, width), upright, of a file that decodes fully: decoded (and hashed, from the same read) unless the
    index already knows it under its current stat."""
    return tuple(_checked(path, mode, idx)["hw"])


def _checked(path: Path, mode: str, idx: StatIndex) -> dict:
    """_checked_size's index entry: "hw" and, for a mask (mode "L", on black), "grey": its number of pixels neither
    black nor white (validate_dataset warns about them)."""
    entry = _entry(idx, path)
    if "hw" not in entry or (mode == "L" and "grey" not in entry):
        data = Path(path).read_bytes()
        im = _decode(data, path, mode, BLACK if mode == "L" else WHITE)
        entry.update(sha256=hashlib.sha256(data).hexdigest(), hw=[im.height, im.width])
        if mode == "L":
            entry["grey"] = grey_pixels(im)
        idx.changed = True
    return entry


def target_size(size_hw: tuple[int, int], cfg: DataConfig) -> tuple[int, int]:
    """Training size of an image: its own (or cfg.resize), with cfg.bucket "kontext" the entry of
    PREFERRED_KONTEXT_RESOLUTIONS nearest its aspect (encode.kontext_size, FluxKontextPipeline's _auto_resize, so
    a pair of one aspect (target, control(s), the mask at the target's latent size) lands in one bucket), shrunk to
    cfg.max_pixels (the bucket's aspect at a smaller area: the tiny model's 64 x 64 world), floored to 16."""
    h, w = cfg.resize if cfg.resize else size_hw
    if cfg.bucket == "kontext":
        h, w = kontext_size(h, w, True)
    if cfg.max_pixels and h * w > cfg.max_pixels:
        s = (cfg.max_pixels / (h * w)) ** 0.5
        h, w = int(h * s), int(w * s)
    return h // 16 * 16, w // 16 * 16


def aspect_change(size_hw: tuple[int, int], cfg: DataConfig) -> float:
    """Relative change of width / height from the image's own (or cfg.resize's) to target_size's."""
    h, w = cfg.resize if cfg.resize else size_hw
    th, tw = target_size(size_hw, cfg)
    return (tw / th) / (w / h) - 1


def load_pixels(path: Path, cfg: DataConfig) -> torch.Tensor:
    """[1, 3, H, W] in [-1, 1] at target_size (encode.preprocess_image: Lanczos resize, as the pipeline)."""
    im = open_image(path, "RGB", tuple(cfg.background))
    return preprocess_image(im, *target_size((im.height, im.width), cfg))


def grey_pixels(mask) -> int:
    """How many pixels of a mask (PIL, any mode) are neither black nor white: the ones thresholding decides."""
    import numpy as np

    a = np.asarray(mask.convert("L"))
    return int(((a > 0) & (a < 255)).sum())


def mask_latent(mask, latent_hw: tuple[int, int], where: str | None = "mask") -> torch.Tensor:
    """A decoded mask (PIL "L") -> [1, h, w] in [0, 1] at latent resolution: thresholded at 0.5 (white = edit
    region; a mask that was not black and white is warned about, naming `where`, unless None: training's masks were
    warned about by validate_dataset), then area-averaged (a latent cell on the region's edge gets the fraction
    inside). Training (cache.py) and sample.py --mask both come here."""
    import numpy as np

    a = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    if where is not None and (grey := grey_pixels(mask)):
        warnings.warn(f"{where}: {grey} of {a.size} mask pixels are neither black nor white; thresholded at 0.5",
                      DatasetWarning, stacklevel=3)
    m = torch.from_numpy((a >= 0.5).astype(np.float32))[None, None]
    return torch.nn.functional.interpolate(m, size=latent_hw, mode="area")[0]


def load_mask(path: Path, latent_hw: tuple[int, int]) -> torch.Tensor:
    """mask_latent of a mask file (no warning: validate_dataset gave it). Transparent mask pixels are black (outside
    the edit region: a stroke painted on a transparent layer marks the region)."""
    return mask_latent(open_image(path, "L", BLACK), latent_hw, None)
