"""Every config dataclass and its defaults, in one place, the `--config file.py` + tyro flag loader, and
`validate(cfg)`, which checks a whole config before any work starts.

A config file is python that defines `config = Config(...)` (see configs/). Flags override its fields:
`python train.py --config configs/fp8.py --train.lr 2e-5`. Unknown flags and unknown fields fail, and so does a
value of the wrong type or out of range (all problems listed in one ValueError).

The ground floor of the import order: this file imports no project module, so every other file may import it.
"""

import dataclasses
import json
import runpy
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union, get_args, get_origin

__all__ = ["Config", "DataConfig", "TrainConfig", "SampleConfig", "ModelConfig", "Part", "IPAdapterConfig",
           "load_config", "cli", "validate", "to_json"]

# Choice values, mirroring the tables their consumers read (tests/test_config.py checks that they agree).
Dtype = Literal["fp32", "bf16", "fp16", "float32", "bfloat16", "float16"]  # load.DTYPES
Quant = Literal["none", "fp8", "nf4", "fp4"]  # quant.QUANTS
# kontext_kernels.attention.BACKENDS; cudnn_fp8: fp8 attention on Hopper (pip install nvidia-cudnn-frontend)
AttentionBackend = Literal["auto", "cudnn", "cudnn_fp8", "cudnn_torch", "flash", "efficient", "math", "default"]


@dataclass
class Part:
    """Where one model component comes from and where it lives. Empty `path` means ModelConfig.path."""

    path: str = ""  # diffusers folder or Hub repo id to read this component from (its subfolder); empty: model.path
    subfolder: str = ""  # empty: the diffusers default (text_encoder, tokenizer, text_encoder_2, ...)
    dtype: Dtype = "bf16"  # weights' dtype (fp32 / bf16 / fp16; the long names are the same)
    device: str = "cpu"  # a torch device: "cpu", "cuda:0", "cuda:1", ...


@dataclass
class IPAdapterConfig:
    """An IP-Adapter (diffusers' Flux IP-Adapter: XLabs-AI/flux-ip-adapter's file layout) and the CLIP image encoder
    that embeds its images. Empty `path`: none. The adapter's weights take the transformer's dtype and device and
    stay frozen; the image encoder has its own (it runs only while caching and sampling)."""

    path: str = ""  # folder or Hub repo id holding `weight_name` (XLabs-AI/flux-ip-adapter); empty: no IP-Adapter
    weight_name: str = "ip_adapter.safetensors"  # the adapter's file in `path` (safetensors only)
    subfolder: str = ""  # of `path`, where weight_name lives
    # CLIPVisionModelWithProjection folder or repo id (the XLabs adapter was trained with openai/clip-vit-large-patch14)
    image_encoder: str = "openai/clip-vit-large-patch14"
    image_encoder_subfolder: str = ""  # of image_encoder
    dtype: Dtype = "bf16"  # the image encoder's dtype
    device: str = "cpu"  # the image encoder's device
    scale: float = 1.0  # the adapter's strength in every double block (diffusers' set_ip_adapter_scale)


@dataclass
class ModelConfig:
    # A local diffusers folder, or a Hub repo id (read from the Hugging Face cache; downloaded on first use, and a
    # gated repo needs its license accepted and `hf auth login`). Without network set HF_HUB_OFFLINE=1 to fail fast.
    path: str = "black-forest-labs/FLUX.1-Kontext-dev"
    clip: Part = field(default_factory=Part)  # CLIP text encoder (text_encoder/, tokenizer/): pooled prompt embeds
    t5: Part = field(default_factory=Part)  # T5 text encoder (text_encoder_2/, tokenizer_2/): prompt embeds
    vae: Part = field(default_factory=Part)  # autoencoder (vae/): image latents, decoded validation grids
    transformer: Part = field(default_factory=Part)  # the FluxTransformer2DModel (transformer/) the LoRA trains
    # Transformer weights: "none" (as stored), "fp8" (e4m3 + per-row scale), "nf4" / "fp4" (bnb 4-bit layout).
    # Pre-quantized checkpoints are detected from their files; this quantizes a bf16 one at load time.
    quant: Quant = "none"
    fp8_scales: str = ""  # optional safetensors of per-layer scales for a scaled-fp8 export that lost them
    # Small GPUs: stream the transformer's frozen block weights from host memory to transformer.device, block by
    # block on a side stream (offload.py), keeping the first `resident_blocks` of the 57 on the GPU. Training with it
    # needs train.gradient_checkpointing (the recompute is what lets a block's weights leave the GPU).
    offload: bool = False  # stream the transformer's block weights from host memory (offload.py)
    resident_blocks: int = 0  # with offload: this many blocks, first in execution order, stay on the GPU
    t5_quant: Literal["none", "fp8"] = "none"  # fp8: T5's block Linears stored e4m3 per row (weight-only)
    vae_tile: int = 0  # >0: tiled VAE encode/decode in tiles of this many pixels (diffusers' enable_tiling); 0: off
    # image conditioning (e.g. a depth map) through an IP-Adapter: load.py loads it into the transformer, cache.py
    # embeds each sample's depth image, sample.py takes --ip-image
    ip_adapter: IPAdapterConfig = field(default_factory=IPAdapterConfig)


@dataclass
class DataConfig:
    path: str = ""  # required: a folder (images/, control/, *.txt) or a metadata.csv / .jsonl file
    text_to_image: bool = False  # no control images (FLUX.1-Krea-dev / FLUX.1-dev)
    max_pixels: int = 0  # >0: downscale (keeping aspect) images larger than this many pixels
    resize: tuple[int, int] | None = None  # (height, width): resize every image to this fixed size
    cache_dir: str = ""  # empty: <out_dir>/cache
    max_sequence_length: int = 512  # T5 tokens per caption (at most 512, as in the pipeline)
    held_out: int = 1  # samples kept out of training for validation (the last ones, by key order)
    allow_outside_paths: bool = False  # metadata files may name images outside the dataset folder (absolute, ../)
    repeat: int = 1  # each training sample this many times per epoch (DiffSynth's dataset_repeat)
    # training sizes: "native" (each image's own, after resize / max_pixels) | "kontext": the FLUX.1 Kontext resolution
    # nearest in aspect (the pipeline's _auto_resize), then max_pixels (a smaller area at that aspect); images.py
    bucket: Literal["native", "kontext"] = "native"
    # a second dataset (any layout above) whose target is the base model's own prediction (preserve.py): the LoRA keeps
    # the model's behaviour there; weighted by train.preserve_weight; empty: off
    preserve_path: str = ""
    # RGB that transparent pixels of images and controls are composited on (RGBA, LA, P or tRNS transparency);
    # masks always composite on black (transparent = outside the edit region)
    background: tuple[int, int, int] = (255, 255, 255)


# torch.compile's portable cache artifacts, one file per compiled setting (compile_cache.py); "" turns saving and
# loading off. Per machine, like the Hugging Face cache, not per run.
COMPILE_CACHE = "~/.cache/kontext-lora/compile"


@dataclass
class TrainConfig:
    # lora: a LoRA on the frozen base (lora.safetensors) | full: the transformer's block Linears themselves train in
    # their loaded dtype (full.py: optimizer inside the backward, FSDP2 under torchrun; writes a diffusers
    # transformer/ folder). Full mode needs a bf16/fp32 base (model.quant none), no offload, train.grad_clip 0.
    mode: Literal["lora", "full"] = "lora"
    # full mode: which block Linears train: all (attention, MLP, AdaLN modulation of the 57 blocks) | attention (each
    # block's Attention projections: to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out). Always frozen: the embedders
    # (x, context, time/guidance/pooled text), the RMS norms, the final layer (norm_out, proj_out), an IP-Adapter.
    full_modules: Literal["all", "attention"] = "all"
    steps: int = 1000  # optimizer steps in all (a resumed run continues up to this count)
    batch_size: int = 1  # samples per micro-batch and process (torchrun: times the number of processes)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # peak learning rate, reached after warmup_steps
    weight_decay: float = 1e-4  # AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    # adamw8bit: bitsandbytes' 8-bit AdamW | torchao_adamw8bit (full mode): torchao's 8-bit AdamW, bf16 weights
    # updated with stochastic rounding (configs/full_bf16.py; README "Full fine-tune" has the comparison). LoRA mode
    # also: paged_adamw8bit, lion8bit (bitsandbytes), prodigy (lr ~1.0), schedulefree_adamw (train.scheduler
    # constant), adafactor (optim.py OPTIMIZERS; README "Optimizers": the lr each expects, its state size)
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw8bit", "lion8bit", "prodigy", "schedulefree_adamw",
                       "adafactor", "torchao_adamw8bit"] = "adamw"
    # EMA of the trained weights (LoRA and region token; ema.py): after each optimizer step ema += (1 - decay) *
    # (w - ema), in fp32; saved as lora.ema.safetensors beside the result and used for validation. 0: off
    ema_decay: float = 0.0
    ema_start_step: int = 0  # until this many optimizer steps are done the EMA copies the weights, then averages
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"  # lr decay to 0 after warmup (constant: none)
    warmup_steps: int = 0  # lr ramps linearly from lr / warmup_steps to lr over this many steps
    grad_clip: float = 1.0  # clip the gradient norm to this (0: no clipping)
    rank: int = 16  # LoRA rank r
    alpha: float = 16.0  # LoRA alpha: the update is scaled by alpha / rank
    target_modules: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")  # peft target_modules (name suffixes)
    lora_init: Literal["default", "gaussian"] = "default"  # peft init_lora_weights: default (B = 0) | gaussian
    # the adapter kind, all through peft (adapters.py; README "Adapters"): lora | lokr (LyCORIS Kronecker product) |
    # loha (LyCORIS Hadamard product) | dora (weight-decomposed LoRA; bf16/fp32 bases only). rank and alpha apply to
    # each; lora_init to lora and dora
    adapter: Literal["lora", "lokr", "loha", "dora"] = "lora"
    lokr_factor: int = -1  # lokr: peft's decompose_factor (-1: factors near the square root of each dimension)
    lokr_decompose_both: bool = False  # lokr: factorise the small Kronecker factor w1 at rank r too
    # the final lora.safetensors (checkpoints keep lora.py's own): comfyui = diffusers keys + .alpha tensors, read
    # unchanged by ComfyUI and FluxKontextPipeline.load_lora_weights | kohya (BFL names) | diffusers (alpha in the
    # header only, which ComfyUI ignores). convert.py converts between them.
    lora_format: Literal["comfyui", "kohya", "diffusers"] = "comfyui"
    timestep_sampling: Literal["uniform", "logit_normal"] = "uniform"  # t ~ U(0, 1) | sigmoid(N(mean, std))
    logit_mean: float = 0.0  # logit_normal: mean of the normal before the sigmoid
    logit_std: float = 1.0  # logit_normal: std of the normal before the sigmoid
    resolution_shift: bool = False  # shift t toward noise for large images, as the sampler's mu does
    guidance: float = 1.0  # embedded guidance value during training
    caption_dropout: float = 0.0  # probability of swapping in the empty-prompt embeddings
    mask_weight_fg: float = 1.0  # loss weight inside the mask (white = edit region), when masks are given
    mask_weight_bg: float = 1.0  # loss weight outside the mask, when masks are given
    # plain: the velocity error everywhere (mask-weighted). dual_masked: inside the mask the velocity error, outside
    # it the identity error of the reconstructed latent against the control (pixel-aligned pairs only), weighted by
    # mask_weight_fg / mask_weight_bg, plus loss_l2 * sum of squared LoRA parameters (objective.py dual_masked_loss)
    loss: Literal["plain", "dual_masked"] = "plain"
    loss_l2: float = 1e-4  # dual_masked: L2 stabiliser on the LoRA parameters
    # A learnable region token (region.py MaskRegionToken): the mask, at the token grid, pooled to region_grid and
    # projected to one token appended to the image sequence (id plane 2); trained with the LoRA, saved beside it as
    # lora.region.safetensors. Needs a mask for every sample.
    region_token: bool = False
    region_grid: tuple[int, int] = (16, 16)  # (rows, cols) the mask is adaptively average-pooled to, any resolution
    region_l2: float = 1e-4  # L2 stabiliser on the region token's parameters
    cached: bool = True  # True: precompute latents and embeddings, train from the cache only
    gradient_checkpointing: bool = False  # recompute block activations in the backward: less memory, more time
    # with gradient_checkpointing: the share of the no-recompute activation memory kept, 0..1 (0: every block
    # recomputed whole; 1: none). Blocks get selective checkpointing policies between the two (recompute.py)
    memory_budget: float = 0.0
    autocast: bool = False  # bf16 autocast around the transformer (for an fp32 master model)
    seed: int = 0  # noise, timesteps, caption dropout and data order are functions of (seed, step)
    save_every: int = 0  # checkpoint every this many steps (0: only at the end)
    keep_checkpoints: int = 3  # this run's newest checkpoints kept on disk (0: all)
    validate_every: int = 0  # held-out loss and sample grid every this many steps (0: only at the end; <0: never)
    log_every: int = 1  # progress-bar update interval in steps (log.jsonl gets every step)
    # where the scalars (and validation images) go besides log.jsonl, which is always written (report.py); wandb is
    # an optional dependency (pip install wandb), tensorboard is skipped with a note when not installed
    report_to: tuple[Literal["tensorboard", "wandb", "jsonl"], ...] = ("jsonl", "tensorboard")
    wandb_project: str = "kontext-lora"  # report_to wandb: the project the run is logged to
    # a samples.jsonl of your own edits ({"control": "a.png" | [...], "prompt": "...", "seed": 1} per line, no target),
    # sampled at every validation into validation/samples-<step>.png with the sample section (user_samples.py)
    sample_prompts: str = ""
    preserve_weight: float = 1.0  # with data.preserve_path: weight of the preservation term (preserve.py)
    compile: bool = True  # torch.compile each transformer block (regional; CUDA only, the CPU runs eager)
    compile_cache: str = COMPILE_CACHE  # with compile: the folder of torch.compile's saved work (compile_cache.py)
    # kontext_kernels/attention.py resolve_attention ("auto": bf16 cuDNN on a GPU; "cudnn_fp8": fp8 attention, Hopper
    # and nvidia-cudnn-frontend, never chosen by "auto"); saved in config.json
    attention_backend: AttentionBackend = "auto"
    fp8_backward: bool = False  # fp8 transformer: input gradient as an e5m2 x e4m3 GEMM (kontext_kernels/fp8.py)
    # keep the tensors saved for the backward in pinned host memory (with checkpointing: the block inputs;
    # torch.autograd.graph.save_on_cpu)
    activation_offload: bool = False


@dataclass
class SampleConfig:
    guidance_scale: float = 3.5  # embedded guidance (FLUX.1 Kontext [dev] is guidance-distilled)
    true_cfg_scale: float = 1.0  # > 1 with --sample.negative-prompt: true classifier-free guidance (2 calls/step)
    negative_prompt: str | None = None  # the negative prompt for true_cfg_scale > 1
    num_inference_steps: int = 28  # denoising steps (t from 1 to 0)
    seed: int = 0  # noise seed (the validation grid adds the sample's index)
    max_area: int = 1024 ** 2  # size_mode pipeline: output area
    size_mode: Literal["native", "pipeline"] = "native"  # native: output = input size | pipeline: diffusers'
    max_sequence_length: int = 512  # T5 tokens
    # torch.compile each block (CUDA only): ~15-35 s to compile buys ~0.1 s/step, so it pays from about 5 images
    # per process (batch jobs), not for one CLI edit
    compile: bool = False
    attention_backend: AttentionBackend = "auto"  # as TrainConfig.attention_backend
    compile_cache: str = COMPILE_CACHE  # with compile: the folder of torch.compile's saved work (compile_cache.py)
    # reuse work across steps (stepcache.py): "" off | first_block:0.08 | mag:0.06 | taylorseer:5 | faster:2 |
    # tea:0.25 (METHOD:VALUE, see parse_cache)
    cache: str = ""
    # sample.py, native size: an input image larger than this many pixels is resized down to it first (with a
    # message); the pipeline's own area by default. Raise it to sample larger.
    pixel_budget: int = 1024 ** 2


# SampleConfig.cache's methods -> the type of their one value: a threshold (>= 0) or a step interval (>= 1).
# stepcache.py maps each to its hook (diffusers' FirstBlockCache / MagCache / TaylorSeer / FasterCache, our TeaCache).
CACHE_METHODS = {"first_block": float, "mag": float, "taylorseer": int, "faster": int, "tea": float}
CACHE_EXAMPLE = "first_block:0.08, mag:0.06, taylorseer:5, faster:2, tea:0.25"


def parse_cache(spec: str) -> tuple[str, float | int] | None:
    """SampleConfig.cache -> None ("" = off) or (method, value). ValueError saying what was expected."""
    if spec == "":
        return None
    method, _, text = spec.partition(":")
    if method not in CACHE_METHODS:
        raise ValueError(f"cache {spec!r}: unknown method {method!r}; expected METHOD:VALUE with METHOD one of "
                         f"{' | '.join(CACHE_METHODS)} (e.g. {CACHE_EXAMPLE}), or '' for no cache")
    kind = CACHE_METHODS[method]
    what = "a threshold >= 0" if kind is float else "a step interval, an integer >= 1"
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"cache {spec!r}: {method} takes {what} after the colon ({method}:"
                         f"{'0.1' if kind is float else '2'}), got {text!r}") from None
    if not (0 <= value < float("inf") if kind is float else value >= 1):
        raise ValueError(f"cache {spec!r}: {method} takes {what}, got {value}")
    return method, value


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)  # each component's weights, dtype and device
    data: DataConfig = field(default_factory=DataConfig)  # the dataset and its preprocessing
    train: TrainConfig = field(default_factory=TrainConfig)  # optimizer, schedule, LoRA shape, the loop
    sample: SampleConfig = field(default_factory=SampleConfig)  # validation grids; sample.py's --sample.* defaults
    out_dir: str = "runs/default"  # run folder: lora.safetensors, checkpoints/, log.jsonl, config.json (+ cache/)
    resume: str = ""  # "" (start afresh) | "latest" (out_dir's newest intact checkpoint) | a checkpoint folder
    overwrite: bool = False  # start afresh in an out_dir that holds an earlier run (deletes its LoRA, log, checkpoints)


# ---------------------------------------------------------------- validation

def _at_least(n):
    return (lambda v: v >= n), f" >= {n}"


def _between(lo, hi):
    return (lambda v: lo <= v <= hi), f" in [{lo}, {hi}]"


def _cache_ok(spec: str) -> bool:
    try:
        parse_cache(spec)
    except ValueError:
        return False
    return True


_POSITIVE = (lambda v: v > 0), " > 0"
_NOT_EMPTY = (lambda v: len(v) > 0), ", not empty"

# What validate() asks of a field beyond its annotated type: field path -> (test, the words for it). Fields not
# listed take any value of their type. The consumers keep their own checks; these make a typo fail before any work.
RULES = {
    "data.max_pixels": ((lambda v: v == 0 or v >= 16 * 16), ", 0 (off) or >= 256 (one 16 x 16 patch)"),
    "data.resize": ((lambda v: v is None or min(v) >= 16), ", each side >= 16 (sizes are floored to 16)"),
    "data.max_sequence_length": _between(1, 512),  # the pipeline refuses more than 512 T5 tokens
    "data.held_out": _at_least(0),
    "data.repeat": _at_least(1),
    "data.background": ((lambda v: all(0 <= c <= 255 for c in v)), ", each in [0, 255] (R, G, B)"),
    "train.steps": _at_least(1),
    "train.batch_size": _at_least(1),
    "train.grad_accum": _at_least(1),
    "train.lr": _POSITIVE,
    "train.weight_decay": _at_least(0),
    "train.betas": ((lambda v: all(0 <= b < 1 for b in v)), ", each in [0, 1)"),
    "train.warmup_steps": _at_least(0),
    "train.ema_decay": ((lambda v: 0 <= v < 1), " in [0, 1) (0: off; 0.999 averages over ~1000 steps)"),
    "train.ema_start_step": _at_least(0),
    "train.grad_clip": _at_least(0),
    "train.rank": _at_least(1),
    "train.alpha": _POSITIVE,
    "train.lokr_factor": ((lambda v: v == -1 or v >= 1), ", -1 (near the square root) or >= 1"),
    "train.target_modules": _NOT_EMPTY,
    "train.logit_std": _POSITIVE,
    "train.caption_dropout": _between(0, 1),
    "train.mask_weight_fg": _at_least(0),
    "train.mask_weight_bg": _at_least(0),
    "train.loss_l2": _at_least(0),
    "train.preserve_weight": _at_least(0),
    "train.region_grid": ((lambda v: min(v) >= 1), ", each >= 1"),
    "train.region_l2": _at_least(0),
    "train.save_every": _at_least(0),
    "train.keep_checkpoints": _at_least(0),
    "train.log_every": _at_least(1),
    "train.memory_budget": _between(0, 1),
    "sample.num_inference_steps": _at_least(1),
    "sample.max_area": _at_least(16 * 16),
    "sample.max_sequence_length": _between(1, 512),
    "sample.cache": ((lambda v: _cache_ok(v)), f", '' (off) or METHOD:VALUE ({CACHE_EXAMPLE})"),
    "sample.pixel_budget": _at_least(16 * 16),
    "model.resident_blocks": _between(0, 57),  # FLUX has 19 double + 38 single blocks
    "model.ip_adapter.scale": _at_least(0),
    "model.vae_tile": ((lambda v: v == 0 or (v >= 64 and v % 64 == 0)), ", 0 (off) or a multiple of 64 >= 64"),
    "out_dir": _NOT_EMPTY,
}


def _is_a(value, tp) -> bool:
    """Does `value` fit the annotation `tp`? bool is not an int here, an int is a float, a list is not a tuple."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (Union, types.UnionType):
        return any(_is_a(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_is_a(v, args[0]) for v in value)
        return len(value) == len(args) and all(map(_is_a, value, args))
    if tp is type(None):
        return value is None
    if tp in (int, float):
        return isinstance(value, (int, float) if tp is float else int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _describe(tp) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + " | ".join(args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple of {_describe(args[0]).split(' ', 1)[1]}s"
        return f"a tuple of {len(args)} {_describe(args[0]).split(' ', 1)[1]}s"
    names = {type(None): "None", int: "an integer", float: "a number", str: "a string", bool: "True or False"}
    return names.get(tp, f"a {getattr(tp, '__name__', tp)}")


def _problems(obj, prefix: str = "", values: bool = True) -> list[str]:
    """Every field of the dataclass `obj` (recursively) against its annotation and, with `values`, its RULES."""
    names = {f.name for f in dataclasses.fields(obj)}
    out = [f"{prefix}{k}: unknown field of {type(obj).__name__}" for k in vars(obj) if k not in names]
    for f in dataclasses.fields(obj):
        key, v = prefix + f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(f.type) and type(v) is f.type:
            out += _problems(v, key + ".", values)
            continue
        test, words = RULES.get(key, (None, ""))
        if not _is_a(v, f.type) or (values and test is not None and not test(v)):
            shown = repr(v) if len(repr(v)) <= 80 else repr(v)[:77] + "..."
            out.append(f"{key}: expected {_describe(f.type)}{words}, got {shown}")
    return out


def _run_problems(cfg: Config) -> list[str]:
    """What a run must be given, beyond single fields' types. Each check skips a field whose type is already wrong
    (reported by _problems), so one call lists everything."""
    import torch  # only to parse device strings exactly as load.parse_device will

    out = []
    if isinstance(cfg.data, DataConfig) and cfg.data.path == "":
        out.append("data.path is required: a dataset folder or metadata.csv/.jsonl (--data.path, or "
                   "DataConfig(path=...) in the --config file)")
    if isinstance(cfg.resume, str) and cfg.resume not in ("", "latest") and not Path(cfg.resume).is_dir():
        out.append(f'resume: expected "", "latest" or an existing checkpoint folder; {cfg.resume!r} is not a folder')
    for name in ("clip", "t5", "vae", "transformer"):
        part = getattr(cfg.model, name, None)
        if isinstance(part, Part) and isinstance(part.device, str):
            try:
                torch.device(part.device)
            except RuntimeError:
                out.append(f"model.{name}.device: expected a torch device ('cpu', 'cuda:0', ...), got {part.device!r}")
    ipa = getattr(cfg.model, "ip_adapter", None)
    if isinstance(ipa, IPAdapterConfig) and isinstance(ipa.device, str):
        try:
            torch.device(ipa.device)
        except RuntimeError:
            out.append(f"model.ip_adapter.device: expected a torch device ('cpu', 'cuda:0', ...), got {ipa.device!r}")
    if (isinstance(cfg.model, ModelConfig) and cfg.model.offload is True and isinstance(cfg.train, TrainConfig)
            and cfg.train.gradient_checkpointing is False):
        out.append("model.offload: training with block offload needs train.gradient_checkpointing True (without "
                   "the recompute, every block's weights stay on the GPU for the backward: no saving)")
    if isinstance(cfg.train, TrainConfig) and isinstance(cfg.model, ModelConfig):
        out += _memory_budget_problems(cfg)
        out += _full_mode_problems(cfg)
        out += _adapter_problems(cfg)
    return out


def _memory_budget_problems(cfg: Config) -> list[str]:
    """train.memory_budget > 0 places selective checkpoints block by block (recompute.py): it needs the recompute on,
    and neither block offload (a streamed block's weights leave the GPU: it must recompute whole) nor full mode."""
    tc, out = cfg.train, []
    if not isinstance(tc.memory_budget, (int, float)) or tc.memory_budget == 0:
        return out
    if tc.gradient_checkpointing is False:
        out.append("train.memory_budget: needs train.gradient_checkpointing True (the budget says how much of the "
                   "recompute to skip; without checkpointing nothing is recomputed)")
    if cfg.model.offload is True:
        out.append("train.memory_budget: expected 0 with model.offload (streamed blocks recompute whole)")
    if tc.mode == "full":
        out.append("train.memory_budget: expected 0 with train.mode full (measured for LoRA steps only)")
    return out


def _full_mode_problems(cfg: Config) -> list[str]:
    """train.mode's combinations that cannot work, named by field, before any model loads (full.py's docstring says
    why each one)."""
    tc, mc, out = cfg.train, cfg.model, []
    if tc.mode != "full":
        if tc.optimizer == "torchao_adamw8bit":
            out.append("train.optimizer: 'torchao_adamw8bit' is for train.mode='full' (bf16 weights, stochastic "
                       "rounding); a LoRA trains fp32 weights: use adamw, adamw8bit or another LoRA optimizer")
        if tc.optimizer == "schedulefree_adamw" and tc.scheduler != "constant":
            out.append(f"train.scheduler: schedule-free AdamW replaces the decay schedule (it averages the iterates "
                       f"instead): expected 'constant' (train.warmup_steps still applies), got {tc.scheduler!r}")
        if tc.optimizer == "schedulefree_adamw" and tc.ema_decay > 0:
            out.append("train.ema_decay: schedule-free AdamW's result is already an average of the iterates (its "
                       "eval weights); use one of the two: ema_decay 0, or another optimizer")
        return out
    full = "train.mode='full' trains the transformer's weights themselves"
    if tc.optimizer not in FULL_OPTIMIZERS:
        out.append(f"train.optimizer: {full} with {' | '.join(FULL_OPTIMIZERS)} (full.py steps each parameter inside "
                   f"the backward), got {tc.optimizer!r}")
    if tc.ema_decay > 0:
        n = flux_full_parameters(tc.full_modules)
        out.append(f"train.ema_decay: an EMA in full mode is an fp32 copy of the trained weights: {n / 1e9:.1f}B "
                   f"parameters of FLUX.1 (full_modules={tc.full_modules!r}) = {4 * n / 1e9:.1f} GB beside the model "
                   f"and its optimizer state; not supported: set it 0 (or train a LoRA, whose EMA is a few MB)")
    if mc.quant != "none":
        out.append(f"model.quant: {full}: expected 'none' (a bf16 or fp32 base), got {mc.quant!r}; a quantized base "
                   f"trains only a LoRA (train.mode='lora')")
    if mc.offload is True:
        out.append(f"model.offload: {full}: its block weights and their optimizer state cannot stream from host "
                   f"memory (offload.py streams frozen weights); set it False, or shard over GPUs with torchrun")
    if tc.lora_format != "comfyui":
        out.append(f"train.lora_format: {tc.lora_format!r} is a LoRA file format; {full} and writes a diffusers "
                   f"transformer/ folder (convert.py --format comfyui-model makes one BFL-named file): leave it unset")
    if tc.grad_clip != 0:
        out.append(f"train.grad_clip: {full} with the optimizer stepping each parameter inside the backward, so the "
                   f"global gradient norm is known only after the updates: expected 0, got {tc.grad_clip!r}")
    if mc.transformer.dtype in ("fp16", "float16"):
        out.append(f"model.transformer.dtype: {full}: expected bf16 (or fp32 master weights), got "
                   f"{mc.transformer.dtype!r} (fp16 weights need loss scaling)")
    for bad, what in ((tc.region_token is True, "train.region_token"), (tc.loss == "dual_masked", "train.loss"),
                      (bool(mc.ip_adapter.path), "model.ip_adapter.path")):
        if bad:
            out.append(f"{what}: not with train.mode='full' (yet): it trains or conditions beside the LoRA path only")
    return out


FULL_OPTIMIZERS = ("adamw", "adamw8bit", "torchao_adamw8bit")  # full.STEPPERS


def flux_full_parameters(full_modules: str) -> int:
    """Parameters (weights and biases) of the block Linears full mode trains in FLUX.1's transformer (FLUX.1-Kontext-dev
    transformer/config.json: 19 double, 38 single blocks, width 3072 = 24 heads x 128, MLP ratio 4; tests/test_ema.py
    counts them on the model built on the meta device). `full_modules`: "all" or "attention" (full.trained_linears)."""
    d, m = 3072, 4 * 3072

    def lin(i, o):
        return i * o + o

    double_attn = 8 * lin(d, d)  # to_q/k/v, to_out.0 and add_q/k/v_proj, to_add_out
    single_attn = 3 * lin(d, d)  # to_q/k/v (proj_out is the block's own Linear)
    if full_modules == "attention":
        return 19 * double_attn + 38 * single_attn
    double = double_attn + 2 * (lin(d, m) + lin(m, d)) + 2 * lin(d, 6 * d)  # ff, ff_context, norm1(_context).linear
    single = single_attn + lin(d, m) + lin(d + m, d) + lin(d, 3 * d)  # proj_mlp, proj_out, norm.linear
    return 19 * double + 38 * single


def _adapter_problems(cfg: Config) -> list[str]:
    """train.adapter's combinations that cannot work (adapters.py says why), named before any model loads."""
    tc, out = cfg.train, []
    kind = tc.adapter
    if tc.mode != "lora" and kind != "lora":
        return [f"train.adapter: {kind!r} is an adapter on the frozen base; train.mode='full' trains the weights "
                f"themselves: leave it 'lora'"]
    if kind == "dora" and cfg.model.quant != "none":
        out.append(f"train.adapter: 'dora' with model.quant {cfg.model.quant!r}: peft's DoRA normalises by the base "
                   f"weight, which it cannot dequantize from our fp8 / 4-bit Linears; use lora, lokr or loha on a "
                   f"quantized base, or model.quant 'none'")
    why = {("lokr", "kohya"): "a Kronecker product of q, k, v does not fuse into BFL's qkv",
           ("loha", "kohya"): "a Hadamard product of q, k, v does not fuse into BFL's qkv",
           ("dora", "kohya"): "no fused-layout DoRA is written",
           ("lokr", "diffusers"): "diffusers 0.42 does not load LoKr for Flux",
           ("loha", "diffusers"): "diffusers 0.42 does not load LoHa for Flux"}.get((kind, tc.lora_format))
    if why:
        out.append(f"train.lora_format: {tc.lora_format!r} cannot hold a {kind} adapter ({why}): use 'comfyui' "
                   f"(ComfyUI and sample.py / lora.load_lora read it)")
    if kind in ("lokr", "loha") and tc.lora_init != "default":
        out.append(f"train.lora_init: {tc.lora_init!r} is LoRA's init; train.adapter {kind!r} uses peft's own "
                   f"(one factor zero): leave it 'default'")
    if kind != "lokr" and (tc.lokr_factor != -1 or tc.lokr_decompose_both):
        out.append(f"train.lokr_factor / train.lokr_decompose_both: set for train.adapter {kind!r}; they shape a "
                   f"lokr adapter only")
    return out


def _raise(where: str, problems: list[str]) -> None:
    """One ValueError for all `problems`, prefixed with `where` (the config file) when given."""
    head = f"{where}: " if where else ""
    if len(problems) == 1:
        raise ValueError(head + problems[0])
    if problems:
        raise ValueError(f"{head}{len(problems)} config problems:\n" + "\n".join(f"  {p}" for p in problems))


def validate_sample(sc: SampleConfig, where: str = "") -> None:
    """validate() for a SampleConfig alone (sample.py's flags): every field's type and RULES, all at once."""
    _raise(where, _problems(sc, "sample."))


def validate(cfg: Config) -> None:
    """Check the whole config before any work: every field's type against its annotation (choices included), the
    RULES ranges, a dataset path, the resume target, the device strings. Raises one ValueError listing every
    problem by field path ("train.lr: expected a number > 0, got 'abc'"). Checks nothing that needs the network."""
    _raise("", _problems(cfg) + _run_problems(cfg))


# ---------------------------------------------------------------- loading

CONFIG_FLAG_HELP = ("--config PATH  a python file defining `config = Config(...)` (see configs/); its values are the "
                    "defaults the flags below override, and with --config the (default: ...) shown are the file's.")


def _run_file(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        scope = runpy.run_path(str(path))
    except TypeError as e:  # Config(lrr=...): the dataclass refuses an unknown field
        raise ValueError(f"{path}: {e}") from None
    cfg = scope.get("config")
    if not isinstance(cfg, Config):
        raise ValueError(f"{str(path)!r} must define `config = Config(...)`; found {type(cfg).__name__}")
    _lists_to_tuples(cfg)
    return cfg


def _lists_to_tuples(obj) -> None:
    """A config file may write a tuple field as a list (`target_modules=["to_q", "to_k"]`, the usual Python
    spelling); make it the tuple the field declares, so validation and tyro see the declared type."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _lists_to_tuples(value)
        elif isinstance(value, list) and "tuple" in str(f.type):
            setattr(obj, f.name, tuple(value))


def load_config(path: str | Path) -> Config:
    """Run a config file and return its `config` (a Config), validated. Errors name the file."""
    cfg = _run_file(path)
    _raise(str(path), _problems(cfg) + _run_problems(cfg))
    return cfg


def split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """Pull `--config PATH` (or `--config=PATH`) out of argv; the rest goes to tyro."""
    rest, path = [], None
    it = iter(argv)
    for a in it:
        if a == "--config":
            path = next(it, None)
            if path is None:
                raise SystemExit("--config needs a path")
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
    return path, rest


def _choice_fields(cls=Config, prefix: str = "") -> dict:
    """Flag name (dots, underscores) -> its Literal annotation, for every choice field of the config tree."""
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type):
            out.update(_choice_fields(f.type, f"{prefix}{f.name}."))
        elif get_origin(f.type) is Literal:
            out[prefix + f.name] = f.type
    return out


def _choice_problems(args: list[str]) -> list[str]:
    """A choice flag given a value outside its Literal, in validate()'s words, one line each. tyro refuses it too,
    but inside a box 80 columns wide whose line ends after "Expected one of", the choices wrapped onto the next line,
    so a log read line by line (grep, a CI summary) showed that phrase with nothing after it."""
    fields, out = _choice_fields(), []
    for i, a in enumerate(args):
        if not a.startswith("--"):
            continue
        name, eq, value = a[2:].partition("=")
        tp = fields.get(name.replace("-", "_"))
        if tp is None or not (eq or i + 1 < len(args)):
            continue
        value = value if eq else args[i + 1]
        if value not in [str(c) for c in get_args(tp)]:
            out.append(f"--{name}: expected {_describe(tp)}, got {value!r}")
    return out


def cli(argv: list[str] | None = None, description: str = "") -> Config:
    """`--config file.py` gives the defaults, tyro flags override them (unknown flags and bad choices are tyro's
    errors), then validate() checks the result. The file's own types are checked before tyro sees them (tyro only
    warns about a default of the wrong type); what a flag can still supply, like data.path, is checked after."""
    import tyro

    path, rest = split_config_flag(sys.argv[1:] if argv is None else argv)
    _raise("flags", _choice_problems(rest))  # before any config file runs (configs/tiny.py builds a model)
    default = _run_file(path) if path else Config()
    if path:  # a type error stops here (tyro cannot parse it); its value problems are named with it, all at once
        if _problems(default, values=False):
            _raise(path, _problems(default))
    cfg = tyro.cli(Config, default=default, args=rest, description=f"{description}\n\n{CONFIG_FLAG_HELP}")
    _raise(f"{path} + flags" if path else "", _problems(cfg) + _run_problems(cfg))
    return cfg


def to_json(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, default=str)
