"""LoRA flow-matching training of FLUX.1 Kontext: `python train.py --config configs/tiny.py [--train.lr 2e-5]`.

The objective (the one place it is written):
    x_t = (1 - t) * x0 + t * noise,   target = noise - x0,   loss = mean((v(x_t, t) - target)^2)
with t in [0, 1] (t = 1 is pure noise; sampling runs t from 1 to 0), passed to the transformer as `timestep=t`
(the pipeline passes sigma * 1000 / 1000). The transformer sees cat([noisy target tokens, control tokens]) with
ids (0, row, col) and (1, row, col) (several references: side by side on the index-1 plane, encode.control_ids);
only the first N (target) outputs are scored. train.loss="dual_masked" (dual_masked_terms) keeps this convention
and scores the same prediction inside the mask against noise - x0, outside it as (noise - v) against the control.
train.region_token appends one token after the control tokens (region.py, ids (2, 0, 0)); an IP-Adapter
(model.ip_adapter) gets each sample's cached image embeddings; both condition the same prediction.

Noise, timesteps, caption dropout and the data order are pure functions of (seed, step): a resumed run repeats
exactly what the uninterrupted one would have done, and DDP ranks slice one global batch. Multi-GPU:
`torchrun --nproc_per_node N train.py --config ...` (DDP over the LoRA parameters).
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from cache import cache_dir_of, control_latents_of, training_data
from config import Config, TrainConfig, cli, to_json, validate
from convert import save_lora_as
from data import check_dataset, scan_dataset, validate_dataset
from encode import latent_ids, pack_controls, pack_latents, predict_velocity, token_mask
from images import open_image
from kontext_kernels.attention import set_attention
from kontext_kernels.fp8 import FP8Linear
from kontext_kernels.int4 import Linear4bit
from load import Components, load_transformer, load_vae, parse_dtype
from lora import (add_lora, claim_out_dir, config_differences, load_checkpoint, new_run_id, resolve_resume,
                  save_checkpoint)
from offload import offload_transformer
from region import MaskRegionToken, append_region, region_path, save_region
from sample import sample

# ---------------------------------------------------------------- the objective


def sample_timesteps(n: int, cfg: TrainConfig, n_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """t in (0, 1): uniform, or logit-normal; optionally shifted toward noise for large images with the
    sampler's own shift (mu = calculate_shift(n_tokens), t' = e^mu t / (1 + (e^mu - 1) t))."""
    if cfg.timestep_sampling == "uniform":
        t = torch.rand(n, generator=generator)
    elif cfg.timestep_sampling == "logit_normal":
        t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator))
    else:
        raise ValueError(f"train.timestep_sampling: {cfg.timestep_sampling!r}; expected uniform | logit_normal")
    if cfg.resolution_shift:
        from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

        s = math.exp(calculate_shift(n_tokens))
        t = s * t / (1 + (s - 1) * t)
    return t


def predicted_velocity(transformer, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                       control: torch.Tensor | None, prompt_embeds, pooled_prompt_embeds, img_ids, text_ids,
                       guidance: float, ip_embeds=None, region=None, tmask=None) -> torch.Tensor:
    """The transformer's velocity at x_t = (1 - t) x0 + t noise (the one place x_t is formed), [B, N, 64].
    Conditioning beyond the control tokens: ip_embeds, an IP-Adapter's image embeddings [B, 1, D]; region, the
    region-token module, appended after the control tokens from the token-grid mask tmask [B, 1, H', W']."""
    t_ = t.view(-1, 1, 1).to(x0.dtype)
    x_t = (1 - t_) * x0 + t_ * noise
    g = torch.full((x0.shape[0],), guidance, device=x0.device, dtype=torch.float32)
    control, img_ids = append_region(region, tmask, control, img_ids)
    return predict_velocity(transformer, x_t, control, t.to(x0.dtype), g, prompt_embeds, pooled_prompt_embeds,
                            text_ids, img_ids, ip_embeds)


def flow_matching_loss(transformer, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                       control: torch.Tensor | None, prompt_embeds, pooled_prompt_embeds, img_ids, text_ids,
                       guidance: float, weight: torch.Tensor | None = None, **cond) -> torch.Tensor:
    """Packed x0, noise [B, N, 64]; control [B, M, 64] or None; t [B]; weight [B, N, 1] or None; cond:
    predicted_velocity's ip_embeds / region / tmask."""
    pred = predicted_velocity(transformer, x0, noise, t, control, prompt_embeds, pooled_prompt_embeds, img_ids,
                              text_ids, guidance, **cond)
    err = (pred.float() - (noise - x0).float()) ** 2
    if weight is None:
        return err.mean()
    return (err * weight).sum() / (weight.sum() * err.shape[-1]).clamp_min(1e-8)


def dual_masked_terms(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, context: torch.Tensor,
                      mask: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The dual masked loss's two data terms, with the convention above (x_t = (1 - t) x0 + t noise, v = noise - x0):
    inside the mask (m = 1) the velocity error (v_pred - (noise - x0))^2; outside it the identity on the
    reconstructed latent, (noise - v_pred - context)^2. Both are normalised together by sum(weight) * C, as the
    plain weighted loss is, so an all-ones mask gives exactly the plain loss and an all-zeros one the identity term.
    pred, x0, noise, context [B, N, C]; mask, weight [B, N, 1]."""
    pred, x0, noise, context = pred.float(), x0.float(), noise.float(), context.float()
    den = (weight.sum() * pred.shape[-1]).clamp_min(1e-8)
    inside = ((pred - (noise - x0)) ** 2 * weight * mask).sum() / den
    outside = ((noise - pred - context) ** 2 * weight * (1 - mask)).sum() / den
    return {"loss_in": inside, "loss_out": outside}


def dual_masked_loss(transformer, x0, noise, t, control, prompt_embeds, pooled_prompt_embeds, img_ids, text_ids,
                     guidance: float, weight: torch.Tensor | None, mask: torch.Tensor | None, **cond) -> dict:
    """dual_masked_terms on the transformer's prediction. The outside term compares with the control token by token,
    so the (single) control must have the target's size. No mask: the whole image is editable (the plain loss).
    cond: predicted_velocity's ip_embeds / region / tmask."""
    if control is None or control.shape != x0.shape:
        raise ValueError(f"train.loss='dual_masked' needs one control image the size of the target (pixel-aligned "
                         f"pairs); got control tokens {None if control is None else tuple(control.shape)} for target "
                         f"tokens {tuple(x0.shape)}")
    if mask is None:
        mask = weight = torch.ones(*x0.shape[:2], 1, device=x0.device)
    pred = predicted_velocity(transformer, x0, noise, t, control, prompt_embeds, pooled_prompt_embeds, img_ids,
                              text_ids, guidance, **cond)
    return dual_masked_terms(pred, x0, noise, control, mask, weight)


def lora_l2(params) -> torch.Tensor:
    """The stabilisers' sum of squared parameters (fp32): the LoRA's (train.loss_l2), the region token's
    (train.region_l2)."""
    return sum(p.float().pow(2).sum() for p in params)


# ---------------------------------------------------------------- batches


def step_generator(seed: int, *key) -> torch.Generator:
    h = hashlib.sha256(json.dumps([seed, *key]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


def make_batches(shapes: list[tuple], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch of sample indices: shuffled (seed, epoch), grouped so a batch holds one latent shape."""
    order = torch.randperm(len(shapes), generator=step_generator(seed, "epoch", epoch)).tolist()
    buckets: dict[tuple, list[int]] = {}
    for i in order:
        buckets.setdefault(shapes[i], []).append(i)
    batches = [b[j:j + batch_size] for b in buckets.values() for j in range(0, len(b), batch_size)]
    perm = torch.randperm(len(batches), generator=step_generator(seed, "batches", epoch)).tolist()
    return [batches[i] for i in perm]


def global_batch(shapes: list[tuple], batch_size: int, seed: int, index: int, repeat: int = 1) -> list[int]:
    """The index-th batch of the endless stream of epochs. Every epoch has the same number of batches (shuffling
    moves samples within their shape bucket), so the epoch is index // that number: O(N) per step, not O(steps).
    repeat (DataConfig.repeat, DiffSynth's dataset_repeat): an epoch shuffles the list repeated that many times,
    so each sample comes `repeat` times per epoch (a batch may hold one sample twice)."""
    n, shapes = len(shapes), list(shapes) * repeat
    per_epoch = sum(math.ceil(k / batch_size) for k in Counter(shapes).values())
    return [i % n for i in make_batches(shapes, batch_size, seed, index // per_epoch)[index % per_epoch]]


def collate(entries: list[dict], empty: dict, cfg: TrainConfig, step_key: tuple, device, dtype, rank_slice: slice):
    """Stack cached tensors into the transformer's inputs for the whole global batch, draw its noise, t and
    caption dropout from (seed, step_key), then keep this rank's slice."""
    g = step_generator(cfg.seed, *step_key)
    x0 = pack_latents(torch.stack([e["image_latents"] for e in entries]).float())
    h, w = entries[0]["image_latents"].shape[1:]
    noise = torch.randn(x0.shape, generator=g)
    t = sample_timesteps(len(entries), cfg, x0.shape[1], g)
    drop = torch.rand(len(entries), generator=g) < cfg.caption_dropout
    embeds = torch.stack([empty["empty_prompt_embeds"] if d else e["prompt_embeds"] for e, d in zip(entries, drop)])
    pooled = torch.stack([empty["empty_pooled_prompt_embeds"] if d else e["pooled_prompt_embeds"]
                          for e, d in zip(entries, drop)])
    ids = [latent_ids(h, w, 0.0)]
    control = None
    refs = [control_latents_of(e) for e in entries]  # one shape bucket: the same number and sizes in every entry
    if len({len(r) for r in refs}) > 1:  # zip would drop the extra references silently
        raise ValueError(f"collate: entries with {sorted({len(r) for r in refs})} references in one batch")
    if refs[0]:
        control, control_ids = pack_controls([torch.stack(r).float() for r in zip(*refs)])
        ids.append(control_ids)
    weight = m = tmask = ip = None
    if "mask" in entries[0]:
        tmask = token_mask(torch.stack([e["mask"] for e in entries]).float())  # [B, 1, h/2, w/2]
        m = tmask.flatten(2).transpose(1, 2)  # [B, N, 1], in token order
        weight = cfg.mask_weight_bg + (cfg.mask_weight_fg - cfg.mask_weight_bg) * m
    if "ip_image_embeds" in entries[0]:
        ip = torch.stack([e["ip_image_embeds"] for e in entries]).float()  # [B, 1, D]
    to = lambda x: None if x is None else x[rank_slice].to(device=device, dtype=dtype)  # noqa: E731
    on = lambda x: None if x is None else x[rank_slice].to(device)  # noqa: E731  (fp32: weights, masks)
    return dict(x0=to(x0), noise=to(noise), t=t[rank_slice].to(device), control=to(control),
                prompt_embeds=to(embeds), pooled_prompt_embeds=to(pooled),
                img_ids=torch.cat(ids).to(device=device, dtype=dtype),
                text_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
                weight=on(weight), mask=on(m), tmask=on(tmask), ip_embeds=to(ip))


# ---------------------------------------------------------------- model, step, optimizer, schedule


def prepare_transformer(transformer, tc: TrainConfig, device: torch.device,
                        offload: int | None = None) -> tuple[list, str]:
    """What training does to a loaded transformer before the first step, in this order: the attention backend pinned
    in this model, the fp8 input-gradient choice, gradient checkpointing, the LoRA (seeded), train mode, block
    offload (`offload` = blocks kept resident, None: off; ModelConfig.offload), regional compile (CUDA only: on the
    CPU inductor compiles for minutes and gains little). Returns (LoRA parameters, attention backend). bench.py calls
    this too, so its rows time what `python train.py` runs."""
    # attention runs in the hidden states' dtype, set by the input embedder (block Linears may hold fp8/4-bit codes)
    attn_dtype = torch.bfloat16 if tc.autocast else transformer.x_embedder.weight.dtype
    attention = set_attention(transformer, tc.attention_backend, device, attn_dtype)
    for m in transformer.modules():
        if isinstance(m, FP8Linear):
            m.set_backward_fp8(tc.fp8_backward)
    if tc.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    torch.manual_seed(tc.seed)  # LoRA A init draws from the global generator: same seed, same start
    params = add_lora(transformer, tc)
    transformer.train()
    if offload is not None:
        transformer._block_offload = offload_transformer(transformer, device, offload)
    if compile_choice(transformer, tc, device) == "on":
        transformer.compile_repeated_blocks(fullgraph=False)
    return params, attention


def make_region(transformer, tc: TrainConfig, device) -> MaskRegionToken | None:
    """train.region_token's module, fp32 on `device`, seeded (same seed, same start), or None."""
    if not tc.region_token:
        return None
    torch.manual_seed(tc.seed)
    return MaskRegionToken(*tc.region_grid, transformer.config.in_channels).to(device)


def offload_note(transformer) -> str:
    """The log line's words for block offload: blocks streamed and the bytes moved per step (forward + recompute)."""
    off = getattr(transformer, "_block_offload", None)
    if off is None:
        return ""
    return (f"; block offload: {len(off.host)} of {len(off.blocks)} blocks streamed from host memory, "
            f"{2 * off.bytes_per_fetch / 2**30:.1f} GiB moved per step")


def compile_choice(transformer, tc: TrainConfig, device: torch.device) -> str:
    """"on", or "off (why)": regional compile runs on CUDA, and not for a 4-bit transformer, whose compiled LoRA step
    trained no single-block LoRA on the H200 (torch 2.11, tests/test_train.py's crash matrix; cause not isolated)."""
    if not tc.compile:
        return "off"
    if device.type != "cuda":
        return "off (CPU)"
    if hasattr(transformer, "_block_offload"):
        return "off (block offload swaps the blocks' weights each call)"
    if any(isinstance(m, Linear4bit) for m in transformer.modules()):
        return "off (4-bit transformer: its compiled step gave no gradient to the single blocks' LoRA)"
    return "on"


def micro_batches(data, shapes: list[tuple], empty: dict, tc: TrainConfig, step: int, rank: int, world: int,
                  device, dtype, repeat: int = 1):
    """Optimizer step `step`'s grad_accum micro-batches for this rank, collated one at a time:
    (batch, global sample indices, the loss's share). DDP averages gradients over ranks, so each rank's share is
    its slice of the global batch."""
    for micro in range(tc.grad_accum):
        idx = global_batch(shapes, tc.batch_size * world, tc.seed, step * tc.grad_accum + micro, repeat)
        lo, hi = rank * len(idx) // world, (rank + 1) * len(idx) // world
        b = collate([data[i] for i in idx], empty, tc, ("step", step, micro), device, dtype, slice(lo, hi))
        yield b, idx, (hi - lo) / len(idx) * world / tc.grad_accum


class NonFiniteLoss(FloatingPointError):
    def __init__(self, value: float, samples: list[int]):
        super().__init__(f"loss is {value}")
        self.samples = samples  # global indices of the training samples of the bad micro-batch


def batch_terms(model, b: dict, tc: TrainConfig, params: list, region=None) -> dict[str, torch.Tensor]:
    """The loss terms of one collated batch (their sum is the loss): {"loss"} for train.loss="plain"; loss_in,
    loss_out and loss_l2 for "dual_masked"; plus region_l2 with a region token. The region token and the IP-Adapter
    embeddings (b["ip_embeds"]) condition the prediction in both."""
    cond = dict(ip_embeds=b["ip_embeds"], region=region, tmask=b["tmask"])
    args = (model, b["x0"], b["noise"], b["t"], b["control"], b["prompt_embeds"], b["pooled_prompt_embeds"],
            b["img_ids"], b["text_ids"], tc.guidance, b["weight"])
    if tc.loss == "dual_masked":
        part = dual_masked_loss(*args, b["mask"], **cond)
        own = {id(p) for p in region.parameters()} if region is not None else set()
        part["loss_l2"] = tc.loss_l2 * lora_l2([p for p in params if id(p) not in own])
    else:
        part = {"loss": flow_matching_loss(*args, **cond)}
    if region is not None:
        part["region_l2"] = tc.region_l2 * lora_l2(region.parameters())
    return part


def train_step(model, params: list, optimizer, batches, tc: TrainConfig,
               terms: dict | None = None, region=None) -> tuple[float, float, int]:
    """One optimizer step: the loss (batch_terms) and backward per micro-batch (under bf16 autocast if tc.autocast),
    gradient clipping, the optimizer. Returns (mean loss, gradient norm, samples in the global batch: a shape
    bucket's last batch can be smaller than batch_size); `terms`, if given, receives the loss's terms averaged over
    the micro-batches when there are several (dual_masked, a region token). `params`: everything the optimizer
    trains (the LoRA's, then the region token's). A non-finite loss raises FloatingPointError naming the samples
    before the optimizer touches the LoRA."""
    losses, parts = [], []
    for b, idx, share in batches:
        # activation offload: what the backward needs waits in pinned host memory (torch's own hook)
        with (torch.autograd.graph.save_on_cpu(pin_memory=b["x0"].is_cuda) if tc.activation_offload
              else contextlib.nullcontext()), \
                torch.autocast(b["x0"].device.type, dtype=torch.bfloat16, enabled=tc.autocast):
            part = batch_terms(model, b, tc, params, region)
            loss = sum(part.values())
            if len(part) > 1:
                parts.append({k: v.detach() for k, v in part.items()})
        (loss * share).backward()
        losses.append((loss.detach(), idx))
    if terms is not None and parts:
        terms.update({k: sum(p[k].item() for p in parts) / len(parts) for k in parts[0]})
    values = [loss.item() for loss, _ in losses]  # the step's one host sync
    bad = [(v, idx) for v, (_, idx) in zip(values, losses) if not math.isfinite(v)]
    if bad:
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(*bad[0])
    grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sum(v / tc.grad_accum for v in values), float(grad_norm), sum(len(idx) for _, idx in losses)


def make_optimizer(params, cfg: TrainConfig):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        except (ImportError, RuntimeError) as e:
            raise ValueError(f"train.optimizer='adamw8bit' needs a working bitsandbytes: {e}") from e
    raise ValueError(f"train.optimizer: {cfg.optimizer!r}; expected adamw | adamw8bit")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based): linear warmup, then constant/linear/cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.scheduler == "constant":
        return 1.0
    if cfg.scheduler == "linear":
        return max(0.0, 1 - p)
    if cfg.scheduler == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    raise ValueError(f"train.scheduler: {cfg.scheduler!r}; expected constant | linear | cosine")


# ---------------------------------------------------------------- distributed


def dist_info() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def rank_device(cfg: Config, rank: int) -> torch.device:
    """Under torchrun each rank takes cuda:<LOCAL_RANK>; a single process uses the configured device."""
    dev = torch.device(cfg.model.transformer.device)
    if dev.type == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dev


# ---------------------------------------------------------------- main


def check_run(cfg: Config, rank: int, log) -> tuple[list, int, Path | None]:
    """Everything checkable before any model loads: the whole dataset, the held-out split, the run folder
    (lora.claim_out_dir), the checkpoint to resume and how its config differs. Returns (samples, n_train, ckpt)."""
    samples = scan_dataset(cfg.data)
    validate_dataset(samples, cfg.data, cache_dir_of(cfg))  # the stat index there skips re-decoding known files
    if cfg.data.held_out >= len(samples):
        raise ValueError(f"data.held_out={cfg.data.held_out} leaves nothing to train on: the dataset has "
                         f"{len(samples)} samples")
    n_train = len(samples) - max(cfg.data.held_out, 0)
    log(f"dataset: {n_train} training / {len(samples) - n_train} held-out samples from {cfg.data.path}")
    if rank == 0:
        for note in claim_out_dir(Path(cfg.out_dir), cfg.resume, cfg.overwrite):
            log(note)
    conditioning_check(samples, cfg, log)
    ckpt = resolve_resume(cfg.resume, Path(cfg.out_dir), log)
    if ckpt is not None and (diff := config_differences(ckpt, cfg)):
        log(f"warning: resuming {ckpt} with a config that differs from its config.json: {'; '.join(diff)}")
    return samples, n_train, ckpt


def conditioning_check(samples: list, cfg: Config, log) -> None:
    """What the run's conditioning needs of every sample, checked before any model loads: a mask for the region
    token, a depth image for the IP-Adapter (each missing one named). Depth images without an IP-Adapter are
    ignored, said once."""
    need = []
    if cfg.train.region_token:
        need += [f"{s.image}: no mask (train.region_token needs one per sample: masks/<stem>.png, images/<stem>_mask"
                 f".png or a mask column)" for s in samples if s.mask is None]
    if cfg.model.ip_adapter.path:
        need += [f"{s.image}: no depth image (model.ip_adapter needs one per sample: depth/<stem>.png, "
                 f"images/<stem>_depth.png or a depth column)" for s in samples if s.depth is None]
    elif any(s.depth is not None for s in samples):
        log(f"note: {sum(s.depth is not None for s in samples)} depth image(s) ignored: model.ip_adapter.path is "
            f"not set")
    if need:
        shown = need[:20] + ([f"... and {len(need) - 20} more"] if len(need) > 20 else [])
        raise ValueError(f"{len(need)} sample(s) of {cfg.data.path} lack what the config conditions on:\n  "
                         + "\n  ".join(shown))


def batch_plan(shapes: list[tuple], batch_size: int) -> str:
    """One line on how batching will go: batches hold one latent shape, so a bucket's last batch may be smaller."""
    sizes = Counter(min(batch_size, n - j) for n in Counter(shapes).values() for j in range(0, n, batch_size))
    plan = ", ".join(f"{c} x {b}" for b, c in sorted(sizes.items(), reverse=True))
    return (f"batching: {len(Counter(shapes))} shape bucket(s), {sum(sizes.values())} batches per epoch ({plan} "
            f"samples)" + ("" if set(sizes) == {batch_size} else f"; batch_size {batch_size} is not always filled"))


def main(cfg: Config) -> dict:
    validate(cfg)  # also when main is called from Python, not only through cli()
    rank, world = dist_info()
    out_dir, tc = Path(cfg.out_dir), cfg.train
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)

    # 1. The dataset, the run folder and the checkpoint to resume are checked before any model is loaded.
    samples, n_train, ckpt = check_run(cfg, rank, log)
    n_val = len(samples) - n_train
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(to_json(cfg))

    # 2. Latents and embeddings: from the cache (rank 0 writes what is missing, the others then read), or on the fly.
    if world > 1 and rank != 0:
        torch.distributed.barrier()
    data = training_data(cfg, samples, n_train, log)
    if world > 1 and rank == 0:
        torch.distributed.barrier()
    log(batch_plan(data.shapes * cfg.data.repeat, tc.batch_size * world))

    # 3. Transformer + LoRA, exactly as bench.py times it.
    device = rank_device(cfg, rank)
    dtype = parse_dtype(cfg.model.transformer.dtype, "transformer")
    transformer = load_transformer(dataclasses.replace(
        cfg.model, transformer=dataclasses.replace(cfg.model.transformer, device=str(device))))
    params, attention = prepare_transformer(transformer, tc, device,
                                            cfg.model.resident_blocks if cfg.model.offload else None)
    region = make_region(transformer, tc, device)
    compiled = compile_choice(transformer, tc, device)
    log(f"attention: {attention}; compile: {compiled}; "
        f"gradient checkpointing: {'on' if tc.gradient_checkpointing else 'off'}"
        + ("; activation offload: on" if tc.activation_offload else "") + offload_note(transformer))
    model = transformer
    if world > 1:
        # Only the LoRA is trained: DDP must neither broadcast the frozen base (gloo cannot send float8, and a 12B
        # broadcast at start is pure waste) nor re-send quantized buffers every forward.
        frozen = [n for n, p in transformer.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in transformer.named_buffers()]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(transformer, frozen)
        model = torch.nn.parallel.DistributedDataParallel(
            transformer, device_ids=[device.index] if device.type == "cuda" else None)
    region_model = region
    if world > 1 and region is not None:  # its own DDP: it runs outside the transformer's forward
        region_model = torch.nn.parallel.DistributedDataParallel(
            region, device_ids=[device.index] if device.type == "cuda" else None)
    log(f"LoRA: {sum(p.numel() for p in params) / 1e6:.3f}M parameters on {len(tc.target_modules)} module kinds, "
        f"rank {tc.rank}" + (f"; region token: grid {tc.region_grid[0]}x{tc.region_grid[1]}, "
                             f"{sum(p.numel() for p in region.parameters())} parameters" if region else ""))
    params = params + (list(region.parameters()) if region is not None else [])
    optimizer = make_optimizer(params, tc)
    start, run = (load_checkpoint(ckpt, transformer, optimizer, region) if ckpt is not None
                  else (0, new_run_id()))
    if ckpt is not None:
        log(f"resumed from {ckpt} at step {start}" + (f"; train.steps is {tc.steps}: nothing left to train"
                                                        if start >= tc.steps else ""))

    # 4. The loop.
    log_file = open(out_dir / "log.jsonl", "a") if rank == 0 else None
    tb = _tensorboard(out_dir) if rank == 0 else None
    last_ckpt, history, vae = str(ckpt) if ckpt else "none", [], data.vae

    def validate_at(step: int) -> None:
        nonlocal vae
        val = held_out_loss(transformer, data.held_out, data.empty, tc, device, dtype, region)
        log(f"step {step}: held-out loss {val:.4f}")
        if rank == 0:
            log_file.write(json.dumps({"step": step, "held_out_loss": val}) + "\n")
            if step > 0:
                vae = vae or load_vae(cfg.model)  # cached mode: loaded for the grids only when first needed
                path = validation_grid(transformer, vae, samples[n_train:], data.held_out, cfg, step, out_dir,
                                       region)
                log(f"validation grid: {path}")

    if tc.validate_every >= 0 and n_val and start == 0:
        validate_at(0)
    bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, disable=rank != 0, desc="train")
    for step in bar:
        t0 = time.perf_counter()
        for g in optimizer.param_groups:
            g["lr"] = tc.lr * lr_factor(step, tc)
        batches = micro_batches(data.train, data.shapes, data.empty, tc, step, rank, world, device, dtype,
                                cfg.data.repeat)
        try:
            terms: dict = {}
            loss, grad_norm, n = train_step(model, params, optimizer, batches, tc, terms, region_model)
        except NonFiniteLoss as e:
            keys = [samples[i].key for i in e.samples]
            raise FloatingPointError(f"{e} at step {step} on samples {keys}; last good checkpoint: {last_ckpt}. "
                                     f"Lower train.lr or check these samples.") from None
        loss, dt = _mean_over_ranks(loss, world), time.perf_counter() - t0
        if step == start:
            log(f"first step: {dt:.1f} s (warm-up{' and compilation' if compiled == 'on' else ''}; later steps are faster)")
        rec = {"step": step + 1, "loss": loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
               "s_per_step": dt, "samples_per_s": n / dt, **terms}
        history.append(rec)
        if rank == 0:
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            for k, v in rec.items() if tb else ():
                tb.add_scalar(k, v, step + 1)
            if (step + 1) % tc.log_every == 0:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{rec['lr']:.2e}", gn=f"{grad_norm:.3f}",
                                sps=f"{rec['samples_per_s']:.2f}")
        done = step + 1 == tc.steps
        if rank == 0 and (done or (tc.save_every and (step + 1) % tc.save_every == 0)):
            last_ckpt = str(save_checkpoint(out_dir, transformer, optimizer, step + 1, cfg, tc.keep_checkpoints, run,
                                            region))
        if rank == 0 and done:  # before the last grid: a crash there loses nothing
            save_result(transformer, region, out_dir, tc)
        if tc.validate_every >= 0 and n_val and (done or (tc.validate_every and (step + 1) % tc.validate_every == 0)):
            validate_at(step + 1)
    if rank == 0:
        if start >= tc.steps:  # resumed at or past the end: the checkpoint's LoRA is the result
            save_result(transformer, region, out_dir, tc)
        log(f"wrote {out_dir / 'lora.safetensors'}"
            + (f", {region_path(out_dir / 'lora.safetensors').name} beside it" if region is not None else "")
            + f" and checkpoint {last_ckpt}")
        log_file.close()
    if world > 1:
        torch.distributed.barrier()
    return {"history": history, "transformer": transformer, "lora": out_dir / "lora.safetensors"}


def save_result(transformer, region, out_dir: Path, tc: TrainConfig) -> None:
    """The run's result: lora.safetensors in train.lora_format, and the region token beside it."""
    save_lora_as(transformer, out_dir / "lora.safetensors", tc.lora_format)
    if region is not None:
        save_region(region, region_path(out_dir / "lora.safetensors"))


# ---------------------------------------------------------------- validation


def tile_grid(rows: list[list], gap: int = 0, fill=(255, 255, 255)):
    """Rows of PIL images as one RGB image, every tile whole at the top left of its cell: rows right-aligned by
    column (the last columns, sample | target, line up when rows hold different numbers of controls), each column as
    wide as its widest tile, each row as high as its highest, padding and `gap` pixels between cells in `fill` (white:
    not mistaken for a dark tile's edge)."""
    from PIL import Image

    n = max(len(r) for r in rows)
    rows = [[None] * (n - len(r)) + list(r) for r in rows]
    widths = [max((r[j].width for r in rows if r[j] is not None), default=0) for j in range(n)]
    heights = [max(t.height for t in r if t is not None) for r in rows]
    grid = Image.new("RGB", (sum(widths) + gap * (n - 1), sum(heights) + gap * (len(rows) - 1)), fill)
    y = 0
    for r, h in zip(rows, heights):
        x = 0
        for t, w in zip(r, widths):
            if t is not None:
                grid.paste(t.convert("RGB"), (x, y))
            x += w + gap
        y += h + gap
    return grid


@torch.no_grad()
def validation_grid(transformer, vae, val_samples, val_data, cfg: Config, step: int, out_dir: Path,
                    region=None) -> Path:
    """sample.py on each held-out pair (fixed seeds, cached prompt embeddings, the cached IP-Adapter embeddings and
    the mask for the region token when the run uses them), saved as one PNG with a row per sample:
    control(s) | sample | target."""
    was = transformer.training
    transformer.eval()
    rows = []
    for i, s in enumerate(val_samples):
        e = val_data[i]
        controls = [open_image(p, background=cfg.data.background) for p in s.controls]
        control = controls or None  # sample() takes the list of references; [one] is the single-image edit
        target = open_image(s.image, background=cfg.data.background)
        sc = cfg.sample
        out = sample(Components(vae=vae, transformer=transformer), control, None,
                     prompt_embeds=e["prompt_embeds"][None], pooled_prompt_embeds=e["pooled_prompt_embeds"][None],
                     guidance_scale=sc.guidance_scale, num_inference_steps=sc.num_inference_steps,
                     generator=torch.Generator().manual_seed(sc.seed + i), size_mode="native",
                     height=None if control is not None else target.height,
                     width=None if control is not None else target.width, progress=False,
                     ip_adapter_image_embeds=e.get("ip_image_embeds"),
                     mask=e.get("mask") if region is not None else None, region=region).images[0]
        rows.append(controls + [out, target])
    grid = tile_grid(rows)
    path = out_dir / "validation" / f"step-{step:06d}.png"  # a log artefact, not a checkpoint
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    transformer.train(was)
    return path


@torch.no_grad()
def held_out_loss(transformer, val_data, empty, tc: TrainConfig, device, dtype, region=None) -> float:
    """Flow-matching loss on the held-out samples at fixed noise and t in {0.25, 0.5, 0.75} (comparable across
    steps and runs), conditioned as training is (IP-Adapter embeddings, region token)."""
    was = transformer.training
    transformer.eval()
    total, n = 0.0, 0
    vc = dataclasses.replace(tc, caption_dropout=0.0)
    for i in range(len(val_data)):
        for t in (0.25, 0.5, 0.75):
            b = collate([val_data[i]], empty, vc, ("val", i), device, dtype, slice(0, 1))
            b["t"] = torch.full_like(b["t"], t)
            total += flow_matching_loss(transformer, b["x0"], b["noise"], b["t"], b["control"],
                                        b["prompt_embeds"], b["pooled_prompt_embeds"], b["img_ids"],
                                        b["text_ids"], 1.0, b["weight"], ip_embeds=b["ip_embeds"], region=region,
                                        tmask=b["tmask"]).item()
            n += 1
    transformer.train(was)
    return total / n


def _mean_over_ranks(x: float, world: int) -> float:
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return float(t.item()) / world


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out_dir / "tb"))


if __name__ == "__main__":
    try:
        argv = [a for a in sys.argv[1:] if a != "--check"]
        cfg = cli(argv, description=__doc__.splitlines()[0] + " --check: only check the dataset (data.py check).")
        if len(argv) < len(sys.argv) - 1:  # --check: exit 2 on dataset errors, before any model loads
            sys.exit(check_dataset(cfg.data, cache_dir_of(cfg)))
        main(cfg)
    except ValueError as e:  # user errors (dataset, config, run folder): the message, not a traceback
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
