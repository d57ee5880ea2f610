"""Datasets: the layouts, the scan that lists their samples, validation (every image decoded once, every problem at
once), and the dataset check `python data.py check DATA`. Decoding rules and the stat index are images.py's.

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
`python data.py check DATA [--max-pixels N ...]` (check_dataset) runs the same scan and validation without a model
and prints counts, training sizes, caption statistics and every problem; exit 2 on errors.
"""

import csv
import io
import json
import math
import os
import sys
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from config import Config, DataConfig, validate
from images import DatasetError, DatasetWarning, _checked, aspect_change, read_index, target_size, write_index
import quiet

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")  # compared lower-cased
METADATA_COLUMNS = ("image", "control", "kontext_images", "prompt", "mask", "depth")
ASPECT_TOLERANCE = 0.05  # relative aspect-ratio change from flooring to 16 beyond which validate_dataset warns


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


def _captions_of(stem: str, image: Path, captions: list[dict[str, Path]], problems: list[str]) -> list[Path] | None:
    """The caption files of `stem` in the caption places (images/, captions/, the folder itself): [] or [one]; None
    when there are several (a problem is recorded: which one is meant is unknown)."""
    where = [c[stem] for c in captions if stem in c]
    if len(where) > 1:
        problems.append(f"{image}: {len(where)} captions ({', '.join(map(str, where))}); keep one")
        return None
    return where


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
        where = _captions_of(stem, image, captions, problems)
        if where is None:
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


# ---------------------------------------------------------------- validation


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


# ---------------------------------------------------------------- the dataset check: python data.py check DATA

CLIP_TOKENS = 77  # CLIPTokenizer's model_max_length: the pipeline truncates the prompt there for CLIP


def token_estimate(text: str) -> int:
    """Rough CLIP / T5 token count of English text without a tokenizer: the larger of 4/3 per word and 1 per 4
    characters (both BPE and SentencePiece average about that on prose; rare words and symbols split more)."""
    return math.ceil(max(len(text.split()) * 4 / 3, len(text) / 4))


def cut_prompts(prompts: dict[str, str], tokenizer, max_len: int) -> list[str]:
    """'<where>: N T5 tokens' for each prompt the pipeline's T5 tokenization (max_length=max_len, truncation, EOS
    included) cuts; `prompts` maps where each comes from (a file, "--prompt") to its text."""
    counts = {w: len(tokenizer(t, truncation=False)["input_ids"]) for w, t in prompts.items() if t}
    return [f"{w}: {n} T5 tokens" for w, n in counts.items() if n > max_len]


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
        out("training sizes, W x H (after " + ("the Kontext resolution nearest in aspect (data.bucket kontext), "
                                              if cfg.bucket == "kontext" else "")
            + "max_pixels / resize, floored to 16; a batch holds one line's size):")
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
    """`python data.py check DATA [--max-pixels N] [--resize H W] [--text-to-image] [--cache-dir DIR] ...`:
    DataConfig's fields as flags; --cache-dir uses (and updates) that cache's stat index, else nothing is written."""
    import tyro

    if not argv or argv[0] != "check":  # the module's own text is the help: layouts, rules, the one command
        usage = "usage: python data.py check DATA [--max-pixels N ...]  (python data.py check --help: every flag)"
        if argv and argv[0] in ("-h", "--help"):
            print(f"{usage}\n\n{__doc__}")
            return 0
        print(usage, file=sys.stderr)
        return 2
    rest = argv[1:]
    if rest and not rest[0].startswith("-"):  # DATA, positional: the same as --path
        rest = ["--path", *rest]
    data = tyro.cli(DataConfig, default=DataConfig(), args=rest, prog="data.py check",
                    description="Scan and validate a dataset as train.py does (no model loaded); exit 2 on errors. "
                                "DATA (first argument) = --path.")
    try:
        validate(Config(data=data))
    except ValueError as e:
        print(f"data.py check: error: {e}", file=sys.stderr)
        return 2
    return check_dataset(data, Path(data.cache_dir) if data.cache_dir else None)


if __name__ == "__main__":
    quiet.install()
    sys.exit(main(sys.argv[1:]))
