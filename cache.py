"""The content-keyed cache of latents and prompt embeddings, and training_data() for cached and uncached runs.

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
Verifying the cached tensors' sha256 on read costs ~7 ms per 1024^2 entry (5 MB of bf16). The image hashes in the
keys come from the stat index (images.py); the samples from data.py.
"""

import dataclasses
import gc
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
import safetensors.torch
from safetensors.torch import save_file

from atomic import temp_beside, user_mode
from config import Config, DataConfig
from data import Sample
from encode import encode_image, encode_ip_image, encode_prompt
from images import (BLACK, StatIndex, _checked_size, file_digest, load_mask, load_pixels, open_image, read_index,
                    target_size, write_index)
from load import load_components, model_identity

CACHE_VERSION = "4"  # bump when the cached tensors' meaning or the file format changes (2: tensor_digest in metadata;
#                      3: _decode applies EXIF orientation, scales 16-bit, composites transparency; 4: masks are
#                      thresholded at 0.5 before the area average)


def cache_dir_of(cfg: Config) -> Path:
    return Path(cfg.data.cache_dir or Path(cfg.out_dir) / "cache")


# ---------------------------------------------------------------- the cache


def sample_key(s: Sample, cfg: DataConfig, model_ident: str, idx: StatIndex | None = None) -> str:
    """Content key: image / control / mask bytes, prompt, model identity and every preprocessing setting. The
    file hashes come from idx where it knows the file under its current stat (else the file is read)."""
    idx = StatIndex() if idx is None else idx
    # further references and depth only when there are some: other samples keep the key they always had
    digests = [file_digest(p, idx) for p in (s.image, s.control, s.mask, *s.extra_controls)]
    digests += [f"depth:{file_digest(s.depth, idx)}"] if s.depth is not None else []
    settings = [cfg.max_pixels, cfg.resize, cfg.max_sequence_length, cfg.text_to_image, list(cfg.background)]
    settings += [f"bucket={cfg.bucket}"] if cfg.bucket != "native" else []  # native keys stay what they were
    parts = [CACHE_VERSION, *digests, s.prompt, model_ident, json.dumps(settings)]
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()[:32]


def empty_key(cfg: DataConfig, model_ident: str) -> str:
    return hashlib.sha256(f"{CACHE_VERSION}\x00empty\x00{model_ident}\x00{cfg.max_sequence_length}".encode()
                          ).hexdigest()[:32]


def save_atomic(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors to a temp file in the same folder, fsync, then rename: a crash never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        user_mode(tmp)
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
    the VAE), and ignored otherwise (validate.conditioning_check says so)."""
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
