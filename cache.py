"""Datasets and the content-keyed cache of latents and prompt embeddings.

Layouts (DataConfig.path):
  (a) a folder: images/<stem>.{png,jpg,jpeg,webp} (targets), control/<stem>.* (inputs), captions <stem>.txt
      (beside the image, in captions/, or in the folder itself), optional masks images/<stem>_mask.png (white = edit
      region) and depth images images/<stem>_depth.png (for model.ip_adapter). Extensions match in any case (.Png,
      .JPG); stems match after NFC normalisation (macOS writes NFD).
      Several references: control/<stem>_1.*, <stem>_2.* ... are the 2nd, 3rd ... after control/<stem>.* (numbered
      without gaps; a control whose stem is a target's own stays that target's control).
  (b) a metadata.csv or .jsonl with columns image, control (or kontext_images), prompt, optional mask, depth; paths are
      relative to the file and must stay inside its folder unless DataConfig.allow_outside_paths. Text files are
      UTF-8 (a leading BOM, as Excel and Notepad write it, is skipped). Several references: a JSON list in .jsonl
      (["a.png", "b.png"]), ';'-separated paths in a .csv cell (a.png;b.png).
  (c) pairs for masked editing: target/<stem>.*, context/<stem>.* (the control), optional masks/<stem>.* and
      depth/<stem>.*, and prompts.txt: line i is the prompt of the i-th target in sorted stem order (text order:
      "10" sorts before "2", so zero-pad numbers).
Masks (white = edit region, any bit depth) are thresholded at 0.5: a mask that is not black and white (antialiased
edges, JPEG noise) is warned about once per file. Depth images (any bit depth; RGB for the image encoder) are
embedded by the IP-Adapter's image encoder (model.ip_adapter) and cached as ip_image_embeds [1, D].
Text-to-image (DataConfig.text_to_image) needs no control images. A folder holding both images/ and a metadata file
is refused (which one is meant is not ours to guess). Errors are collected and raised as one DatasetError; what does
not stop training (empty caption, unknown column, aspect change) is a DatasetWarning.
`python cache.py check DATA [--max-pixels N ...]` (check_dataset) runs the same scan and validation without a model
and prints counts, training sizes, caption statistics and every problem; exit 2 on errors.

Decoding (_decode, for targets, controls and masks): EXIF orientation first (every size check sees the upright
image), 16-bit grayscale scaled to 8 bits, transparency composited on DataConfig.background (masks: on black).

Each sample is cached as one safetensors file named by a hash of everything it depends on (image, control and
mask bytes, prompt, model identity, preprocessing settings incl. background, CACHE_VERSION for the decoder), never
by its position or a step:
  image_latents [16, h, w], control_latents [16, h', w'] (edit mode; further references control_latents_1,
  control_latents_2 ..., each of its own size), prompt_embeds [L, D], pooled_prompt_embeds [P], mask [1, h, w]
  (optional, 1 = edit region, at latent resolution). A one-reference entry is what it was before several references
  existed (same key, same tensors), so old caches stay valid; a k-reference key covers all k files.
The empty prompt's embeddings (for caption dropout) are cached once per model and max_sequence_length. Each file's
metadata carries the sha256 of its tensors (tensor_digest), checked on every read: a file changed in place is
rebuilt like a truncated one.

Start-up: hashing and decoding every image costs ~37 ms per 1024^2 pair, so a stat index in the cache folder
(stat-index-<dataset>.json) remembers, per image file, its content hash and decoded size under its (size, mtime_ns,
ctime_ns, inode); a warm start stats the files and re-reads only those whose stat changed. scan_dataset +
validate_dataset + cache_paths, 2 shared CPU cores: 2000 pairs of 64x64 PNGs 1.3 s cold, 0.3 s warm; 2000 of 256x256
6.5 s / 0.3 s; 100 of 1024x1024 3.8 s (38 ms a pair) / 0.01 s. What is left warm is scan_dataset (listing, captions).
Verifying the cached tensors' sha256 on read costs ~7 ms per 1024^2 entry (5 MB of bf16).
"""

import csv
import dataclasses
import gc
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
import safetensors.torch
from safetensors.torch import save_file

from config import Config, DataConfig, validate
from encode import encode_image, encode_ip_image, encode_prompt, preprocess_image
from load import load_components, model_identity

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")  # compared lower-cased
METADATA_COLUMNS = ("image", "control", "kontext_images", "prompt", "mask", "depth")
ASPECT_TOLERANCE = 0.05  # relative aspect-ratio change from flooring to 16 beyond which validate_dataset warns
CACHE_VERSION = "4"  # bump when the cached tensors' meaning or the file format changes (2: tensor_digest in metadata;
#                      3: _decode applies EXIF orientation, scales 16-bit, composites transparency; 4: masks are
#                      thresholded at 0.5 before the area average)
INDEX_VERSION = 2  # 2: "hw" is the upright (EXIF-transposed) size
# A file whose mtime/ctime is this recent when it is hashed is not remembered: a rewrite within the same timestamp
# tick (coarse kernel clocks, 2 s on FAT) would keep its stat, so its hash is only trusted once it is older (git's
# "racy" rule).
RACY_NS = 2_000_000_000


@dataclass(frozen=True)
class Sample:
    key: str  # the stem (folders) or row number (metadata); used in messages only
    image: Path
    prompt: str
    control: Path | None = None  # the first reference
    mask: Path | None = None
    extra_controls: tuple[Path, ...] = ()  # the 2nd, 3rd ... references, in order
    depth: Path | None = None  # the IP-Adapter's image (a depth map), embedded by model.ip_adapter's image encoder

    @property
    def controls(self) -> tuple[Path, ...]:
        """Every reference image, in order (empty for text-to-image)."""
        return ((self.control,) if self.control is not None else ()) + self.extra_controls


class DatasetError(ValueError):
    """Every problem found in a dataset, listed with file names."""


class DatasetWarning(UserWarning):
    """A dataset oddity that does not stop training (empty caption, unknown column, aspect change)."""


def _warn(what: str, items: list[str], advice: str, stacklevel: int = 3) -> None:
    """One DatasetWarning for all items (the first 20 named); stacklevel 3 points at the caller of scan_dataset /
    validate_dataset (train.py), where the default warning filter shows it."""
    if items:
        shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
        warnings.warn(f"{len(items)} {what} ({advice}):\n  " + "\n  ".join(shown), DatasetWarning,
                      stacklevel=stacklevel)


def _raise(problems: list[str], cfg: DataConfig) -> None:
    if problems:
        raise DatasetError(f"{len(problems)} problem(s) in dataset {cfg.path}:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------- scanning


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _by_stem(folder: Path, exts: tuple[str, ...], problems: list[str]) -> dict[str, Path]:
    """NFC stem -> file, for the files of `folder` whose lower-cased suffix is in exts. Two files with one stem
    (000.png and 000.jpg, or NFC and NFD spellings of one name) are a problem: which one is meant is unknown."""
    found: dict[str, list[Path]] = {}
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.suffix.lower() in exts and p.is_file():
                found.setdefault(_nfc(p.stem), []).append(p)
    for stem, paths in found.items():
        if len(paths) > 1:
            problems.append(f"{folder}: {len(paths)} files share the stem {stem!r} ({', '.join(p.name for p in paths)})"
                            f"; keep one")
    return {stem: paths[0] for stem, paths in found.items()}


def _read_text(path: Path, problems: list[str]) -> str | None:
    try:
        return path.read_text(encoding="utf-8-sig")  # utf-8-sig: a BOM (Excel, Notepad) is not part of the text
    except UnicodeDecodeError as e:
        problems.append(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                        f"save it as UTF-8")
        return None


def _extra_references(controls: dict[str, Path], images: dict[str, Path], problems: list[str]
                      ) -> tuple[dict[str, tuple[Path, ...]], list[Path]]:
    """Folder layout, several references: control/<stem>_<n>.* (n = 1, 2, ... without gaps) is reference n + 1 of
    target <stem>, unless <stem>_<n> is itself a target's stem (then it is that target's control, as always).
    Returns ({stem: (2nd, 3rd, ... reference)}, the controls that belong to no target)."""
    numbered: dict[str, dict[int, Path]] = {}
    orphans = []
    for stem, path in sorted(controls.items()):
        if stem in images:
            continue
        base, _, n = stem.rpartition("_")
        # "_01" or "_0" would make two spellings of one number: only 1, 2, ... as written by str(int)
        if base in images and n.isascii() and n.isdigit() and n == str(int(n)) and int(n) >= 1:
            numbered.setdefault(base, {})[int(n)] = path
        else:
            orphans.append(path)
    extra = {}
    for stem, refs in sorted(numbered.items()):
        gap = next(n for n in range(1, max(refs) + 2) if n not in refs)
        if gap < max(refs):
            problems.append(f"{refs[max(refs)]}: reference _{max(refs)} of {images[stem]} but no {stem}_{gap}.* in "
                            f"{refs[max(refs)].parent} (number further references _1, _2, ... without gaps)")
            continue
        extra[stem] = tuple(refs[n] for n in sorted(refs))
    return extra, orphans


def _scan_folder(root: Path, text_to_image: bool, problems: list[str], empty: list[str]) -> list[Sample]:
    images_dir, control_dir = root / "images", root / "control"
    if not images_dir.is_dir():
        problems.append(f"{root}: no images/ folder (expected images/<stem>.png with control/<stem>.png and "
                        f"<stem>.txt, or a metadata.csv / .jsonl)")
        return []
    found = _by_stem(images_dir, IMAGE_EXTS, problems)
    images = {s: p for s, p in found.items() if not s.endswith(("_mask", "_depth"))}
    controls = _by_stem(control_dir, IMAGE_EXTS, problems) if not text_to_image else {}
    caption_dirs = [images_dir, root / "captions", root]
    captions = [_by_stem(d, (".txt",), problems) for d in caption_dirs]
    extra, orphans = _extra_references(controls, images, problems)
    samples = []
    for stem, image in sorted(images.items()):
        where = [c[stem] for c in captions if stem in c]
        if len(where) > 1:
            problems.append(f"{image}: {len(where)} captions ({', '.join(map(str, where))}); keep one")
            continue
        if not where:
            problems.append(f"{image}: no caption (expected {images_dir / (stem + '.txt')})")
        control = controls.get(stem)
        if not text_to_image and control is None:
            problems.append(f"{image}: no control image (expected {control_dir / (stem + '.png')} or .jpg/.webp"
                            + (f"; {extra[stem][0].name} is the 2nd reference, {stem}.* the 1st" if stem in extra
                               else "") + ")")
        prompt = _read_text(where[0], problems) if where else None
        if prompt is not None and (text_to_image or control is not None):
            if not prompt.strip():
                empty.append(str(where[0]))
            samples.append(Sample(stem, image, prompt.strip(), control, found.get(stem + "_mask"),
                                  extra.get(stem, ()), found.get(stem + "_depth")))
    for p in orphans:
        base, _, n = _nfc(p.stem).rpartition("_")
        hint = (f" (further references of {images[base].name} are numbered {base}_1, {base}_2, ...)"
                if base in images else "")
        problems.append(f"{p}: control image without a target in {images_dir}{hint}")
    return samples


def _dataset_path(file: Path, value, cfg: DataConfig, where: str, problems: list[str]) -> Path | None:
    """The file a metadata cell names, relative to the metadata file's folder, or None (a problem is recorded)."""
    if not isinstance(value, str):
        problems.append(f"{where}: a path must be a string, found {value!r}")
        return None
    folder = Path(os.path.abspath(file.parent))
    # normpath, not resolve: judge what the metadata says ('../..'), not where symlinks the user placed lead.
    path = Path(os.path.normpath(folder / value))
    if not cfg.allow_outside_paths and not path.is_relative_to(folder):
        problems.append(f"{where}: {value!r} is outside the dataset folder {folder} (set data.allow_outside_paths "
                        f"to allow absolute and ../ paths)")
        return None
    if not path.is_file() and path.parent.is_dir():
        # The metadata's spelling may be NFC where the file system kept NFD (or the reverse): match by NFC name.
        same = [p for p in path.parent.iterdir() if _nfc(p.name) == _nfc(path.name)]
        path = same[0] if len(same) == 1 else path
    if not path.is_file():
        problems.append(f"{where}: file not found: {path}")
        return None
    return path


def _rows(file: Path, problems: list[str]) -> tuple[list[tuple[str, dict]], list[str]] | None:
    """(where, row) pairs and the columns found, or None when the file cannot be read."""
    text = _read_text(file, problems)
    if text is None:
        return None
    rows, columns = [], []
    if file.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = [c.strip() for c in reader.fieldnames or []]  # "image, prompt": the space is not part of the name
        reader.fieldnames = header
        columns = header
        for row in reader:
            where = f"{file}:{reader.line_num}"
            if None in row:  # more cells than the header: usually an unquoted comma in a prompt
                problems.append(f"{where}: {len(header) + len(row[None])} cells but the header has {len(header)} "
                                f"(quote a prompt that contains commas: \"make it red, then blue\")")
                continue
            rows.append((where, row))
    else:
        for i, line in enumerate(text.splitlines()):
            where = f"{file}:{i + 1}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{where}: not valid JSON ({e})")
                continue
            if not isinstance(row, dict):
                problems.append(f"{where}: expected a JSON object, found {type(row).__name__}")
                continue
            columns += [k for k in row if k not in columns]
            rows.append((where, row))
    return rows, columns


def _lines(where: list[str], rows: list) -> str:
    """'' when every row is meant, else ' in line(s) 3, 7, ...'."""
    if len(where) == len(rows):
        return ""
    nums = [w.rsplit(":", 1)[1] for w in where]
    return f" in line(s) {', '.join(nums[:10])}{' ...' if len(nums) > 10 else ''}"


def _reference_cell(value, column: str, csv_file: bool, where: str, problems: list[str]) -> list | None:
    """The paths a control cell names, in order: a JSON list (.jsonl), ';'-separated paths (.csv), or one path;
    None when the cell is malformed (a problem is recorded)."""
    if isinstance(value, list):
        return value
    if csv_file and isinstance(value, str):
        if value.lstrip().startswith("["):  # a JSON or Python list typed into a spreadsheet cell
            problems.append(f"{where}: {column} cell {value!r} looks like a list; in a .csv separate several "
                            f"references with ';' (a.png;b.png), or use a JSON list in a .jsonl")
            return None
        if ";" in value:
            parts = [v.strip() for v in value.split(";")]
            if not all(parts):
                problems.append(f"{where}: an empty path in {column} cell {value!r} (paths separated by ';')")
                return None
            return parts
    return [value]


def _scan_metadata(file: Path, cfg: DataConfig, problems: list[str], empty: list[str]) -> list[Sample]:
    read = _rows(file, problems)
    if read is None:
        return []
    rows, columns = read
    both = ("control", "kontext_images")
    # A column missing from the file is one message (with the columns it does have), not one per row.
    lacking = {c: [w for w, r in rows if c not in r] for c in ("image", "prompt")}
    if not cfg.text_to_image:
        lacking["control"] = [w for w, r in rows if not any(k in r for k in both)]
    for c, ws in lacking.items():
        if ws:
            problems.append(f"{file}: no {c!r} column{_lines(ws, rows)} (columns found: {', '.join(columns) or 'none'};"
                            f" expected image, {'' if cfg.text_to_image else 'control (or kontext_images), '}prompt, "
                            f"optional mask)")
    twice = [w for w, r in rows if all(k in r for k in both)]
    if twice:
        problems.append(f"{file}: both 'control' and 'kontext_images'{_lines(twice, rows)}; keep one")
    if twice or any(lacking.values()):
        return []
    _warn(f"unknown column(s) in {file}, ignored", [c for c in columns if c not in METADATA_COLUMNS],
          f"known columns: {', '.join(METADATA_COLUMNS)}", stacklevel=4)
    samples = []
    for where, row in rows:
        cells = {"image": row.get("image"), "mask": row.get("mask") or None, "depth": row.get("depth") or None}
        if not cfg.text_to_image:
            cells["control"] = row.get("control", row.get("kontext_images"))
        blank = [k for k in ("image", "control") if k in cells and not cells[k]]
        if blank:
            problems.append(f"{where}: empty {' and '.join(map(repr, blank))} cell")
            continue
        refs = []
        if "control" in cells:
            column = "control" if "control" in row else "kontext_images"
            refs = _reference_cell(cells.pop("control"), column, file.suffix.lower() == ".csv", where, problems)
            if refs is None:
                continue
        paths = {k: _dataset_path(file, v, cfg, where, problems) for k, v in cells.items() if v is not None}
        controls = [_dataset_path(file, v, cfg, where, problems) for v in refs]
        if any(p is None for p in [*paths.values(), *controls]):
            continue
        prompt = "" if row.get("prompt") is None else str(row["prompt"]).strip()
        if not prompt:
            empty.append(where)
        samples.append(Sample(where.rsplit(":", 1)[1], paths["image"], prompt, controls[0] if controls else None,
                              paths.get("mask"), tuple(controls[1:]), paths.get("depth")))
    return samples


PAIR_DIRS = ("target", "context", "masks", "depth")  # layout (c)


def _scan_pairs(root: Path, text_to_image: bool, problems: list[str], empty: list[str]) -> list[Sample]:
    """Layout (c): target/, context/, masks/, depth/ matched by stem, prompts.txt one line per target in sorted stem
    order. A file without its target, a target without its context, and a line count that differs from the number
    of targets are problems."""
    found = {d: _by_stem(root / d, IMAGE_EXTS, problems) for d in PAIR_DIRS if d != "context" or not text_to_image}
    targets = found["target"]
    for d, files in found.items():
        problems += [f"{p}: no target/{stem}.* for it (pairs match by file name)" for stem, p in files.items()
                     if stem not in targets]
    if not text_to_image:
        problems += [f"{p}: no context/{stem}.* (the image to edit; text_to_image needs none)"
                     for stem, p in targets.items() if stem not in found["context"]]
    stems = sorted(targets)
    lengths = {len(x) for x in stems if x.isdigit()}
    if len(lengths) > 1 and all(x.isdigit() for x in stems):
        _warn("numeric file names of different lengths sort as text, which is the order prompts.txt follows",
              [f"{stems[0]}, {stems[1]}, ... {stems[-1]}"], "zero-pad them (001.png, 002.png, ...)", stacklevel=5)
    file = root / "prompts.txt"
    text = _read_text(file, problems) if file.is_file() else None
    if not file.is_file():
        problems.append(f"{file}: missing (one prompt per line, for the targets in sorted order: "
                        f"{', '.join(stems[:3])}{' ...' if len(stems) > 3 else ''})")
    if text is None or not stems:
        return []
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # a trailing blank line is an editor's, not an empty prompt
        lines.pop()
    if len(lines) != len(stems):
        problems.append(f"{file}: {len(lines)} line(s) but {len(stems)} target(s) in {root / 'target'} (line i is "
                        f"the prompt of the i-th target in sorted order: {stems[0]} ... {stems[-1]})")
        return []
    samples = []
    for i, (stem, prompt) in enumerate(zip(stems, lines)):
        if not prompt.strip():
            empty.append(f"{file}:{i + 1} ({stem})")
        if text_to_image or stem in found["context"]:
            samples.append(Sample(stem, targets[stem], prompt.strip(), found.get("context", {}).get(stem),
                                  found["masks"].get(stem), (), found["depth"].get(stem)))
    return samples


def scan_dataset(cfg: DataConfig, problems: list[str] | None = None) -> list[Sample]:
    """List the samples, or raise DatasetError naming every problem at once. Opens no image. Warns (DatasetWarning)
    about empty captions and unknown metadata columns. `problems`: a list to collect the problems in instead of
    raising (check_dataset; the complete samples are returned); a dataset that is missing or ambiguous still raises."""
    root = Path(cfg.path)
    collect, problems = problems is not None, [] if problems is None else problems
    if not cfg.path or not root.exists():
        raise DatasetError(f"dataset {cfg.path!r} does not exist (expected a folder or a metadata.csv / .jsonl)")
    if root.is_dir():
        meta = [root / n for n in ("metadata.csv", "metadata.jsonl") if (root / n).is_file()]
        has_images = (root / "images").is_dir()
        if has_images and (root / "target").is_dir():
            raise DatasetError(f"dataset {cfg.path} holds both images/ (targets with control/) and target/ (with "
                               f"context/, masks/, depth/, prompts.txt): which layout to use is ambiguous; keep one")
        if meta and (has_images or len(meta) > 1):
            held = " and ".join((["images/"] if has_images else []) + [m.name for m in meta])
            raise DatasetError(f"dataset {cfg.path} holds {held}: which one to use is ambiguous; point data.path at "
                               f"the metadata file to use it (e.g. {meta[0]})"
                               + (", or move the metadata file away to use the images/ folder" if has_images else ""))
        root = meta[0] if meta else root
    empty: list[str] = []
    samples = (_scan_metadata(root, cfg, problems, empty) if not root.is_dir()
               else _scan_pairs(root, cfg.text_to_image, problems, empty) if (root / "target").is_dir()
               else _scan_folder(root, cfg.text_to_image, problems, empty))
    _warn("sample(s) with an empty caption train with the empty prompt", empty,
          "write a caption; train.caption_dropout is the way to train on the empty prompt on purpose")
    if not samples and not problems:
        problems.append(f"{cfg.path}: the dataset is empty")
    if not collect:
        _raise(problems, cfg)
    return samples


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


def cache_dir_of(cfg: Config) -> Path:
    return Path(cfg.data.cache_dir or Path(cfg.out_dir) / "cache")


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
        fd, tmp = tempfile.mkstemp(prefix=idx.file.name + ".", suffix=".tmp", dir=idx.file.parent)
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


# ---------------------------------------------------------------- images and validation


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
    """Training size of an image: its own (or cfg.resize), shrunk to cfg.max_pixels, floored to 16."""
    h, w = cfg.resize if cfg.resize else size_hw
    if cfg.max_pixels and h * w > cfg.max_pixels:
        s = (cfg.max_pixels / (h * w)) ** 0.5
        h, w = int(h * s), int(w * s)
    return h // 16 * 16, w // 16 * 16


def aspect_change(size_hw: tuple[int, int], cfg: DataConfig) -> float:
    """Relative change of width / height from the image's own (or cfg.resize's) to target_size's."""
    h, w = cfg.resize if cfg.resize else size_hw
    th, tw = target_size(size_hw, cfg)
    return (tw / th) / (w / h) - 1


def validate_dataset(samples: list[Sample], cfg: DataConfig, cache_dir: Path | None = None,
                     problems: list[str] | None = None) -> list[dict]:
    """Decode every image once and check sizes; raise DatasetError listing every problem (or, given `problems`,
    append them there). Warns (DatasetWarning) about images whose aspect ratio changes by more than
    ASPECT_TOLERANCE when floored to multiples of 16. cache_dir (train.py: cache_dir_of(cfg)): where the stat index
    lives; files it knows under their current stat are not decoded again. None: decode everything, remember nothing.
    Returns per sample {"image" / "control" / "control_1" ... / "mask" / "depth": upright (height, width)} of the
    files that decoded ("control_1", "control_2" ...: the 2nd, 3rd ... references)."""
    idx = read_index(cache_dir, cfg)
    collect, problems = problems is not None, [] if problems is None else problems
    squashed, grey, out = [], [], []
    for s in samples:
        sizes = {}
        out.append(sizes)
        files = {"image": s.image, "control": s.control, **{f"control_{i + 1}": p for i, p in
                                                             enumerate(s.extra_controls)}, "mask": s.mask,
                 "depth": s.depth}
        for name, path in files.items():
            if path is None:
                continue
            try:
                entry = _checked(path, "L" if name == "mask" else "RGB", idx)
            except DatasetError as e:
                problems.append(str(e))
                continue
            sizes[name] = tuple(entry["hw"])
            if entry.get("grey"):
                grey.append(f"{path}: {entry['grey']} grey pixel(s)")
        for name in files:
            if name not in sizes or name in ("mask", "depth"):  # a depth image is resized by its encoder
                continue
            (h, w), (th, tw) = sizes[name], target_size(sizes[name], cfg)
            if min(th, tw) < 16:
                problems.append(f"{files[name]}: {w}x{h} is too small to encode "
                                f"(needs at least 16x16 pixels after resizing)")
            elif abs(change := aspect_change(sizes[name], cfg)) > ASPECT_TOLERANCE:
                squashed.append(f"{files[name]}: {w}x{h} -> {tw}x{th} (aspect {w / h:.3g} -> {tw / th:.3g}, "
                                f"{change:+.0%})")
        if "mask" in sizes and "image" in sizes and sizes["mask"] != sizes["image"]:
            problems.append(f"{s.mask}: mask is {sizes['mask'][1]}x{sizes['mask'][0]} but its image {s.image} "
                            f"is {sizes['image'][1]}x{sizes['image'][0]}")
    write_index(idx)
    _warn(f"image(s) change aspect ratio by more than {ASPECT_TOLERANCE:.0%} when floored to multiples of 16",
          squashed, "crop or pad them to multiples of 16 pixels, or to a less extreme aspect ratio")
    _warn("mask(s) are not black and white: thresholded at 0.5 (white = edit region)", grey,
          "save them as pure black and white to mark the region exactly")
    if not collect:
        _raise(problems, cfg)
    return out


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


# ---------------------------------------------------------------- the cache


def sample_key(s: Sample, cfg: DataConfig, model_ident: str, idx: StatIndex | None = None) -> str:
    """Content key: image / control / mask bytes, prompt, model identity and every preprocessing setting. The
    file hashes come from idx where it knows the file under its current stat (else the file is read)."""
    idx = StatIndex() if idx is None else idx
    # further references and depth only when there are some: other samples keep the key they always had
    digests = [file_digest(p, idx) for p in (s.image, s.control, s.mask, *s.extra_controls)]
    digests += [f"depth:{file_digest(s.depth, idx)}"] if s.depth is not None else []
    settings = [cfg.max_pixels, cfg.resize, cfg.max_sequence_length, cfg.text_to_image, list(cfg.background)]
    parts = [CACHE_VERSION, *digests, s.prompt, model_ident, json.dumps(settings)]
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:32]


def empty_key(cfg: DataConfig, model_ident: str) -> str:
    return hashlib.sha256(f"{CACHE_VERSION}\x00empty\x00{model_ident}\x00{cfg.max_sequence_length}".encode()
                          ).hexdigest()[:32]


def save_atomic(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors to a temp file in the same folder, fsync, then rename: a crash never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def tensor_digest(tensors: dict) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in sorted name order (stored in a cache file's
    metadata as "sha256"; read_entry recomputes it)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}\x00{t.dtype}\x00{list(t.shape)}\x00".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def read_entry(path: Path, key: str, required: tuple[str, ...]) -> dict | None:
    """The cached tensors, or None when the file is missing, truncated, corrupt (its tensors no longer match the
    stored tensor_digest, e.g. values overwritten in place) or not what the key says."""
    if not path.is_file():
        return None
    try:
        # Read the bytes, not a memory map: tensors must not change (or fault) if the file is rewritten later.
        data = path.read_bytes()
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        meta = header.get("__metadata__") or {}
        if meta.get("key") != key or "sha256" not in meta:
            return None
        tensors = safetensors.torch.load(data)
    except (SafetensorError, OSError, ValueError, RuntimeError, AttributeError):
        return None
    if tensor_digest(tensors) != meta["sha256"]:
        return None
    if any(k not in tensors or not torch.isfinite(tensors[k]).all() for k in required):
        return None
    return tensors


def control_key(i: int) -> str:
    """Cache entry name of reference i (0-based): control_latents, then control_latents_1, _2 ..."""
    return f"control_latents_{i}" if i else "control_latents"


def control_latents_of(entry: dict) -> list[torch.Tensor]:
    """A cache entry's references [16, h_i, w_i], in order (empty for text-to-image)."""
    out = []
    while control_key(len(out)) in entry:
        out.append(entry[control_key(len(out))])
    return out


def required_keys(s: Sample) -> tuple[str, ...]:
    return ("image_latents", "prompt_embeds", "pooled_prompt_embeds") \
        + tuple(control_key(i) for i in range(len(s.controls))) + (("mask",) if s.mask else ()) \
        + (("ip_image_embeds",) if s.depth else ())


def encode_sample(s: Sample, cfg: DataConfig, c, device=None) -> dict:
    """Every cached tensor of one sample (batch dim dropped), computed with encode.py on the components' devices."""
    out = {"image_latents": encode_image(c.vae, load_pixels(s.image, cfg), device=device)[0]}
    for i, path in enumerate(s.controls):  # each reference at its own target_size, as the single one always was
        out[control_key(i)] = encode_image(c.vae, load_pixels(path, cfg), device=device)[0]
    embeds, pooled, _ = encode_prompt(c.clip, c.clip_tokenizer, c.t5, c.t5_tokenizer, s.prompt,
                                      max_sequence_length=cfg.max_sequence_length, device=device)
    out["prompt_embeds"], out["pooled_prompt_embeds"] = embeds[0], pooled[0]
    if s.mask is not None:
        out["mask"] = load_mask(s.mask, tuple(out["image_latents"].shape[1:]))
    if s.depth is not None:
        if getattr(c, "image_encoder", None) is None:
            raise ValueError(f"{s.depth}: a depth image needs model.ip_adapter (its image encoder embeds it)")
        out["ip_image_embeds"] = encode_ip_image(c.image_encoder, c.feature_extractor,
                                                 open_image(s.depth, "RGB", BLACK))[0].float().cpu()
    return out


def encode_empty(cfg: DataConfig, c, device=None) -> dict:
    embeds, pooled, _ = encode_prompt(c.clip, c.clip_tokenizer, c.t5, c.t5_tokenizer, "",
                                      max_sequence_length=cfg.max_sequence_length, device=device)
    return {"empty_prompt_embeds": embeds[0], "empty_pooled_prompt_embeds": pooled[0]}


def cache_paths(samples: list[Sample], cfg: DataConfig, cache_dir: Path, model_ident: str) -> tuple[list[Path], Path]:
    """(one file per sample, the empty-prompt file): where build_cache keeps them, named by content. The image
    hashes come from cache_dir's stat index (read_index), which is updated."""
    cache_dir = Path(cache_dir)
    idx = read_index(cache_dir, cfg)
    files = [cache_dir / f"{sample_key(s, cfg, model_ident, idx)}.safetensors" for s in samples]
    write_index(idx)
    return files, cache_dir / f"empty-{empty_key(cfg, model_ident)}.safetensors"


def build_cache(samples: list[Sample], cfg: DataConfig, encoders, cache_dir: Path, model_ident: str,
                progress: bool = True) -> tuple[list[dict], dict]:
    """Every sample's cached tensors and the empty prompt's, each file read once; what is missing or corrupt is
    encoded and written. `encoders`: the loaded Components, or a function returning them, called only when
    something must be encoded (a fully cached run never loads the text encoders or the VAE)."""
    from tqdm.auto import tqdm

    files, empty_file = cache_paths(samples, cfg, cache_dir, model_ident)
    entries = [read_entry(f, f.stem, required_keys(s)) for s, f in zip(samples, files)]
    empty = read_entry(empty_file, empty_file.stem, ("empty_prompt_embeds",))
    todo = [i for i, e in enumerate(entries) if e is None]
    if todo or empty is None:
        c = encoders() if callable(encoders) else encoders
        for i in tqdm(todo, desc="caching latents and embeddings", disable=not progress or not todo):
            entries[i] = encode_sample(samples[i], cfg, c, device="cpu")
            save_atomic(entries[i], files[i], {"key": files[i].stem, "source": str(samples[i].image),
                                               "sha256": tensor_digest(entries[i])})
        if empty is None:
            empty = encode_empty(cfg, c, device="cpu")
            save_atomic(empty, empty_file, {"key": empty_file.stem, "sha256": tensor_digest(empty)})
    return entries, empty


# ---------------------------------------------------------------- training data: cached or encoded on the fly


@dataclass
class TrainingData:
    train: "list[dict] | OnTheFly"  # one entry per training sample (the cached tensors, batch dim dropped)
    held_out: "list[dict] | OnTheFly"
    empty: dict  # the empty prompt's embeddings (caption dropout)
    shapes: list[tuple]  # per training sample: its latent shapes, the bucket key of batching
    vae: torch.nn.Module | None  # loaded for encoding (uncached mode); validation grids reuse it


def training_data(cfg: Config, samples: list[Sample], n_train: int, log=print) -> TrainingData:
    """The first n_train samples for training, the rest held out. Cached mode (cfg.train.cached): every sample's
    tensors from the cache; what is missing is encoded first, with the text encoders and VAE loaded only then and
    freed after. Uncached: encoders stay loaded on their devices and encode each sample when a batch needs it.
    Depth images are embedded only for a model with an IP-Adapter (model.ip_adapter; its image encoder loads with
    the VAE), and ignored otherwise (train.conditioning_check says so)."""
    if not cfg.model.ip_adapter.path:
        samples = [dataclasses.replace(s, depth=None) for s in samples]
    if not cfg.train.cached:
        encoders = load_components(cfg.model, which=("clip", "t5", "vae"))
        empty = encode_empty(cfg.data, encoders, device="cpu")
        train = OnTheFly(samples[:n_train], cfg.data, encoders, read_index(cache_dir_of(cfg), cfg.data))
        return TrainingData(train, OnTheFly(samples[n_train:], cfg.data, encoders), empty,
                            [train.shape(i) for i in range(n_train)], encoders.vae)
    ident = "|".join(model_identity(cfg.model, getattr(cfg.model, n), n) for n in ("clip", "t5", "vae"))
    cache_dir = cache_dir_of(cfg)
    loaded = []

    def encoders():
        log(f"caching into {cache_dir}")
        loaded.append(load_components(cfg.model, which=("clip", "t5", "vae")))
        return loaded[0]

    entries, empty = build_cache(samples, cfg.data, encoders, cache_dir, ident)
    if not loaded:
        log(f"all {len(entries)} samples cached in {cache_dir}; text encoders and VAE not loaded")
    loaded.clear()  # free the encoders before the transformer loads
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    # every reference's shape is in the key: a batch holds one number and size of references
    shapes = [tuple(e["image_latents"].shape) + sum((tuple(c.shape) for c in control_latents_of(e)), ())
              for e in entries[:n_train]]
    return TrainingData(entries[:n_train], entries[n_train:], empty, shapes, None)


class OnTheFly:
    """Uncached mode: a sequence of samples encoded when indexed."""

    def __init__(self, samples: list[Sample], cfg: DataConfig, components, idx: StatIndex | None = None):
        self.samples, self.cfg, self.c = samples, cfg, components
        self.idx = StatIndex() if idx is None else idx

    def __getitem__(self, i: int) -> dict:
        return encode_sample(self.samples[i], self.cfg, self.c, device="cpu")

    def __len__(self) -> int:
        return len(self.samples)

    def shape(self, i: int) -> tuple:
        """The latent shapes encoding would give, from the upright sizes validate_dataset found (the stat index; a
        file it does not know is decoded: a header alone may not say the orientation, PNG's eXIf can follow IDAT)."""
        out = ()
        for p in (self.samples[i].image, *self.samples[i].controls):
            if p is not None:
                h, w = target_size(_checked_size(p, "RGB", self.idx), self.cfg)
                out += (self.c.vae.config.latent_channels, h // 8, w // 8)
        return out


# ---------------------------------------------------------------- the dataset check: python cache.py check DATA

CLIP_TOKENS = 77  # CLIPTokenizer's model_max_length: the pipeline truncates the prompt there for CLIP


def token_estimate(text: str) -> int:
    """Rough CLIP / T5 token count of English text without a tokenizer: the larger of 4/3 per word and 1 per 4
    characters (both BPE and SentencePiece average about that on prose; rare words and symbols split more)."""
    return math.ceil(max(len(text.split()) * 4 / 3, len(text) / 4))


def check_dataset(cfg: DataConfig, cache_dir: Path | None = None, out=print) -> int:
    """Scan and validate as training does (no model loaded) and print: counts, the training sizes (target_size:
    max_pixels / resize, floored to 16) as a histogram of (target, control) pairs (one batch holds one pair),
    caption statistics, then every warning and error with its file. Returns the exit code: 2 on errors, else 0."""
    problems: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            samples = scan_dataset(cfg, problems)
            sizes = validate_dataset(samples, cfg, cache_dir, problems)
        except DatasetError as e:  # missing or ambiguous: nothing to count
            problems.append(str(e))
            samples, sizes = [], []
    out(f"dataset {cfg.path}")
    prompts = [s.prompt for s in samples]
    several = sum(len(s.controls) > 1 for s in samples)
    out(f"samples: {len(samples)}; with control: {sum(s.control is not None for s in samples)}; with mask: "
        f"{sum(s.mask is not None for s in samples)}; with a caption: {sum(bool(p) for p in prompts)}"
        + (f"; with several references: {several}" if several else ""))
    keys = lambda s: ["image"] + [f"control_{i}" if i else "control" for i in range(len(s.controls))]  # noqa: E731
    pairs = Counter(tuple(target_size(z[k], cfg)[::-1] for k in keys(s))
                    for s, z in zip(samples, sizes) if all(k in z for k in keys(s)))
    if pairs:
        out("training sizes, W x H (after max_pixels / resize, floored to 16; a batch holds one line's size):")
        for pair, n in sorted(pairs.items(), key=lambda kv: -kv[1]):
            out(f"  {n:6d}  target {pair[0][0]}x{pair[0][1]}" + "".join(
                f", control{f' {i + 1}' if i else ''} {w}x{h}" for i, (w, h) in enumerate(pair[1:])))
    if samples:
        words = sorted(len(p.split()) for p in prompts)
        out(f"captions: {len(set(prompts))} distinct; {words[0]}-{words[-1]} words (median {words[len(words) // 2]}),"
            f" up to {max(map(len, prompts))} characters")
        # the text's share of each window: CLIP adds BOS and EOS, T5 adds EOS
        for name, n, text, why in (("CLIP", CLIP_TOKENS, CLIP_TOKENS - 2, "CLIP encodes only the first 77; T5 more"),
                                   ("T5", cfg.max_sequence_length, cfg.max_sequence_length - 1,
                                    "data.max_sequence_length: the rest is cut off")):
            over = [f"{s.image}: ~{token_estimate(s.prompt)} tokens ({len(s.prompt)} characters)"
                    for s in samples if token_estimate(s.prompt) > text]
            out(f"  likely over {n} {name} tokens ({why}; estimated, no tokenizer): {len(over)}"
                + "".join(f"\n    {o}" for o in over))
        shared = Counter(p for p in prompts if p)
        shared = {p: n for p, n in shared.items() if n > 1}
        top = max(shared, key=shared.get, default=None)
        out(f"  empty: {prompts.count('')}; shared by several samples: {len(shared)} caption(s), "
            f"{sum(shared.values())} samples" + (f" (most: {top[:60]!r} x {shared[top]})" if top else ""))
    for w in caught:
        out(f"warning: {w.message}")
    for p in problems:
        out(f"error: {p}")
    out(f"check: {len(problems)} error(s), {len(caught)} warning(s)")
    return 2 if problems else 0


def main(argv: list[str]) -> int:
    """`python cache.py check DATA [--max-pixels N] [--resize H W] [--text-to-image] [--cache-dir DIR] ...`:
    DataConfig's fields as flags; --cache-dir uses (and updates) that cache's stat index, else nothing is written."""
    import tyro

    if not argv or argv[0] != "check":
        print("usage: python cache.py check DATA [--max-pixels N ...]  (python cache.py check --help)", file=sys.stderr)
        return 2
    rest = argv[1:]
    if rest and not rest[0].startswith("-"):  # DATA, positional: the same as --path
        rest = ["--path", *rest]
    data = tyro.cli(DataConfig, default=DataConfig(), args=rest, prog="cache.py check",
                    description="Scan and validate a dataset as train.py does (no model loaded); exit 2 on errors. "
                                "DATA (first argument) = --path.")
    try:
        validate(Config(data=data))
    except ValueError as e:
        print(f"cache.py check: error: {e}", file=sys.stderr)
        return 2
    return check_dataset(data, Path(data.cache_dir) if data.cache_dir else None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
