"""Load each FLUX.1 Kontext component from its own source, onto its own device, in its own dtype.

Sources are diffusers folders or Hub repo ids (`from_pretrained(path, subfolder=...)`); components may come from
different sources (a 4-bit transformer beside bf16 text encoders). No accelerate hooks and no device_map: each
module goes exactly where its `Part` says. Quantized transformers (fp8 / 4-bit) are read by `quant.py`, which also
owns every look inside a checkpoint's files (config.json, safetensors headers): this file only chooses and places.
An IP-Adapter (model.ip_adapter: XLabs-AI/flux-ip-adapter's file, read with safetensors only) goes into the
transformer through diffusers' own loader, with its CLIP image encoder as a separate component.
"""

import contextlib
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
    """The six loaded pieces, and the IP-Adapter's image encoder with its feature extractor (model.ip_adapter). Any
    may be None (cached training loads only the transformer)."""

    clip: torch.nn.Module | None = None
    clip_tokenizer: object = None
    t5: torch.nn.Module | None = None
    t5_tokenizer: object = None
    vae: torch.nn.Module | None = None
    transformer: torch.nn.Module | None = None
    image_encoder: torch.nn.Module | None = None  # CLIPVisionModelWithProjection
    feature_extractor: object = None  # CLIPImageProcessor


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
    if not folder.is_dir() and not (part and part.subfolder) and classes and (root / "config.json").is_file():
        folder, sub = root, ""  # the component's own folder (train.mode full's <out_dir>/transformer)
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


PARTS = {"clip": ("clip", "clip_tokenizer"), "t5": ("t5", "t5_tokenizer"), "vae": ("vae",),
         "transformer": ("transformer",)}


def check_model(cfg: ModelConfig, which: tuple[str, ...] = ("clip", "t5", "vae", "transformer")) -> None:
    """Every local component folder of `which` and its config.json (model type included), checked without reading
    a weight: a typo in a path fails here, before a run touches its folder or loads anything. Hub ids are checked
    when they load."""
    for part in which:
        for name in PARTS[part]:
            _resolve(cfg, getattr(cfg, part), name)


def transformer_skeleton(cfg: ModelConfig):
    """The FluxTransformer2DModel of cfg's transformer config.json on the meta device (module names and Linear
    shapes, no memory, no weights), or None when that config is not on disk (a Hub id not yet downloaded). LoRA
    files and checkpoints are checked against it before the real weights load."""
    from diffusers import FluxTransformer2DModel

    path, sub = _resolve(cfg, cfg.transformer, "transformer")
    if _is_local(path):
        file = Path(path).expanduser() / sub / "config.json"
    else:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(path, f"{sub}/config.json" if sub else "config.json")
        if not isinstance(found, str):
            return None
        file = Path(found)
    conf = quant.read_config(file.parent, "transformer")
    with torch.device("meta"):
        return FluxTransformer2DModel.from_config({k: v for k, v in conf.items() if k != "quantization_config"})


# transformers >= 5.25 "kernelizes" every model it loads (use_kernels defaults to on): layers it maps (CLIP's QuickGELU,
# T5's NewGELU) get forwards downloaded from the Hub's kernels-community repos when the model is on CUDA, and the load
# fails outright when the PyPI `kernels` package is missing. Our loaders read on the CPU and then move (_place), so it
# would find no CPU kernel and fall back anyway; we turn it off by name so that no load ever reaches the network, none
# depends on that package, and the text encoders run the same torch code on every device (README: Hub kernels).
NO_HUB_KERNELS = {"use_kernels": False}


def _from_pretrained(cls, name: str, path: str, sub: str, **kw):
    # no subfolder: each library's own default (transformers 5.24 fails on subfolder=None: os.path.join(None, ...))
    try:
        return cls.from_pretrained(path, **({"subfolder": sub} if sub else {}), **kw)
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
    return _place(_from_pretrained(CLIPTextModel, "clip", path, sub, dtype=DTYPES[cfg.clip.dtype],
                                   **NO_HUB_KERNELS), cfg.clip, "clip")


def load_clip_tokenizer(cfg: ModelConfig):
    from transformers import CLIPTokenizer

    path, sub = _resolve(cfg, cfg.clip, "clip_tokenizer")
    return _from_pretrained(CLIPTokenizer, "clip_tokenizer", path, sub)


def load_t5(cfg: ModelConfig):
    from transformers import T5EncoderModel

    parse_dtype(cfg.t5.dtype, "t5")
    path, sub = _resolve(cfg, cfg.t5, "t5")
    t5 = _from_pretrained(T5EncoderModel, "t5", path, sub, dtype=DTYPES[cfg.t5.dtype], **NO_HUB_KERNELS)
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


def hub_file(repo: str, filename: str, name: str) -> Path:
    """One file of a Hub repo (`filename` may hold a subfolder) through the Hugging Face cache, downloaded on first
    use; with HF_HUB_OFFLINE=1 the cache only."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as e:  # offline without a cached copy, unknown or gated repo, network: all say the same
        raise ValueError(f"{name}: could not get {filename!r} from {repo!r} on the Hugging Face Hub or its cache: "
                         f"{type(e).__name__}: {e}. Download it first (hf download {repo} {filename}), or pass a "
                         f"local folder as the path") from e


def load_transformer(cfg: ModelConfig):
    """The FluxTransformer2DModel: as stored, or with its Linears replaced by our fp8 / 4-bit ones (quant.py), with
    the IP-Adapter of model.ip_adapter when its path is set (load_ip_adapter).
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
        model = quant.load_quantized_transformer(Path(path) / sub, cfg.quant, dtype, device, cfg.fp8_scales)
    else:
        model = _from_pretrained(FluxTransformer2DModel, "transformer", path, sub, dtype=dtype)
        model = model.to(device).eval().requires_grad_(False)
    if cfg.ip_adapter.path:
        load_ip_adapter(model, cfg)  # after placing: the adapter takes the model's compute dtype and device
    return model


# ---------------------------------------------------------------- IP-Adapter

# FluxIPAdapterMixin.load_ip_adapter's split of a .safetensors file (diffusers 0.42 loaders/ip_adapter.py; inline
# there, no function to call): keys under these prefixes go to state["image_proj"] / state["ip_adapter"].
IP_IMAGE_PROJ_PREFIXES = ("ip_adapter_proj_model.", "image_proj.")
IP_ATTN_PREFIXES = ("double_blocks.", "ip_adapter.")
IP_EXPECTED = ("ip_adapter_proj_model.{proj,norm}.{weight,bias} and, per double block i, "
               "double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias} "
               "(XLabs-AI/flux-ip-adapter's layout; diffusers' image_proj.* / ip_adapter.{i}.to_{k,v}_ip.* "
               "are read too)")


def split_ip_adapter(state: dict, where: str) -> dict:
    """XLabs-keyed IP-Adapter tensors -> {"image_proj": {"proj.weight", ...}, "ip_adapter": {"{i}.to_k_ip.weight",
    ...}}, the state dict diffusers' `_load_ip_adapter_weights` takes: the first name component dropped,
    ip_adapter_double_stream_{k,v}_proj renamed to_{k,v}_ip and "processor." removed, as diffusers does. A key
    under neither prefix, which diffusers drops silently, is refused: the file is not the layout we expect."""
    out = {"image_proj": {}, "ip_adapter": {}}
    other = []
    for key, tensor in state.items():
        rest = key.split(".", 1)[-1]
        if key.startswith(IP_IMAGE_PROJ_PREFIXES):
            out["image_proj"][rest] = tensor
        elif key.startswith(IP_ATTN_PREFIXES):
            rest = (rest.replace("ip_adapter_double_stream_k_proj", "to_k_ip")
                    .replace("ip_adapter_double_stream_v_proj", "to_v_ip").replace("processor.", ""))
            out["ip_adapter"][rest] = tensor
        else:
            other.append(key)
    if not out["image_proj"] and not out["ip_adapter"]:
        raise ValueError(f"ip_adapter: {where} holds no IP-Adapter keys (found {sorted(state)[:4]}...); expected "
                         f"{IP_EXPECTED}")
    if other:
        raise ValueError(f"ip_adapter: {where}: unexpected keys {sorted(other)[:4]} ({len(other)} in all); expected "
                         f"only {IP_EXPECTED}")
    return out


def _check_ip_adapter(split: dict, transformer, where: str) -> None:
    """Every key `_load_ip_adapter_weights` reads, of the shape it builds for `transformer`, and no other."""
    joint, inner, n = transformer.config.joint_attention_dim, transformer.inner_dim, transformer.config.num_layers
    proj = split["image_proj"].get("proj.weight")
    # diffusers' token count: 16 when proj.weight has 65536 rows, else 4 (_convert_ip_adapter_image_proj_to_diffusers)
    tokens = 16 if proj is not None and proj.shape[0] == 65536 else 4
    want = {"image_proj": {"proj.weight": (tokens * joint, proj.shape[-1] if proj is not None else "D"),
                           "proj.bias": (tokens * joint,), "norm.weight": (joint,), "norm.bias": (joint,)},
            "ip_adapter": {f"{i}.to_{kv}_ip.{p}": (inner, joint) if p == "weight" else (inner,)
                           for i in range(n) for kv in "kv" for p in ("weight", "bias")}}
    dims = (f"for a transformer with {n} double blocks, inner_dim {inner}, joint_attention_dim {joint}; "
            f"expected {IP_EXPECTED}")
    for group, shapes in want.items():
        missing, extra = sorted(shapes.keys() - split[group].keys()), sorted(split[group].keys() - shapes.keys())
        if missing or extra:
            raise ValueError(f"ip_adapter: {where}: {group} keys (diffusers' names) missing {missing[:4]}, unexpected "
                             f"{extra[:4]} {dims}")
        for key, shape in shapes.items():
            if tuple(split[group][key].shape) != shape:
                raise ValueError(f"ip_adapter: {where}: {group} {key} has shape {tuple(split[group][key].shape)}, "
                                 f"expected {shape} {dims}")


@contextlib.contextmanager
def _reporting(model, dtype: torch.dtype, device: torch.device):
    """Inside, `model.dtype` and `model.device` read (dtype, device). diffusers' _load_ip_adapter_weights builds and
    casts the adapter with them, and ModelMixin derives both from the first floating parameter, which in a quantized
    model may be fp8 codes (or, with no floating one before it, uint8 4-bit codes): the adapter would be cast to
    fp8 or garbage. A subclass for this one instance, undone after; other models of the class are untouched."""
    cls = type(model)
    model.__class__ = type(cls.__name__, (cls,), {"dtype": property(lambda self: dtype),
                                                  "device": property(lambda self: device)})
    try:
        yield
    finally:
        model.__class__ = cls


def ip_processors(transformer) -> list:
    """The IP-Adapter's attention processors (diffusers' FluxIPAdapterAttnProcessor, one per double block)."""
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    return [p for p in transformer.attn_processors.values() if isinstance(p, FluxIPAdapterAttnProcessor)]


def add_ip_adapter(transformer, state: dict, scale: float = 1.0, where: str = "the IP-Adapter state dict"):
    """Load XLabs-keyed IP-Adapter tensors (read_ip_adapter, fixtures.random_ip_adapter_state) into `transformer` with
    diffusers' `_load_ip_adapter_weights`, as FluxKontextPipeline.load_ip_adapter does: FluxIPAdapterAttnProcessor
    (holding to_k_ip / to_v_ip) in every double block, a fresh processor of the same class in every single block,
    encoder_hid_proj = MultiIPAdapterImageProjection. Every processor is replaced, so an attention backend set
    before is lost: set_attention (kontext_kernels/attention.py) comes after. The adapter's weights take the transformer's
    compute dtype and device (x_embedder's), are frozen, and get `scale` (set_ip_adapter_scale's per-block list)."""
    split = split_ip_adapter(state, where)
    _check_ip_adapter(split, transformer, where)
    w = transformer.x_embedder.weight
    with _reporting(transformer, w.dtype, w.device):
        # low_cpu_mem_usage: the pipeline's default (with accelerate); it builds on the meta device and fills in place
        transformer._load_ip_adapter_weights([split], low_cpu_mem_usage=True)
    # without accelerate diffusers builds the image projection in fp32 on the CPU and says so; this puts it in place
    transformer.encoder_hid_proj.to(device=w.device, dtype=w.dtype).requires_grad_(False)
    for p in ip_processors(transformer):
        p.requires_grad_(False)
        p.scale = [scale]  # one entry per adapter (diffusers' set_ip_adapter_scale)
    return transformer


def ip_adapter_file(cfg: ModelConfig) -> Path:
    """model.ip_adapter's weight file: `weight_name` (in `subfolder`) of a local folder, or of a Hub repo through the
    Hugging Face cache. Only .safetensors: a pickled .bin / .pt would run code when read."""
    ipa = cfg.ip_adapter
    if not ipa.weight_name.endswith(".safetensors"):
        raise ValueError(f"model.ip_adapter.weight_name: {ipa.weight_name!r}; expected a .safetensors file (pickled "
                         f".bin / .pt files are not read)")
    rel = f"{ipa.subfolder.strip('/')}/{ipa.weight_name}" if ipa.subfolder else ipa.weight_name
    if not _is_local(ipa.path):
        return hub_file(ipa.path, rel, "ip_adapter")
    file = Path(ipa.path).expanduser() / rel
    if not file.is_file():
        raise ValueError(f"ip_adapter: {str(file)!r} does not exist (expected model.ip_adapter.path to be a folder "
                         f"holding {rel}, or a Hub repo id like 'XLabs-AI/flux-ip-adapter')")
    return file


def read_ip_adapter(file: Path) -> dict:
    """The adapter file's tensors, by their names in the file, on the CPU (safetensors only)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except (OSError, SafetensorError) as e:
        raise ValueError(f"ip_adapter: {str(file)!r} is not a readable .safetensors file: {e}") from e


def load_ip_adapter(transformer, cfg: ModelConfig):
    """model.ip_adapter's adapter, read from its file (ip_adapter_file) into `transformer` (add_ip_adapter) at
    model.ip_adapter.scale. Equals FluxKontextPipeline.load_ip_adapter(path, weight_name, subfolder) on the same
    transformer, then set_ip_adapter_scale(scale) (tests/test_ip_adapter.py)."""
    file = ip_adapter_file(cfg)
    return add_ip_adapter(transformer, read_ip_adapter(file), cfg.ip_adapter.scale, repr(str(file)))


@contextlib.contextmanager
def _quiet_load_report():
    # transformers logs a table of unexpected keys when a CLIPModel checkpoint (openai/clip-vit-large-patch14's
    # layout) is read as its vision tower: the text tower's keys, expected. Missing keys are checked by the caller and
    # mismatched ones raise. A filter on that one record: raising the logger's level instead makes transformers 5.24
    # log its tensor-parallel plan check (modeling_utils: `if logger.level >= logging.WARNING: verify_tp_plan`).
    import logging

    log = logging.getLogger("transformers.modeling_utils")

    def drop(record):
        return "LOAD REPORT" not in record.getMessage()

    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def load_image_encoder(cfg: ModelConfig):
    """(CLIPVisionModelWithProjection, CLIPImageProcessor) of model.ip_adapter on its device and dtype, eval, frozen.
    The encoder folder (or repo id) may be a full CLIPModel checkpoint (openai/clip-vit-large-patch14): its vision
    tower and projection are read. The feature extractor is the one diffusers' load_ip_adapter creates for a
    pipeline without one, CLIPImageProcessor(size=image_size, crop_size=image_size) (for image_size 224 what
    openai's preprocessor_config.json holds), so embeddings equal the pipeline's."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    ipa = cfg.ip_adapter
    dtype = parse_dtype(ipa.dtype, "ip_adapter")
    parse_device(ipa.device, "ip_adapter")
    path, sub = ipa.image_encoder, ipa.image_encoder_subfolder
    if not path:
        raise ValueError("model.ip_adapter.image_encoder: empty; expected a CLIP vision folder or Hub repo id such as "
                         "'openai/clip-vit-large-patch14'")
    if _is_local(path) and not (Path(path).expanduser() / sub / "config.json").is_file():
        raise ValueError(f"image_encoder: {str(Path(path).expanduser() / sub / 'config.json')!r} does not exist "
                         f"(expected model.ip_adapter.image_encoder (+ image_encoder_subfolder) to be a CLIP folder)")
    try:
        with _quiet_load_report():
            enc, info = _from_pretrained(CLIPVisionModelWithProjection, "image_encoder", path, sub, dtype=dtype,
                                         output_loading_info=True, **NO_HUB_KERNELS)
    except RuntimeError as e:  # transformers raises size mismatches as RuntimeError
        raise ValueError(f"image_encoder: could not load CLIPVisionModelWithProjection from {path!r} subfolder "
                         f"{sub!r} (a CLIPModel config.json needs projection_dim inside vision_config): {e}") from e
    if info["missing_keys"]:
        raise ValueError(f"image_encoder: {path!r} subfolder {sub!r} lacks {sorted(info['missing_keys'])[:4]} "
                         f"({len(info['missing_keys'])} in all); expected a CLIPVisionModelWithProjection or CLIPModel "
                         f"checkpoint")
    enc = _place(enc, Part(device=ipa.device), "ip_adapter")
    size = enc.config.image_size
    return enc, CLIPImageProcessor(size=size, crop_size=size)


def load_components(cfg: ModelConfig, which: tuple[str, ...] = ("clip", "t5", "vae", "transformer")) -> Components:
    """Load the named components (tokenizers come with their encoders), each onto its configured device; with
    model.ip_adapter.path set, the image encoder and feature extractor come with any of clip, t5, vae."""
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
    if cfg.ip_adapter.path and set(which) & {"clip", "t5", "vae"}:
        # an encoder, loaded with the others (caching, sampling); a transformer-only load (cached training) skips it
        c.image_encoder, c.feature_extractor = load_image_encoder(cfg)
    return c


def _digest_folder(h, folder: Path) -> None:
    # Hashing 10-20 GB of weights per run is too slow; the header (names, shapes, offsets), the size and the first
    # and last 4 MiB of each weight file tell two checkpoints apart, random tiny ones included.
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.json")):
        with open(f, "rb") as fh:
            h.update(f.name.encode() + fh.read(4 << 20))
            fh.seek(max(0, f.stat().st_size - (4 << 20)))
            h.update(fh.read())


def model_identity(cfg: ModelConfig, part: Part, name: str) -> str:
    """A string naming the weights a component was loaded from (for cache keys): path, subfolder and, for a
    local folder, a digest of its files so a rewritten checkpoint changes the key. The VAE's identity also names
    the IP-Adapter's image encoder when model.ip_adapter.path is set: it embeds each sample's image beside the
    VAE's latents (cache.py keys an entry by the clip | t5 | vae identities)."""
    import hashlib

    path, sub = _resolve(cfg, part, name)
    h = hashlib.sha256(f"{path}/{sub}:{part.dtype}".encode())
    # options that change what the component computes (absent when off, so older cache keys stay valid)
    if name == "t5" and cfg.t5_quant != "none":
        h.update(f"quant={cfg.t5_quant}".encode())
    if name == "vae" and cfg.vae_tile:
        h.update(f"tile={cfg.vae_tile}".encode())
    ipa = cfg.ip_adapter
    if name == "vae" and ipa.path:  # the adapter file does not matter: its projection runs inside the transformer
        h.update(f"ip_image_encoder={ipa.image_encoder}/{ipa.image_encoder_subfolder}:{ipa.dtype}".encode())
    if _is_local(path):
        _digest_folder(h, Path(path) / sub)
    if name == "vae" and ipa.path and _is_local(ipa.image_encoder):
        _digest_folder(h, Path(ipa.image_encoder).expanduser() / ipa.image_encoder_subfolder)
    return h.hexdigest()
