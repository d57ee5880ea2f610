"""Load each FLUX.1 Kontext component from its own source, onto its own device, in its own dtype.

Sources are diffusers folders or Hub repo ids (`from_pretrained(path, subfolder=...)`); components may come from
different sources (a 4-bit transformer beside bf16 text encoders). No accelerate hooks and no device_map: each
module goes exactly where its `Part` says. Quantized transformers (fp8 / 4-bit) are read by `quant.py`, which also
owns every look inside a checkpoint's files (config.json, safetensors headers): this file only chooses and places.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

import quant
from config import ModelConfig, Part

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}

# component name -> (default subfolder, the class names its config.json may give; None: a tokenizer, not checked)
_EXPECTED = {
    "clip": ("text_encoder", {"CLIPTextModel", "CLIPTextModelWithProjection"}),
    "clip_tokenizer": ("tokenizer", None),
    "t5": ("text_encoder_2", {"T5EncoderModel"}),
    "t5_tokenizer": ("tokenizer_2", None),
    "vae": ("vae", {"AutoencoderKL"}),
    "transformer": ("transformer", {"FluxTransformer2DModel"}),
}


@dataclass
class Components:
    """The six loaded pieces. Any may be None (cached training loads only the transformer)."""

    clip: torch.nn.Module | None = None
    clip_tokenizer: object = None
    t5: torch.nn.Module | None = None
    t5_tokenizer: object = None
    vae: torch.nn.Module | None = None
    transformer: torch.nn.Module | None = None


def parse_dtype(name: str, what: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{what}: unknown dtype {name!r}; expected one of {sorted(set(DTYPES))}")
    return DTYPES[name]


def parse_device(name: str, what: str) -> torch.device:
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"{what}: bad device {name!r} (expected 'cpu', 'cuda:0', ...): {e}") from None


def _is_local(path: str) -> bool:
    # A Hub id is "org/name"; anything that exists, is absolute, or starts with "." is a local path.
    return Path(path).exists() or path.startswith((".", "/", "~")) or path.count("/") != 1


def _resolve(cfg: ModelConfig, part: Part | None, name: str) -> tuple[str, str]:
    """(path, subfolder) of a component, checked early when local: missing folders and wrong model types."""
    path = (part.path if part and part.path else cfg.path)
    default_sub, classes = _EXPECTED[name]
    # a Part's subfolder names its model; the tokenizer beside it keeps the diffusers default subfolder
    sub = part.subfolder if part and part.subfolder and classes is not None else default_sub
    if not path:
        raise ValueError(f"{name}: no path given (set model.path or model.{name.split('_')[0]}.path)")
    if not _is_local(path):
        return path, sub
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"{name}: path {str(root)!r} does not exist (expected a diffusers FLUX.1 Kontext folder "
                         f"or a Hub repo id like 'black-forest-labs/FLUX.1-Kontext-dev')")
    folder = root / sub if sub else root
    if not folder.is_dir():
        raise ValueError(f"{name}: {str(root)!r} has no subfolder {sub!r} (expected the diffusers layout with "
                         f"{sub}/ inside; set model.{name.split('_')[0]}.subfolder if it lives elsewhere)")
    if classes is not None:
        conf = quant.read_config(folder, name, "/".join(sorted(classes)))
        found = {conf.get("_class_name"), *conf.get("architectures", [])} - {None}
        if not found & classes:
            raise ValueError(f"{name}: {str(folder / 'config.json')!r} describes "
                             f"{sorted(found) or 'an unknown model'}; expected {'/'.join(sorted(classes))}")
    return str(root), sub


def _from_pretrained(cls, name: str, path: str, sub: str, **kw):
    try:
        return cls.from_pretrained(path, subfolder=sub or None, **kw)
    except (OSError, ValueError) as e:
        raise ValueError(f"{name}: could not load {cls.__name__} from {path!r} subfolder {sub!r}: {e}") from e


def _place(module: torch.nn.Module, part: Part, name: str) -> torch.nn.Module:
    # the dtype was set by from_pretrained(dtype=...); a second cast here would only trigger diffusers' warning
    module.to(device=parse_device(part.device, name))
    return module.eval().requires_grad_(False)


def load_clip(cfg: ModelConfig):
    from transformers import CLIPTextModel

    parse_dtype(cfg.clip.dtype, "clip")
    path, sub = _resolve(cfg, cfg.clip, "clip")
    return _place(_from_pretrained(CLIPTextModel, "clip", path, sub, dtype=DTYPES[cfg.clip.dtype]), cfg.clip, "clip")


def load_clip_tokenizer(cfg: ModelConfig):
    from transformers import CLIPTokenizer

    path, sub = _resolve(cfg, cfg.clip, "clip_tokenizer")
    return _from_pretrained(CLIPTokenizer, "clip_tokenizer", path, sub)


def load_t5(cfg: ModelConfig):
    from transformers import T5EncoderModel

    parse_dtype(cfg.t5.dtype, "t5")
    path, sub = _resolve(cfg, cfg.t5, "t5")
    t5 = _from_pretrained(T5EncoderModel, "t5", path, sub, dtype=DTYPES[cfg.t5.dtype])
    if cfg.t5_quant == "fp8":
        t5 = quant.quantize_t5_fp8(t5)  # on the host, before placing: the GPU never holds the bf16 copy
    return _place(t5, cfg.t5, "t5")


def load_t5_tokenizer(cfg: ModelConfig):
    from transformers import T5TokenizerFast

    path, sub = _resolve(cfg, cfg.t5, "t5_tokenizer")
    return _from_pretrained(T5TokenizerFast, "t5_tokenizer", path, sub)


def load_vae(cfg: ModelConfig):
    from diffusers import AutoencoderKL

    parse_dtype(cfg.vae.dtype, "vae")
    path, sub = _resolve(cfg, cfg.vae, "vae")
    vae = _place(_from_pretrained(AutoencoderKL, "vae", path, sub, dtype=DTYPES[cfg.vae.dtype]), cfg.vae, "vae")
    if cfg.vae_tile:
        # diffusers tiles only images larger than tile_sample_min_size (config.sample_size: 1024 for FLUX, so a
        # 1-2 MP image would hardly tile); tiles overlap by 1/4 and are blended
        vae.enable_tiling()
        vae.tile_sample_min_size = cfg.vae_tile
        vae.tile_latent_min_size = cfg.vae_tile // 2 ** (len(vae.config.block_out_channels) - 1)
    return vae


def hub_snapshot(repo: str, sub: str, name: str) -> Path:
    """The local snapshot of a Hub repo in the Hugging Face cache, downloading only `sub/` (and the repo's top-level
    json) on first use; with HF_HUB_OFFLINE=1 the cache only. A quantized transformer is read from its files
    (quant.py), so a repo id must become a folder first; from_pretrained would fetch the same files."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=[f"{sub}/*", "*.json"] if sub else None))
    except Exception as e:  # offline without a cached copy, unknown or gated repo, network: all say the same
        raise ValueError(f"{name}: could not get {repo!r} (subfolder {sub!r}) from the Hugging Face Hub or its cache: "
                         f"{type(e).__name__}: {e}. Download it first (hf download {repo} --include '{sub}/*'), "
                         f"or pass a local folder as the path") from e


def load_transformer(cfg: ModelConfig):
    """The FluxTransformer2DModel: as stored, or with its Linears replaced by our fp8 / 4-bit ones (quant.py).
    A Hub id is resolved to its cached snapshot first, so pre-quantized repos and quantize-at-load work by id."""
    from diffusers import FluxTransformer2DModel

    dtype = parse_dtype(cfg.transformer.dtype, "transformer")
    path, sub = _resolve(cfg, cfg.transformer, "transformer")
    if not _is_local(path):
        snapshot = str(hub_snapshot(path, sub, "transformer"))
        part = dataclasses.replace(cfg.transformer, path=snapshot)
        path, sub = _resolve(dataclasses.replace(cfg, transformer=part), part, "transformer")  # the local checks
    device = parse_device(cfg.transformer.device, "transformer")
    if cfg.offload:  # stays in host memory: offload.py moves the non-block parts and the resident blocks
        device = torch.device("cpu")
    if cfg.quant != "none" or quant.is_quantized_checkpoint(Path(path) / sub):
        return quant.load_quantized_transformer(Path(path) / sub, cfg.quant, dtype, device, cfg.fp8_scales)
    model = _from_pretrained(FluxTransformer2DModel, "transformer", path, sub, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def load_components(cfg: ModelConfig, which: tuple[str, ...] = ("clip", "t5", "vae", "transformer")) -> Components:
    """Load the named components (tokenizers come with their encoders), each onto its configured device."""
    unknown = set(which) - {"clip", "t5", "vae", "transformer"}
    if unknown:
        raise ValueError(f"load_components: unknown component(s) {sorted(unknown)}; expected clip, t5, vae, transformer")
    c = Components()
    if "clip" in which:
        c.clip, c.clip_tokenizer = load_clip(cfg), load_clip_tokenizer(cfg)
    if "t5" in which:
        c.t5, c.t5_tokenizer = load_t5(cfg), load_t5_tokenizer(cfg)
    if "vae" in which:
        c.vae = load_vae(cfg)
    if "transformer" in which:
        c.transformer = load_transformer(cfg)
    return c


def model_identity(cfg: ModelConfig, part: Part, name: str) -> str:
    """A string naming the weights a component was loaded from (for cache keys): path, subfolder and, for a
    local folder, a digest of its files so a rewritten checkpoint changes the key."""
    import hashlib

    path, sub = _resolve(cfg, part, name)
    h = hashlib.sha256(f"{path}/{sub}:{part.dtype}".encode())
    # options that change what the component computes (absent when off, so older cache keys stay valid)
    if name == "t5" and cfg.t5_quant != "none":
        h.update(f"quant={cfg.t5_quant}".encode())
    if name == "vae" and cfg.vae_tile:
        h.update(f"tile={cfg.vae_tile}".encode())
    if _is_local(path):
        # Hashing 10-20 GB of weights per run is too slow; the header (names, shapes, offsets), the size and the
        # first and last 4 MiB of each weight file tell two checkpoints apart, random tiny ones included.
        for f in sorted((Path(path) / sub).glob("*.safetensors")) + sorted((Path(path) / sub).glob("*.json")):
            with open(f, "rb") as fh:
                h.update(f.name.encode() + fh.read(4 << 20))
                fh.seek(max(0, f.stat().st_size - (4 << 20)))
                h.update(fh.read())
    return h.hexdigest()
