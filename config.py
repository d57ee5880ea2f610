"""Every config dataclass and its defaults, in one place, and the `--config file.py` + tyro flag loader.

A config file is python that defines `config = Config(...)` (see configs/). Flags override its fields:
`python train.py --config configs/fp8.py --train.lr 2e-5`. Unknown flags and unknown fields fail.

The ground floor of the import order: this file imports no project module, so every other file may import it.
"""

import dataclasses
import json
import runpy
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["Config", "DataConfig", "TrainConfig", "SampleConfig", "ModelConfig", "Part", "load_config", "cli",
           "to_json"]


@dataclass
class Part:
    """Where one model component comes from and where it lives. Empty `path` means ModelConfig.path."""

    path: str = ""
    subfolder: str = ""  # empty: the diffusers default (text_encoder, tokenizer, text_encoder_2, ...)
    dtype: str = "bf16"  # fp32 | bf16 | fp16 (checked by load.parse_dtype)
    device: str = "cpu"  # "cpu", "cuda:0", "cuda:1", ... (checked by load.parse_device)


@dataclass
class ModelConfig:
    path: str = "black-forest-labs/FLUX.1-Kontext-dev"  # diffusers folder or Hub repo id
    clip: Part = field(default_factory=Part)
    t5: Part = field(default_factory=Part)
    vae: Part = field(default_factory=Part)
    transformer: Part = field(default_factory=Part)
    # Transformer weights: "none" (as stored), "fp8" (e4m3 + per-row scale), "nf4" / "fp4" (bnb 4-bit layout).
    # Pre-quantized checkpoints are detected from their files; this quantizes a bf16 one at load time.
    quant: str = "none"
    fp8_scales: str = ""  # optional safetensors of per-layer scales for a scaled-fp8 export that lost them


@dataclass
class DataConfig:
    path: str = ""  # a folder (images/, control/, *.txt) or a metadata.csv / .jsonl file
    text_to_image: bool = False  # no control images (FLUX.1-Krea-dev / FLUX.1-dev)
    max_pixels: int = 0  # >0: downscale (keeping aspect) images larger than this many pixels
    resize: tuple[int, int] | None = None  # (height, width): resize every image to this fixed size
    cache_dir: str = ""  # empty: <out_dir>/cache
    max_sequence_length: int = 512
    held_out: int = 1  # samples kept out of training for validation (the last ones, by key order)
    allow_outside_paths: bool = False  # metadata files may name images outside the dataset folder (absolute, ../)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    scheduler: str = "cosine"  # constant | linear | cosine (all after warmup)
    warmup_steps: int = 0
    grad_clip: float = 1.0
    rank: int = 16
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
    lora_init: str = "default"  # peft init_lora_weights: default (B = 0) | gaussian
    timestep_sampling: str = "uniform"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    resolution_shift: bool = False  # shift t toward noise for large images, as the sampler's mu does
    guidance: float = 1.0  # embedded guidance value during training
    caption_dropout: float = 0.0  # probability of swapping in the empty-prompt embeddings
    mask_weight_fg: float = 1.0  # loss weight inside the mask (white = edit region), when masks are given
    mask_weight_bg: float = 1.0
    cached: bool = True  # True: precompute latents and embeddings, train from the cache only
    gradient_checkpointing: bool = False
    autocast: bool = False  # bf16 autocast around the transformer (for an fp32 master model)
    seed: int = 0
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 3
    validate_every: int = 0  # 0: only at the end; <0: never
    log_every: int = 1
    compile: bool = True  # torch.compile each transformer block (regional; CUDA only, the CPU runs eager)
    attention_backend: str = "auto"  # auto | cudnn | cudnn_torch | flash | efficient | math | default
    #                                  (kernels/attention.py resolve_attention; saved in config.json)
    fp8_backward: bool = False  # fp8 transformer: input gradient as an e5m2 x e4m3 GEMM (kernels/fp8.py)


@dataclass
class SampleConfig:
    guidance_scale: float = 3.5  # embedded guidance (FLUX.1 Kontext [dev] is guidance-distilled)
    true_cfg_scale: float = 1.0  # > 1 with --sample.negative-prompt: true classifier-free guidance (2 calls/step)
    negative_prompt: str | None = None
    num_inference_steps: int = 28
    seed: int = 0
    max_area: int = 1024 ** 2  # size_mode pipeline: output area
    size_mode: Literal["native", "pipeline"] = "native"  # native: output = input size | pipeline: diffusers'
    max_sequence_length: int = 512  # T5 tokens
    compile: bool = True  # torch.compile each transformer block (regional; CUDA only)
    attention_backend: str = "auto"  # as TrainConfig.attention_backend


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    out_dir: str = "runs/default"
    resume: str = ""  # "" | "latest" | path of a checkpoint folder
    overwrite: bool = False  # start afresh in an out_dir that holds an earlier run (deletes its LoRA, log, checkpoints)


def load_config(path: str | Path) -> Config:
    """Run a config file and return its `config` (a Config). Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    scope = runpy.run_path(str(path))
    cfg = scope.get("config")
    if not isinstance(cfg, Config):
        raise ValueError(f"{str(path)!r} must define `config = Config(...)`; found {type(cfg).__name__}")
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


def cli(argv: list[str] | None = None, cls=Config, description: str = ""):
    """`--config file.py` gives the defaults, tyro flags override them (unknown flags are an error)."""
    import tyro

    path, rest = split_config_flag(sys.argv[1:] if argv is None else argv)
    default = load_config(path) if path else cls()
    return tyro.cli(cls, default=default, args=rest, description=description)


def to_json(cfg) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, default=str)
