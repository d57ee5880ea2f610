"""Preservation (differential output preservation): data.preserve_path, a second dataset in any layout data.py
reads, and train.preserve_weight. Each micro-batch gets a batch of those samples beside its training batch; their
target is the base model's own velocity (the same forward with the adapter disabled, no gradient), so the LoRA learns
its edit without changing what the model does on other prompts:

    loss += preserve_weight * mean((v_lora(x_t) - v_base(x_t))^2),   x_t, t and noise drawn as for training.

Cost per micro-batch: the preservation batch's forward and backward (as a training batch) plus one forward without
gradient for the base model's velocity.
"""

import dataclasses
import gc
import os

import torch

from cache import build_cache, cache_dir_of
from config import Config, TrainConfig
from data import scan_dataset, validate_dataset
from load import load_components, model_identity
from objective import collate, global_batch, predicted_velocity
from validate import adapter_disabled


def preserve_config(cfg: Config):
    """The preservation dataset's DataConfig: the training one's preprocessing, data.preserve_path's samples."""
    return dataclasses.replace(cfg.data, path=cfg.data.preserve_path, held_out=0)


def check_preserve(cfg: Config) -> None:
    """Before any model loads: the preservation dataset scans and decodes (data.py's errors, naming its files), and
    it is used only with train.mode lora (the base model is the LoRA's adapter disabled)."""
    if not cfg.data.preserve_path:
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # two forwards through DDP before one backward: not supported
        raise ValueError("data.preserve_path is single-process for now (not under torchrun)")
    if cfg.train.mode != "lora":
        raise ValueError("data.preserve_path needs train.mode lora (the base model's prediction is the LoRA's "
                         "adapter disabled)")
    dc = preserve_config(cfg)
    validate_dataset(scan_dataset(dc), dc, cache_dir_of(cfg))


def preserve_data(cfg: Config, log=print) -> tuple[list[dict], list[tuple]] | None:
    """(cache entries, their latent shapes) of data.preserve_path, encoded into the training cache when missing (the
    text encoders and VAE loaded only then, freed on return), or None without preservation."""
    if not cfg.data.preserve_path:
        return None
    dc = preserve_config(cfg)
    samples = scan_dataset(dc)
    ident = "|".join(model_identity(cfg.model, getattr(cfg.model, n), n) for n in ("clip", "t5", "vae"))
    loaded = []

    def encoders():
        log(f"preservation: caching {dc.path}")
        loaded.append(load_components(cfg.model, which=("clip", "t5", "vae")))
        return loaded[0]

    entries, _ = build_cache(samples, dc, encoders, cache_dir_of(cfg), ident)
    loaded.clear()
    gc.collect()
    shapes = [tuple(e["image_latents"].shape) + tuple(e["control_latents"].shape if "control_latents" in e else ())
              for e in entries]
    log(f"preservation: {len(entries)} samples from {dc.path}, weight {cfg.train.preserve_weight}")
    return entries, shapes


def with_preserve(batches, pdata, empty: dict, tc: TrainConfig, step: int, rank: int, world: int, device, dtype):
    """train.micro_batches' batches, each with b["preserve"]: a collated batch of preservation samples (this
    rank's slice; its own data order, noise and t from (seed, "preserve", step, micro); no caption dropout)."""
    entries, shapes = pdata
    vc = dataclasses.replace(tc, caption_dropout=0.0)
    for micro, (b, idx, share) in enumerate(batches):
        pidx = global_batch(shapes, tc.batch_size * world, tc.seed + 1, step * tc.grad_accum + micro)
        lo, hi = rank * len(pidx) // world, (rank + 1) * len(pidx) // world
        b["preserve"] = collate([entries[i] for i in pidx], empty, vc, ("preserve", step, micro), device, dtype,
                                slice(lo, hi))
        yield b, idx, share


def preserve_loss(model, transformer, b: dict, guidance: float) -> torch.Tensor:
    """mean((v_model - v_base)^2) on a collated preservation batch; v_base: `transformer` (the unwrapped module)
    with its adapter disabled, without gradient."""
    args = (b["x0"], b["noise"], b["t"], b["control"], b["prompt_embeds"], b["pooled_prompt_embeds"], b["img_ids"],
            b["text_ids"], guidance)
    with torch.no_grad(), adapter_disabled(transformer):
        base = predicted_velocity(transformer, *args, ip_embeds=b["ip_embeds"]).float()
    pred = predicted_velocity(model, *args, ip_embeds=b["ip_embeds"])
    return ((pred.float() - base) ** 2).mean()
