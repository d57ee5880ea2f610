"""Kontext editing: prompt + image (+ LoRAs) -> image, as FluxKontextPipeline.__call__, with per-stage timings.

    python sample.py --config configs/tiny.py --image in.png --prompt "make the sky red" --out edited.png
    python sample.py --config configs/bf16.py --image in.png --prompt "..." --lora run/lora.safetensors \
        --lora-scale 0.8 --sample.negative-prompt "blurry" --sample.true-cfg-scale 2.0 \
        --sample.num-inference-steps 28 --sample.seed 1 --sample.size-mode native
    python sample.py --config configs/bf16.py --image in.png --prompt "..." --sample.cache first_block:0.08
    python sample.py --config configs/bf16.py --image person.png --image garment.png --prompt "..."  # 2 references
    python sample.py --config configs/region_depth.py --image in.png --mask region.png --ip-image depth.png \
        --prompt "..." --lora runs/region_depth/lora.safetensors   # region token (beside the LoRA) + IP-Adapter

    from sample import sample; from lora import load_lora
    out = sample(components, image, "make the sky red", generator=torch.Generator().manual_seed(0))

Flow matching, as in objective.py: x_t = (1 - t) * x0 + t * noise, the transformer predicts v = noise - x0, and sampling
runs t from 1 to 0 with Euler steps x_{t'} = x_t + (t' - t) * v (diffusers' FlowMatchEulerDiscreteScheduler.step).

Each component may sit on its own device and dtype (T5 on "cpu", transformer on "cuda:0", VAE on "cuda:1"): tensors
are moved explicitly between stages, and the denoising loop runs on the transformer's device in its dtype. No
accelerate hooks. Every result is compared with the pipeline in tests/test_sample.py.
"""

import contextlib
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import tyro
from PIL import Image
from tqdm.auto import tqdm

import compile_cache
from config import ModelConfig, SampleConfig, load_config, split_config_flag, validate_sample
from data import cut_prompts
from encode import (MULTIPLE, _device_of, decode_latents, encode_image, encode_ip_image, encode_prompt, image_size,
                    kontext_size, output_size, predict_velocity, prepare_latents, preprocess_image, token_mask,
                    unpack_latents)
from images import mask_latent, open_image
from kontext_kernels.attention import set_attention
from load import ip_processors, load_components, load_t5_tokenizer, parse_device, transformer_skeleton
from lora import check_file, load_lora, read_lora
from offload import offload_transformer
import quiet
from region import append_region, load_region, region_path
from stepcache import cache_context, check_cache, step_cache

SIZE_MODES = ("pipeline", "native")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DEFAULT_SIZE = 1024  # the pipeline's default height and width (default_sample_size 128 * vae_scale_factor 8)
_DEFAULTS = SampleConfig()  # sample()'s keyword defaults and the CLI's --sample.* flags both come from here
# SampleConfig fields that are not sample() keywords: seed makes the generator, the others go to prepare_transformer
NOT_SAMPLE_KWARGS = ("seed", "compile", "compile_cache", "attention_backend", "pixel_budget")


# ---------------------------------------------------------------- schedule and sizes


def flux_scheduler():
    """A fresh FlowMatchEulerDiscreteScheduler with the scheduler_config.json of FLUX.1-Kontext-dev (the same as
    FLUX.1-dev and FLUX.1-Krea-dev): dynamic shifting, mu from the image's token count. Fresh per call because the
    scheduler is stateful (step index)."""
    from diffusers import FlowMatchEulerDiscreteScheduler  # lazy, as every diffusers import here: ~9 s to import

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def sample_sizes(image_hw: tuple[int, int] | None, height: int | None, width: int | None, max_area: int,
                 size_mode: str, auto_resize: bool) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """((output height, width), (control image height, width) or None), in pixels, multiples of 16.

    "pipeline" (FluxKontextPipeline.__call__): output = height x width (default 1024 x 1024, not the input's
    aspect) rescaled to max_area at the same aspect; the input image is snapped to the preferred Kontext resolution
    nearest in aspect when auto_resize, else keeps its own size. "native": output = input = the image's own size
    (never snapped, max_area unused); text-to-image takes height x width as given."""
    if size_mode not in SIZE_MODES:
        raise ValueError(f"size_mode must be one of {SIZE_MODES}, got {size_mode!r}")
    if size_mode == "pipeline":
        out = output_size(height or DEFAULT_SIZE, width or DEFAULT_SIZE, max_area)
        return out, kontext_size(*image_hw, auto_resize) if image_hw else None
    if image_hw is None:
        if not (height and width):
            raise ValueError("size_mode='native' without an image (text-to-image) needs height and width")
        return (height // MULTIPLE * MULTIPLE, width // MULTIPLE * MULTIPLE), None
    if height or width:
        raise ValueError(f"size_mode='native' takes the output size from the image ({image_hw[0]}x{image_hw[1]}); "
                         f"got height={height}, width={width}: use size_mode='pipeline' for an explicit size")
    control = kontext_size(*image_hw, auto_resize=False)
    return control, control


# ---------------------------------------------------------------- the transformer


def prepare_transformer(transformer, sc: SampleConfig, device: torch.device, offload: int | None = None) -> str:
    """What sampling does to a loaded transformer (LoRAs loaded first: compiled blocks would recompile for them, and
    offload moves the weights it finds): the attention backend pinned in this model (kontext_kernels/attention.py, attention
    in the input embedder's dtype, as train.prepare_transformer), eval mode, block offload (`offload` = blocks kept
    resident, None: off; ModelConfig.offload), regional compile (CUDA only, not with offload). Returns the attention
    backend chosen. bench.py calls it too, so its denoise rows time what `python sample.py` runs."""
    attention = set_attention(transformer, sc.attention_backend, device, transformer.x_embedder.weight.dtype)
    transformer.eval()
    if offload is not None:
        transformer._block_offload = offload_transformer(transformer, device, offload, wrap=True)
    elif sc.compile and device.type == "cuda":
        transformer.compile_repeated_blocks(fullgraph=False)
    return attention


# ---------------------------------------------------------------- timings


@dataclass
class Timings:
    """Seconds per stage, measured after synchronising every CUDA device involved."""

    encode_prompt: float = 0.0  # positive and (true CFG) negative prompts
    encode_image: float = 0.0  # preprocess + VAE encode of the control image
    steps: list[float] = field(default_factory=list)  # one per denoising step (CFG: both transformer calls)
    decode: float = 0.0  # VAE decode + conversion to output_type
    total: float = 0.0


def format_timings(t: Timings) -> str:
    """The timings as a small table (the first step is listed apart: it holds warm-up and any compilation)."""
    n = len(t.steps)
    denoise = sum(t.steps)
    rows = [("encode_prompt", t.encode_prompt, ""), ("encode_image", t.encode_image, ""),
            (f"denoise ({n} steps)", denoise, f"{denoise / n:.4f} s/step, first {t.steps[0]:.4f}" if n else ""),
            ("decode", t.decode, ""), ("total", t.total, "")]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'stage':<{width}}  {'seconds':>9}"]
    lines += [f"{name:<{width}}  {sec:9.4f}  {note}".rstrip() for name, sec, note in rows]
    return "\n".join(lines)


def _cuda_devices(*modules) -> list[torch.device]:
    return sorted({p.device for m in modules if m is not None for p in m.parameters() if p.device.type == "cuda"},
                  key=str)


def _clock(devices: list[torch.device]) -> float:
    # CUDA kernels run asynchronously: without a sync, a stage's time would land in whichever stage syncs next.
    for d in devices:
        torch.cuda.synchronize(d)
    return time.perf_counter()


# ---------------------------------------------------------------- sampling


@dataclass
class SampleOutput:
    images: list | np.ndarray | torch.Tensor | None  # per output_type (pil / np / pt); None for "latent"
    latents: torch.Tensor  # [B * n, N, 64] final packed latents (what the pipeline returns for output_type="latent")
    timings: Timings


def _as_batch(prompt, batch_size: int, name: str) -> list[str] | None:
    """None, or `prompt` as a list of batch_size strings: a single string is repeated for every prompt (the pipeline
    encodes it once and relies on broadcasting inside the transformer, which fails once num_images_per_prompt > 1)."""
    if prompt is None or isinstance(prompt, str):
        return None if prompt is None else [prompt] * batch_size
    if len(prompt) != batch_size:
        raise ValueError(f"{name} has {len(prompt)} entries but there are {batch_size} prompts")
    return list(prompt)


def _prompt_embeds(components, prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, num_images_per_prompt: int,
                   max_sequence_length: int, device, dtype):
    """(prompt_embeds [B*n, L, D], pooled_prompt_embeds [B*n, P], text_ids [L, 3]) on the transformer's device and
    dtype, encoded on the text encoders' own devices (pipeline.encode_prompt) or taken as given."""
    c = components
    if prompt_embeds is None:
        prompt_embeds, pooled_prompt_embeds, _ = encode_prompt(c.clip, c.clip_tokenizer, c.t5, c.t5_tokenizer,
                                                               prompt, prompt_2, num_images_per_prompt,
                                                               max_sequence_length)
    else:
        # the pipeline leaves given embeddings as they are: with num_images_per_prompt > 1 that works for a single
        # prompt only (by broadcasting inside the transformer) and fails for a batch of prompts
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        pooled_prompt_embeds = pooled_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
    text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)
    return (prompt_embeds.to(device=device, dtype=dtype), pooled_prompt_embeds.to(device=device, dtype=dtype),
            text_ids)


def _check_true_cfg(true_cfg_scale: float, has_negative: bool) -> None:
    if true_cfg_scale > 1 and not has_negative:  # the pipeline silently samples without CFG here
        raise ValueError(f"true_cfg_scale={true_cfg_scale} needs a negative prompt (negative_prompt or "
                         f"negative_prompt_embeds); use true_cfg_scale=1.0 for no true CFG")


def _check_inputs(components, image, prompt, prompt_embeds, pooled_prompt_embeds, negative_prompt,
                  negative_prompt_embeds, negative_pooled_prompt_embeds, true_cfg_scale, output_type):
    """Loud errors for what the pipeline would reject, or fail on deep inside, or silently ignore."""
    c = components
    if c.transformer is None:
        raise ValueError("components.transformer is None: sampling needs the transformer")
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("pass exactly one of prompt and prompt_embeds")
    if prompt is not None and (c.clip is None or c.t5 is None):
        raise ValueError("components.clip / components.t5 is None: load the text encoders or pass prompt_embeds")
    if prompt_embeds is not None and pooled_prompt_embeds is None:
        raise ValueError("prompt_embeds needs pooled_prompt_embeds (the CLIP pooled output) too")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("pass at most one of negative_prompt and negative_prompt_embeds")
    if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
        raise ValueError("negative_prompt_embeds needs negative_pooled_prompt_embeds too")
    _check_true_cfg(true_cfg_scale, negative_prompt is not None or negative_prompt_embeds is not None)
    if (true_cfg_scale > 1 and prompt_embeds is not None and negative_prompt_embeds is not None
            and prompt_embeds.shape != negative_prompt_embeds.shape):
        raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                         f"{tuple(negative_prompt_embeds.shape)} must have the same shape")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if c.vae is None and (image is not None or output_type != "latent"):
        raise ValueError("components.vae is None: it is needed to encode the image and to decode the output")
    refs = _references(image)
    if image is not None and not refs:
        raise ValueError("image is an empty list: pass None for text-to-image")
    for i, im in enumerate(refs):
        if not isinstance(im, (np.ndarray, torch.Tensor)) and not hasattr(im, "size"):
            raise ValueError(f"image{f' {i + 1} of {len(refs)}' if len(refs) > 1 else ''} must be a PIL image, an "
                             f"ndarray or a tensor (a list of them: several references), got {type(im).__name__}")


def _check_conditioning(c, ip_adapter_image, ip_adapter_image_embeds, mask, region) -> None:
    if ip_adapter_image is not None and ip_adapter_image_embeds is not None:
        raise ValueError("pass at most one of ip_adapter_image and ip_adapter_image_embeds")
    given = ip_adapter_image is not None or ip_adapter_image_embeds is not None
    if given != bool(ip_processors(c.transformer)):  # diffusers' IP attention fails on a call without embeddings
        raise ValueError("ip_adapter_image needs an IP-Adapter in the transformer (model.ip_adapter.path)" if given
                         else "the transformer has an IP-Adapter (model.ip_adapter.path): pass ip_adapter_image "
                              "(sample.py --ip-image) or ip_adapter_image_embeds, or load the model without it")
    if ip_adapter_image is not None and getattr(c, "image_encoder", None) is None:
        raise ValueError("ip_adapter_image needs components.image_encoder (load_components with model.ip_adapter), "
                         "or pass ip_adapter_image_embeds")
    if (mask is None) != (region is None):
        raise ValueError("the region token needs both mask and region (the MaskRegionToken trained with the LoRA, "
                         "region.load_region); got only " + ("mask" if region is None else "region"))
    if isinstance(mask, torch.Tensor) and mask.dim() != 3:
        raise ValueError(f"mask as a tensor is [1, h, w] at latent resolution; got shape {tuple(mask.shape)}")


@contextlib.contextmanager
def ip_scale(transformer, scale: float | None):
    """The IP-Adapter's strength set for one call (diffusers' set_ip_adapter_scale does the same per processor),
    restored after it, errors too. None: unchanged."""
    procs = ip_processors(transformer) if scale is not None else []
    before = [p.scale for p in procs]
    try:
        for p in procs:
            p.scale = [scale] * len(p.scale)
        yield
    finally:
        for p, b in zip(procs, before):
            p.scale = b


def _references(image) -> list:
    """sample()'s `image` as the list of references: None -> [], one image -> [it], a list or tuple -> itself."""
    return list(image) if isinstance(image, (list, tuple)) else [] if image is None else [image]


def _sizes(refs: list, height, width, max_area: int, size_mode: str, auto_resize: bool):
    """((output height, width), [each reference's (height, width)]): sample_sizes for the first reference; each further
    one sized as sample_sizes sizes the first (its own size, or the snap when auto_resize in "pipeline" mode)."""
    (height, width), control_hw = sample_sizes(image_size(refs[0]) if refs else None, height, width, max_area,
                                               size_mode, auto_resize)
    return (height, width), [control_hw] + [kontext_size(*image_size(im), auto_resize and size_mode == "pipeline")
                                            for im in refs[1:]]


def _batch_size(prompt, prompt_embeds) -> int:
    if isinstance(prompt, str):
        return 1
    if prompt is not None:
        if len(prompt) == 0:
            raise ValueError("prompt is an empty list")
        return len(prompt)
    return prompt_embeds.shape[0]


def _encode_references(vae, refs: list, control_hws: list, device, dtype) -> list | None:
    """Each reference preprocessed at its size and encoded on the VAE's device, the latents moved to the
    transformer's (None for text-to-image)."""
    if not refs:
        return None
    return [encode_image(vae, preprocess_image(im, *hw), device=device, dtype=dtype)
            for im, hw in zip(refs, control_hws)]


def _tokens(transformer, image_latents, n_total: int, height: int, width: int, generator, latents, mask, region):
    """(noise tokens [B*n, N, 64], control tokens [B*n, M, 64] or None, img_ids [N + M, 3]), target first as the
    pipeline's prepare_latents; with the region token, its one token (from the mask, fixed for every step and both
    CFG branches) after the control tokens."""
    device, dtype = _device_of(transformer), transformer.dtype
    if latents is not None:
        expected = (n_total, (height // MULTIPLE) * (width // MULTIPLE), transformer.config.in_channels)
        if tuple(latents.shape) != expected:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; expected {expected} (packed) for "
                             f"{n_total} images of {height}x{width}")
    latents, control_latents, img_ids, control_ids = prepare_latents(
        image_latents, n_total, height, width, dtype, device, generator, latents,
        num_channels_latents=transformer.config.in_channels // 4)  # as the pipeline: not a constant 16
    if control_ids is not None:
        img_ids = torch.cat([img_ids, control_ids], dim=0)
    if region is not None and mask is not None:
        grid = (2 * (height // MULTIPLE), 2 * (width // MULTIPLE))  # the output's latent size
        m = mask if isinstance(mask, torch.Tensor) else mask_latent(mask, grid, "mask")
        tmask = token_mask(m.float()[None]).expand(n_total, -1, -1, -1)
        control_latents, img_ids = append_region(region, tmask.to(_device_of(region)), control_latents, img_ids)
    return latents, control_latents, img_ids


def _ip_embeds(c, ip_adapter_image, ip_adapter_image_embeds, n_total: int, height: int, width: int,
               do_true_cfg: bool, device):
    """IP-Adapter embeddings (positive, negative) [B*n, 1, D], the pipeline's: true CFG's negative from its all-black
    image; (None, None) without an IP-Adapter input."""
    if ip_adapter_image is None and ip_adapter_image_embeds is None:
        return None, None
    one = (ip_adapter_image_embeds if ip_adapter_image_embeds is not None
           else encode_ip_image(c.image_encoder, c.feature_extractor, ip_adapter_image))
    ip_embeds = torch.cat([one.reshape(1, 1, -1)] * n_total).to(device)
    if not do_true_cfg:
        return ip_embeds, None
    black = np.zeros((width, height, 3), dtype=np.uint8)  # the pipeline's shape; constant, so any size
    return ip_embeds, torch.cat([encode_ip_image(c.image_encoder, c.feature_extractor, black)] * n_total).to(device)


def _schedule(sigmas, num_inference_steps: int, n_tokens: int, device):
    """(scheduler, timesteps): sigmas 1 -> 1/N, shifted by mu(token count) inside set_timesteps (the pipeline's
    calculate_shift and retrieve_timesteps)."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift, retrieve_timesteps

    scheduler = flux_scheduler()
    if sigmas is None:
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    cfg = scheduler.config
    mu = calculate_shift(n_tokens, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    timesteps, _ = retrieve_timesteps(scheduler, None, device, sigmas=sigmas, mu=mu)
    scheduler.set_begin_index(0)
    return scheduler, timesteps


def _denoise(transformer, scheduler, timesteps, latents, control_latents, img_ids, guidance_scale: float, positive,
             negative, true_cfg_scale: float, ip_embeds, cache: str, ip_adapter_scale, progress: bool, devices):
    """The denoising loop (pipeline.__call__'s): Euler steps of the scheduler on the transformer's velocity, true CFG
    v = v_neg + s * (v_pos - v_neg) when `negative` is given; positive / negative are _prompt_embeds' triples, the
    step cache (if any) is on the transformer for this loop only. Returns (latents, seconds per step, the clock after
    the last step)."""
    device, dtype, n_total = _device_of(transformer), transformer.dtype, latents.shape[0]
    ip_pos, ip_neg = ip_embeds
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(n_total)
    steps = []
    current = [None]  # the step's timestep (0-1000), the pipeline's `current_timestep` that FasterCache reads
    t_step = _clock(devices)
    with step_cache(transformer, cache, len(timesteps), dtype, lambda: current[0], negative is not None), \
            ip_scale(transformer, ip_adapter_scale):
        for i, t in enumerate(tqdm(timesteps, desc="denoise", unit="step", disable=not progress)):
            current[0] = t
            timestep = t.expand(n_total).to(dtype) / 1000  # the transformer takes t in [0, 1]
            where = dict(step_index=i, num_inference_steps=len(timesteps), timestep=t)
            with cache_context(transformer, "cond", **where):
                v = predict_velocity(transformer, latents, control_latents, timestep, guidance, *positive, img_ids,
                                     ip_pos)
            if negative is not None:
                with cache_context(transformer, "uncond", **where):
                    v_neg = predict_velocity(transformer, latents, control_latents, timestep, guidance, *negative,
                                             img_ids, ip_neg)
                v = v_neg + true_cfg_scale * (v - v_neg)
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
            now = _clock(devices)  # on CUDA a sync already: the check below costs one small reduction
            if not torch.isfinite(latents).all():  # a NaN here ends as a black image: stop and say where
                raise FloatingPointError(f"the latents became NaN/inf at denoising step {i + 1} of {len(timesteps)} "
                                         f"(t={float(t):.0f}/1000): a LoRA scale too high, a diverged LoRA, or fp16 "
                                         f"overflow")
            steps.append(now - t_step)
            t_step = now
    return latents, steps, t_step


def _decode(vae, latents, height: int, width: int, output_type: str):
    """VAE decode on the VAE's device, pixels -> output_type with the pipeline's own postprocess (None for
    "latent")."""
    if output_type == "latent":
        return None
    from diffusers.image_processor import VaeImageProcessor

    pixels = decode_latents(vae, unpack_latents(latents, 2 * (height // MULTIPLE), 2 * (width // MULTIPLE)))
    return VaeImageProcessor(vae_scale_factor=MULTIPLE).postprocess(pixels, output_type=output_type)


@torch.no_grad()  # as pipeline.__call__ (grad mode also changes which SDPA kernel runs)
def sample(components, image, prompt, *, prompt_2=None, negative_prompt=_DEFAULTS.negative_prompt,
           negative_prompt_2=None, true_cfg_scale: float = _DEFAULTS.true_cfg_scale,
           guidance_scale: float = _DEFAULTS.guidance_scale, num_inference_steps: int = _DEFAULTS.num_inference_steps,
           sigmas=None, generator=None, height: int | None = None, width: int | None = None,
           max_area: int = _DEFAULTS.max_area, size_mode: str = _DEFAULTS.size_mode, auto_resize: bool = True,
           max_sequence_length: int = _DEFAULTS.max_sequence_length, num_images_per_prompt: int = 1,
           prompt_embeds=None, pooled_prompt_embeds=None, negative_prompt_embeds=None,
           negative_pooled_prompt_embeds=None, latents=None, output_type: str = "pil",
           cache: str = _DEFAULTS.cache, ip_adapter_image=None, ip_adapter_image_embeds=None,
           ip_adapter_scale: float | None = None, mask=None, region=None, progress: bool = True) -> SampleOutput:
    """FluxKontextPipeline.__call__ for image editing, over loaded `Components` (load.py), with per-stage timings.

    image: one PIL image / HWC ndarray / CHW tensor (values as the pipeline takes them), a list of them (several
    references of one edit, in order, as ComfyUI's chained ReferenceLatent nodes; not a batch as in the pipeline:
    each is sized like the pipeline's one image, its ids placed by encode.reference_offsets; the output size follows
    the first), or None for text-to-image (no control tokens; FLUX.1-Krea-dev). prompt: a string or a list (a
    batch); a string prompt_2, negative_prompt or negative_prompt_2 is used for every prompt. True CFG runs when
    true_cfg_scale > 1 with a negative prompt: v = v_neg + true_cfg_scale * (v_pos - v_neg). Sizes: see
    `sample_sizes` (size_mode "pipeline" or "native").
    Given prompt_embeds / pooled_prompt_embeds ([B, L, D] / [B, P]) are repeated num_images_per_prompt times.
    latents: packed starting noise [B * n, N, 64]. Returns SampleOutput(images, latents, timings).
    cache: reuse work across steps, "METHOD:VALUE" (stepcache.py: first_block, mag, taylorseer, faster, tea; "" off),
    enabled on the transformer for this call only; each transformer call runs in FluxPipeline's cache_context
    ("cond", true CFG's negative "uncond"), so the two branches keep separate caches.

    Defaults: a keyword named like a SampleConfig field takes its default (config.py). Those are the pipeline's,
    except size_mode: "native" (output = input size); size_mode="pipeline" gives the pipeline's height x width
    (1024 x 1024) rescaled to max_area. auto_resize is the pipeline's _auto_resize (default True).

    IP-Adapter (load.py loads it with model.ip_adapter): ip_adapter_image (one image, embedded by
    components.image_encoder) or ip_adapter_image_embeds [1, 1, D], used for every image of the batch as the
    pipeline does; with true CFG the negative branch gets the pipeline's all-black image. ip_adapter_scale: the
    adapter's strength for this call (None: as loaded). Region token (region.py): mask, a PIL image (white = edit
    region; resized to the output's latent grid) or a latent-resolution tensor [1, h, w], and region, the
    MaskRegionToken trained with the LoRA; the token joins the image sequence in both CFG branches. Without them
    the call is the pipeline's exactly."""
    c = components
    _check_inputs(c, image, prompt, prompt_embeds, pooled_prompt_embeds, negative_prompt, negative_prompt_embeds,
                  negative_pooled_prompt_embeds, true_cfg_scale, output_type)
    check_cache(cache, true_cfg_scale > 1)
    _check_conditioning(c, ip_adapter_image, ip_adapter_image_embeds, mask, region)
    devices = _cuda_devices(c.clip, c.t5, c.vae, c.transformer, getattr(c, "image_encoder", None))
    transformer = c.transformer
    device, dtype = _device_of(transformer), transformer.dtype
    start = _clock(devices)
    refs = _references(image)
    (height, width), control_hws = _sizes(refs, height, width, max_area, size_mode, auto_resize)
    batch_size = _batch_size(prompt, prompt_embeds)
    n_total, do_true_cfg = batch_size * num_images_per_prompt, true_cfg_scale > 1

    # 1. prompts, on the text encoders' devices, then moved to the transformer's device and dtype
    positive = _prompt_embeds(c, prompt, _as_batch(prompt_2, batch_size, "prompt_2"), prompt_embeds,
                              pooled_prompt_embeds, num_images_per_prompt, max_sequence_length, device, dtype)
    negative = None
    if do_true_cfg:
        negative = _prompt_embeds(c, _as_batch(negative_prompt, batch_size, "negative_prompt"),
                                  _as_batch(negative_prompt_2, batch_size, "negative_prompt_2"), negative_prompt_embeds,
                                  negative_pooled_prompt_embeds, num_images_per_prompt, max_sequence_length, device,
                                  dtype)
    t_prompt = _clock(devices)
    # 2. references: encoded on the VAE's device, the latents moved to the transformer
    image_latents = _encode_references(c.vae, refs, control_hws, device, dtype)
    t_image = _clock(devices)
    # 3. noise tokens, control tokens (+ the region token) and their ids; IP-Adapter embeddings
    latents, control_latents, img_ids = _tokens(transformer, image_latents, n_total, height, width, generator,
                                                latents, mask, region)
    ip_embeds = _ip_embeds(c, ip_adapter_image, ip_adapter_image_embeds, n_total, height, width, do_true_cfg, device)
    # 4. schedule, 5. denoise
    scheduler, timesteps = _schedule(sigmas, num_inference_steps, latents.shape[1], device)
    latents, steps, t_step = _denoise(transformer, scheduler, timesteps, latents, control_latents, img_ids,
                                      guidance_scale, positive, negative, true_cfg_scale, ip_embeds, cache,
                                      ip_adapter_scale, progress, devices)
    # 6. decode
    images = _decode(c.vae, latents, height, width, output_type)
    end = _clock(devices)
    timings = Timings(encode_prompt=t_prompt - start, encode_image=t_image - t_prompt, steps=steps,
                      decode=end - t_step, total=end - start)
    return SampleOutput(images=images, latents=latents, timings=timings)


# ---------------------------------------------------------------- CLI

Repeated = Annotated[tuple[str, ...], tyro.conf.UseAppendAction]  # --image a.png --image b.png -> ("a.png", "b.png")


@dataclass
class Args:
    """Edit an image with FLUX.1 Kontext. The model comes from --config (config.model), the --sample.* defaults from
    its config.sample (SampleConfig in config.py)."""

    prompt: str = ""  # the edit instruction (required)
    image: Repeated = ()  # input image; repeat the flag for several references, in order; none: text-to-image
    out: str = "edited.png"
    config: str = ""  # config file (python defining `config = Config(...)`); empty: the Config() defaults
    lora: tuple[str, ...] = ()  # LoRA safetensors files, applied together
    lora_scale: tuple[float, ...] = ()  # one per --lora (default 1.0 each)
    mask: str = ""  # edit-region mask (white = edit) for a LoRA trained with a region token (lora.region.safetensors)
    ip_image: str = ""  # the IP-Adapter's image (e.g. a depth map); needs model.ip_adapter in --config
    ip_adapter_scale: float | None = None  # the IP-Adapter's strength (default: model.ip_adapter.scale)
    height: int | None = None  # pipeline: output height before the max_area rescale (1024); native: text-to-image
    width: int | None = None  # pipeline: output width before the max_area rescale (1024); native: text-to-image
    sample: SampleConfig = field(default_factory=SampleConfig)  # defaults: the --config file's config.sample


def parse_args(argv: list[str] | None = None) -> Args:
    """`--config file.py` supplies the --sample.* defaults (its config.sample), tyro flags override them."""
    path, rest = split_config_flag(sys.argv[1:] if argv is None else argv)
    default = Args(config=path or "", sample=load_config(path).sample if path else SampleConfig())
    return tyro.cli(Args, default=default, args=rest, description=__doc__.splitlines()[0])


def main(args: Args) -> Path:
    """Check every file first, then load the model, apply the LoRAs, sample, save, print the timing table."""
    s = args.sample
    if not args.prompt:
        raise ValueError("--prompt is required")
    # the checks sample() makes that need no model, made before loading one (theirs first: the more specific words)
    _check_true_cfg(s.true_cfg_scale, s.negative_prompt is not None)
    check_cache(s.cache, s.true_cfg_scale > 1)
    validate_sample(s)
    images = [_within_budget(open_image(Path(p)), p, s.pixel_budget) if s.size_mode == "native" else open_image(Path(p))
              for p in args.image]
    small = [f"{p} ({im.width}x{im.height})" for p, im in zip(args.image, images) if min(im.size) < MULTIPLE]
    if small:
        raise ValueError(f"--image: {', '.join(small)}: expected at least {MULTIPLE}x{MULTIPLE} pixels (one token: "
                         f"a 2x2 patch of latent cells of 8x8 pixels)")
    sample_sizes(image_size(images[0]) if images else None, args.height, args.width, s.max_area, s.size_mode, True)
    out = Path(args.out)
    if out.suffix.lower() not in Image.registered_extensions():
        raise ValueError(f"--out {str(out)!r}: unknown image extension {out.suffix!r} (use .png, .jpg, .webp, ...)")
    if args.lora_scale and len(args.lora_scale) != len(args.lora):
        raise ValueError(f"{len(args.lora)} --lora file(s) but {len(args.lora_scale)} --lora-scale value(s)")
    mc = load_config(args.config).model if args.config else ModelConfig()
    skeleton = transformer_skeleton(mc)  # module names and shapes from config.json: no weights
    for path in args.lora:  # a missing, unreadable, non-finite or mismatched file fails now, not after loading
        state_dict, _ = read_lora(path)
        if skeleton is not None:
            check_file(skeleton, state_dict, path)
    for cut in cut_prompts({"--prompt": args.prompt}, load_t5_tokenizer(mc), s.max_sequence_length):
        print(f"warning: {cut}, more than --sample.max-sequence-length {s.max_sequence_length}: the rest is cut off")
    region, mask = _region_inputs(args, images)
    ip_image = open_image(Path(args.ip_image)) if args.ip_image else None
    if ip_image is not None and not mc.ip_adapter.path:
        raise ValueError(f"--ip-image {args.ip_image}: the --config has no model.ip_adapter.path (the IP-Adapter to "
                         f"condition with)")
    if ip_image is None and mc.ip_adapter.path:
        raise ValueError(f"the --config loads an IP-Adapter ({mc.ip_adapter.path}): pass --ip-image (e.g. a depth map)")

    components = load_components(mc)
    for i, path in enumerate(args.lora):
        load_lora(components.transformer, path, f"lora{i}", args.lora_scale[i] if args.lora_scale else 1.0)
    prepare_transformer(components.transformer, s, parse_device(mc.transformer.device, "transformer"),
                        mc.resident_blocks if mc.offload else None)

    # the other SampleConfig fields are sample() keywords of the same name (tests/test_sample.py checks it)
    kw = {k: v for k, v in dataclasses.asdict(s).items() if k not in NOT_SAMPLE_KWARGS}
    if region is not None:
        if region.proj.out_features != components.transformer.config.in_channels:
            raise ValueError(f"the region token beside {args.lora} is {region.proj.out_features} wide but the "
                             f"transformer takes {components.transformer.config.in_channels} input channels")
        region.to(parse_device(mc.transformer.device, "transformer"))
    saved = compile_cache.cache_file(s.compile_cache, compile_cache.describe(
        components.transformer, job="sample", images=[image_size(im) for im in images], prompt=args.prompt,
        size=[args.height, args.width, s.max_area, s.size_mode], cfg=s.true_cfg_scale > 1, cache=s.cache)) \
        if compile_cache.is_compiled(components.transformer) else None
    if compile_cache.load(saved):
        print(f"compile cache: loaded {saved}")
    result = sample(components, images or None, args.prompt, generator=torch.Generator().manual_seed(s.seed),
                    height=args.height, width=args.width, ip_adapter_image=ip_image,
                    ip_adapter_scale=args.ip_adapter_scale, mask=mask, region=region, **kw)
    if compile_cache.save(saved):
        print(f"compile cache: saved {saved} (a later process with this setting skips code generation)")
    out.parent.mkdir(parents=True, exist_ok=True)
    result.images[0].save(out)
    print(format_timings(result.timings))
    print(f"saved {out} ({result.images[0].width}x{result.images[0].height})")
    return out


def _within_budget(image, path: str, budget: int):
    """The image, or a copy resized down to `budget` pixels (aspect kept; sample() then floors to 16), said once.
    Why: native size sampling costs grow with the square of the token count; a 3000x3000 photo would take minutes per
    step where 1024x1024 takes seconds."""
    if image.width * image.height <= budget:
        return image
    k = (budget / (image.width * image.height)) ** 0.5
    w, h = max(MULTIPLE, int(image.width * k)), max(MULTIPLE, int(image.height * k))
    print(f"note: --image {path} is {image.width}x{image.height}; resized to {w}x{h} (--sample.pixel-budget "
          f"{budget}; raise it to sample larger)")
    return image.resize((w, h), Image.LANCZOS)


def _region_inputs(args: Args, images: list):
    """(region token, mask image) for the CLI: the token is read from beside the --lora that has one
    (lora.region.safetensors); --mask needs it, and it needs --mask (without one the LoRA runs without its token,
    said once). Checked before the model loads."""
    found = [region_path(p) for p in args.lora if region_path(p).is_file()]
    if len(found) > 1:
        raise ValueError(f"several --lora files have a region token ({', '.join(map(str, found))}); one call takes one")
    if args.mask and not found:
        raise ValueError(f"--mask {args.mask}: no --lora has a region token beside it (train.region_token writes "
                         f"lora.region.safetensors next to lora.safetensors)")
    if found and not args.mask:
        print(f"note: {found[0]} is not used without --mask (the edit region)")
        return None, None
    if not found:
        return None, None
    mask = open_image(Path(args.mask), "L", (0, 0, 0))  # transparent = outside the region, as in training
    if images and mask.size != images[0].size:
        raise ValueError(f"--mask {args.mask} is {mask.width}x{mask.height} but --image {args.image[0]} is "
                         f"{images[0].width}x{images[0].height}; the mask marks the region of the image to edit")
    return load_region(found[0]), mask


if __name__ == "__main__":
    quiet.install()
    try:
        main(parse_args())
    except (ValueError, FloatingPointError) as e:  # user errors (files, flags, LoRA keys): the message, exit 2
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)
