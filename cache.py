"""Datasets and the content-keyed cache of latents and prompt embeddings.

Layouts (DataConfig.path):
  (a) a folder: images/<stem>.{png,jpg,jpeg,webp} (targets), control/<stem>.* (inputs), captions <stem>.txt
      (beside the image, or in captions/), optional masks images/<stem>_mask.png (white = edit region);
  (b) a metadata.csv or .jsonl with columns image, control (or kontext_images), prompt, optional mask; paths are
      relative to the file.
Text-to-image (DataConfig.text_to_image) needs no control images.

Each sample is cached as one safetensors file named by a hash of everything it depends on (image, control and
mask bytes, prompt, model identity, preprocessing settings), never by its position or a step:
  image_latents [16, h, w], control_latents [16, h', w'] (edit mode), prompt_embeds [L, D],
  pooled_prompt_embeds [P], mask [1, h, w] (optional, 1 = edit region, at latent resolution).
The empty prompt's embeddings (for caption dropout) are cached once per model and max_sequence_length.
"""

import csv
import gc
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
import safetensors.torch
from safetensors.torch import save_file

from config import Config, DataConfig
from encode import encode_image, encode_prompt, preprocess_image
from load import load_components, model_identity

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
CACHE_VERSION = "1"  # bump when the cached tensors' meaning changes


@dataclass(frozen=True)
class Sample:
    key: str  # the stem (folders) or row number (metadata); used in messages only
    image: Path
    prompt: str
    control: Path | None = None
    mask: Path | None = None


class DatasetError(ValueError):
    """Every problem found in a dataset, listed with file names."""


# ---------------------------------------------------------------- scanning and validation


def _find_image(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTS:
        for cand in (folder / (stem + ext), folder / (stem + ext.upper())):
            if cand.is_file():
                return cand
    return None


def _scan_folder(root: Path, text_to_image: bool, problems: list[str]) -> list[Sample]:
    images_dir, control_dir = root / "images", root / "control"
    if not images_dir.is_dir():
        problems.append(f"{root}: no images/ folder (expected images/<stem>.png with control/<stem>.png and "
                        f"<stem>.txt, or a metadata.csv / .jsonl)")
        return []
    stems = sorted(p.stem for p in images_dir.iterdir()
                   if p.suffix.lower() in IMAGE_EXTS and not p.stem.endswith("_mask"))
    samples = []
    for stem in stems:
        image = _find_image(images_dir, stem)
        caption = next((c for c in (images_dir / f"{stem}.txt", root / "captions" / f"{stem}.txt",
                                    root / f"{stem}.txt") if c.is_file()), None)
        control = _find_image(control_dir, stem) if not text_to_image else None
        if caption is None:
            problems.append(f"{image}: no caption (expected {images_dir / (stem + '.txt')})")
        if not text_to_image and control is None:
            problems.append(f"{image}: no control image (expected {control_dir / (stem + '.png')} or .jpg/.webp)")
        if caption is not None and (text_to_image or control is not None):
            samples.append(Sample(stem, image, caption.read_text(encoding="utf-8").strip(), control,
                                  _find_image(images_dir, stem + "_mask")))
    if not text_to_image and control_dir.is_dir():
        for p in sorted(control_dir.iterdir()):
            if p.suffix.lower() in IMAGE_EXTS and p.stem not in stems:
                problems.append(f"{p}: control image without a target in {images_dir}")
    return samples


def _scan_metadata(file: Path, text_to_image: bool, problems: list[str]) -> list[Sample]:
    if file.suffix == ".csv":
        with open(file, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = []
        for i, line in enumerate(file.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    problems.append(f"{file}:{i + 1}: not valid JSON ({e})")
    samples = []
    for i, row in enumerate(rows):
        where = f"{file}:{i + 2 if file.suffix == '.csv' else i + 1}"
        ctrl = row.get("control") or row.get("kontext_images")
        missing = [k for k, v in (("image", row.get("image")), ("prompt", row.get("prompt")),
                                  ("control", ctrl if not text_to_image else "-")) if not v]
        if missing:
            problems.append(f"{where}: missing column(s) {missing}")
            continue
        paths = {k: file.parent / v for k, v in (("image", row["image"]), ("control", ctrl), ("mask", row.get("mask")))
                 if v and not (k == "control" and text_to_image)}
        absent = [str(p) for p in paths.values() if not p.is_file()]
        if absent:
            problems.append(f"{where}: file(s) not found: {absent}")
            continue
        samples.append(Sample(str(i), paths["image"], str(row["prompt"]).strip(), paths.get("control"),
                              paths.get("mask")))
    return samples


def scan_dataset(cfg: DataConfig) -> list[Sample]:
    """List the samples, or raise DatasetError naming every problem at once. Opens no image."""
    root = Path(cfg.path)
    problems: list[str] = []
    if not cfg.path or not root.exists():
        raise DatasetError(f"dataset {cfg.path!r} does not exist (expected a folder or a metadata.csv / .jsonl)")
    if root.is_dir() and not (root / "images").is_dir():
        meta = [root / n for n in ("metadata.csv", "metadata.jsonl") if (root / n).is_file()]
        root = meta[0] if meta else root
    samples = (_scan_folder(root, cfg.text_to_image, problems) if root.is_dir()
               else _scan_metadata(root, cfg.text_to_image, problems))
    if not samples and not problems:
        problems.append(f"{cfg.path}: the dataset is empty")
    if problems:
        raise DatasetError(f"{len(problems)} problem(s) in dataset {cfg.path}:\n  " + "\n  ".join(problems))
    return samples


def open_image(path: Path, mode: str = "RGB"):
    """Fully decode an image (a truncated file fails here, not mid-training)."""
    from PIL import Image

    if not Path(path).is_file():
        raise DatasetError(f"image file {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: unreadable or corrupt image ({e})") from None


def target_size(size_hw: tuple[int, int], cfg: DataConfig) -> tuple[int, int]:
    """Training size of an image: its own (or cfg.resize), shrunk to cfg.max_pixels, floored to 16."""
    h, w = cfg.resize if cfg.resize else size_hw
    if cfg.max_pixels and h * w > cfg.max_pixels:
        s = (cfg.max_pixels / (h * w)) ** 0.5
        h, w = int(h * s), int(w * s)
    return h // 16 * 16, w // 16 * 16


def validate_dataset(samples: list[Sample], cfg: DataConfig) -> None:
    """Decode every image once and check sizes; raise DatasetError listing every problem."""
    problems = []
    for s in samples:
        sizes = {}
        for name, path in (("image", s.image), ("control", s.control), ("mask", s.mask)):
            if path is None:
                continue
            try:
                im = open_image(path, "L" if name == "mask" else "RGB")
                sizes[name] = (im.height, im.width)
            except DatasetError as e:
                problems.append(str(e))
        for name in ("image", "control"):
            if name in sizes and min(target_size(sizes[name], cfg)) < 16:
                problems.append(f"{getattr(s, name)}: {sizes[name][1]}x{sizes[name][0]} is too small to encode "
                                f"(needs at least 16x16 pixels after resizing)")
        if "mask" in sizes and "image" in sizes and sizes["mask"] != sizes["image"]:
            problems.append(f"{s.mask}: mask is {sizes['mask'][1]}x{sizes['mask'][0]} but its image {s.image} "
                            f"is {sizes['image'][1]}x{sizes['image'][0]}")
    if problems:
        raise DatasetError(f"{len(problems)} problem(s) in dataset {cfg.path}:\n  " + "\n  ".join(problems))


def load_pixels(path: Path, cfg: DataConfig) -> torch.Tensor:
    """[1, 3, H, W] in [-1, 1] at target_size (encode.preprocess_image: Lanczos resize, as the pipeline)."""
    im = open_image(path)
    return preprocess_image(im, *target_size((im.height, im.width), cfg))


def load_mask(path: Path, latent_hw: tuple[int, int]) -> torch.Tensor:
    """[1, h, w] in [0, 1] at latent resolution (area average of the white = edit region)."""
    import numpy as np

    m = torch.from_numpy(np.asarray(open_image(path, "L"), dtype=np.float32) / 255.0)[None, None]
    return torch.nn.functional.interpolate(m, size=latent_hw, mode="area")[0]


# ---------------------------------------------------------------- the cache


def _file_digest(path: Path | None) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path else "-"


def sample_key(s: Sample, cfg: DataConfig, model_ident: str) -> str:
    """Content key: image / control / mask bytes, prompt, model identity and every preprocessing setting."""
    parts = [CACHE_VERSION, _file_digest(s.image), _file_digest(s.control), _file_digest(s.mask), s.prompt,
             model_ident, json.dumps([cfg.max_pixels, cfg.resize, cfg.max_sequence_length, cfg.text_to_image])]
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


def read_entry(path: Path, key: str, required: tuple[str, ...]) -> dict | None:
    """The cached tensors, or None when the file is missing, truncated, corrupt or not what the key says."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
        # Read the bytes, not a memory map: tensors must not change (or fault) if the file is rewritten later.
        tensors = safetensors.torch.load(path.read_bytes())
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None
    if any(k not in tensors or not torch.isfinite(tensors[k]).all() for k in required):
        return None
    return tensors


def required_keys(s: Sample) -> tuple[str, ...]:
    return ("image_latents", "prompt_embeds", "pooled_prompt_embeds") + (("control_latents",) if s.control else ()) \
        + (("mask",) if s.mask else ())


def encode_sample(s: Sample, cfg: DataConfig, c, device=None) -> dict:
    """Every cached tensor of one sample (batch dim dropped), computed with encode.py on the components' devices."""
    out = {"image_latents": encode_image(c.vae, load_pixels(s.image, cfg), device=device)[0]}
    if s.control is not None:
        out["control_latents"] = encode_image(c.vae, load_pixels(s.control, cfg), device=device)[0]
    embeds, pooled, _ = encode_prompt(c.clip, c.clip_tokenizer, c.t5, c.t5_tokenizer, s.prompt,
                                      max_sequence_length=cfg.max_sequence_length, device=device)
    out["prompt_embeds"], out["pooled_prompt_embeds"] = embeds[0], pooled[0]
    if s.mask is not None:
        out["mask"] = load_mask(s.mask, tuple(out["image_latents"].shape[1:]))
    return out


def encode_empty(cfg: DataConfig, c, device=None) -> dict:
    embeds, pooled, _ = encode_prompt(c.clip, c.clip_tokenizer, c.t5, c.t5_tokenizer, "",
                                      max_sequence_length=cfg.max_sequence_length, device=device)
    return {"empty_prompt_embeds": embeds[0], "empty_pooled_prompt_embeds": pooled[0]}


def cache_paths(samples: list[Sample], cfg: DataConfig, cache_dir: Path, model_ident: str) -> tuple[list[Path], Path]:
    """(one file per sample, the empty-prompt file): where build_cache keeps them, named by content."""
    cache_dir = Path(cache_dir)
    return ([cache_dir / f"{sample_key(s, cfg, model_ident)}.safetensors" for s in samples],
            cache_dir / f"empty-{empty_key(cfg, model_ident)}.safetensors")


def build_cache(samples: list[Sample], cfg: DataConfig, encoders, cache_dir: Path, model_ident: str,
                progress: bool = True) -> tuple[list[dict], dict]:
    """Every sample's cached tensors and the empty prompt's, each file read once; what is missing or corrupt is
    encoded and written. `encoders`: the loaded Components, or a function returning them, called only when
    something must be encoded (a fully cached run never loads the text encoders or the VAE)."""
    from tqdm import tqdm

    files, empty_file = cache_paths(samples, cfg, cache_dir, model_ident)
    entries = [read_entry(f, f.stem, required_keys(s)) for s, f in zip(samples, files)]
    empty = read_entry(empty_file, empty_file.stem, ("empty_prompt_embeds",))
    todo = [i for i, e in enumerate(entries) if e is None]
    if todo or empty is None:
        c = encoders() if callable(encoders) else encoders
        for i in tqdm(todo, desc="caching latents and embeddings", disable=not progress or not todo):
            entries[i] = encode_sample(samples[i], cfg, c, device="cpu")
            save_atomic(entries[i], files[i], {"key": files[i].stem, "source": str(samples[i].image)})
        if empty is None:
            empty = encode_empty(cfg, c, device="cpu")
            save_atomic(empty, empty_file, {"key": empty_file.stem})
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
    freed after. Uncached: encoders stay loaded on their devices and encode each sample when a batch needs it."""
    if not cfg.train.cached:
        encoders = load_components(cfg.model, which=("clip", "t5", "vae"))
        empty = encode_empty(cfg.data, encoders, device="cpu")
        train = OnTheFly(samples[:n_train], cfg.data, encoders)
        return TrainingData(train, OnTheFly(samples[n_train:], cfg.data, encoders), empty,
                            [train.shape(i) for i in range(n_train)], encoders.vae)
    ident = "|".join(model_identity(cfg.model, getattr(cfg.model, n), n) for n in ("clip", "t5", "vae"))
    cache_dir = Path(cfg.data.cache_dir or Path(cfg.out_dir) / "cache")
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
    shapes = [tuple(e["image_latents"].shape) + tuple(e.get("control_latents", torch.empty(0)).shape)
              for e in entries[:n_train]]
    return TrainingData(entries[:n_train], entries[n_train:], empty, shapes, None)


class OnTheFly:
    """Uncached mode: a sequence of samples encoded when indexed."""

    def __init__(self, samples: list[Sample], cfg: DataConfig, components):
        self.samples, self.cfg, self.c = samples, cfg, components

    def __getitem__(self, i: int) -> dict:
        return encode_sample(self.samples[i], self.cfg, self.c, device="cpu")

    def __len__(self) -> int:
        return len(self.samples)

    def shape(self, i: int) -> tuple:
        """The latent shapes encoding would give (read from the image headers, not by encoding)."""
        from PIL import Image

        out = ()
        for p in (self.samples[i].image, self.samples[i].control):
            if p is not None:
                with Image.open(p) as im:
                    h, w = target_size((im.height, im.width), self.cfg)
                out += (self.c.vae.config.latent_channels, h // 8, w // 8)
        return out
