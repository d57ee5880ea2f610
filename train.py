"""LoRA flow-matching training of FLUX.1 Kontext: `python train.py --config configs/tiny.py [--train.lr 2e-5]`.

The objective (the one place it is written):
    x_t = (1 - t) * x0 + t * noise,   target = noise - x0,   loss = mean((v(x_t, t) - target)^2)
with t in [0, 1] (t = 1 is pure noise; sampling runs t from 1 to 0), passed to the transformer as `timestep=t`
(the pipeline passes sigma * 1000 / 1000). The transformer sees cat([noisy target tokens, control tokens]) with
ids (0, row, col) and (1, row, col); only the first N (target) outputs are scored.

Noise, timesteps, caption dropout and the data order are pure functions of (seed, step): a resumed run repeats
exactly what the uninterrupted one would have done, and DDP ranks slice one global batch. Multi-GPU:
`torchrun --nproc_per_node N train.py --config ...` (DDP over the LoRA parameters).
"""

import dataclasses
import hashlib
import json
import math
import os
import time
from collections import Counter
from pathlib import Path

import torch

from config import Config, DataConfig, TrainConfig, cli, to_json
from encode import latent_ids, pack_latents, predict_velocity
from lora import add_lora, load_checkpoint, resolve_resume, save_checkpoint, save_lora

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


def flow_matching_loss(transformer, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                       control: torch.Tensor | None, prompt_embeds, pooled_prompt_embeds, img_ids, text_ids,
                       guidance: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Packed x0, noise [B, N, 64]; control [B, M, 64] or None; t [B]; weight [B, N, 1] or None."""
    t_ = t.view(-1, 1, 1).to(x0.dtype)
    x_t = (1 - t_) * x0 + t_ * noise
    target = noise - x0
    g = torch.full((x0.shape[0],), guidance, device=x0.device, dtype=torch.float32)
    pred = predict_velocity(transformer, x_t, control, t.to(x0.dtype), g, prompt_embeds, pooled_prompt_embeds,
                            text_ids, img_ids)
    err = (pred.float() - target.float()) ** 2
    if weight is None:
        return err.mean()
    return (err * weight).sum() / (weight.sum() * err.shape[-1]).clamp_min(1e-8)


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


def global_batch(shapes: list[tuple], batch_size: int, seed: int, index: int) -> list[int]:
    """The index-th batch of the endless stream of epochs. Every epoch has the same number of batches (shuffling
    moves samples within their shape bucket), so the epoch is index // that number: O(N) per step, not O(steps)."""
    per_epoch = sum(math.ceil(n / batch_size) for n in Counter(shapes).values())
    return make_batches(shapes, batch_size, seed, index // per_epoch)[index % per_epoch]


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
    if "control_latents" in entries[0]:
        control = pack_latents(torch.stack([e["control_latents"] for e in entries]).float())
        ids.append(latent_ids(*entries[0]["control_latents"].shape[1:], marker=1.0))
    weight = None
    if "mask" in entries[0]:
        m = pack_latents(torch.stack([e["mask"] for e in entries]).float().repeat(1, 4, 1, 1))[..., :1]
        weight = cfg.mask_weight_bg + (cfg.mask_weight_fg - cfg.mask_weight_bg) * m  # [B, N, 1]
    to = lambda x: None if x is None else x[rank_slice].to(device=device, dtype=dtype)  # noqa: E731
    return dict(x0=to(x0), noise=to(noise), t=t[rank_slice].to(device), control=to(control),
                prompt_embeds=to(embeds), pooled_prompt_embeds=to(pooled),
                img_ids=torch.cat(ids).to(device=device, dtype=dtype),
                text_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
                weight=None if weight is None else weight[rank_slice].to(device))


# ---------------------------------------------------------------- model, optimizer, schedule


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


# ---------------------------------------------------------------- data to tensors


def cached_data(cfg: Config, samples, log) -> tuple[list[dict], dict]:
    """Cached mode: every sample's tensors from the cache; what is missing is encoded first, with the text
    encoders and VAE loaded only then and freed after."""
    import gc

    from cache import build_cache
    from load import load_components, model_identity

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
    loaded.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return entries, empty


class OnTheFly:
    """Uncached mode: encode each sample when a batch needs it (encoders stay loaded on their devices)."""

    def __init__(self, samples, data_cfg: DataConfig, components):
        from cache import encode_empty

        self.samples, self.cfg, self.c = samples, data_cfg, components
        self.empty = encode_empty(data_cfg, components, device="cpu")

    def __getitem__(self, i: int) -> dict:
        from cache import encode_sample

        return encode_sample(self.samples[i], self.cfg, self.c, device="cpu")

    def __len__(self):
        return len(self.samples)


# ---------------------------------------------------------------- main


def main(cfg: Config) -> dict:
    from cache import scan_dataset, validate_dataset
    from load import load_components, load_transformer, parse_dtype

    rank, world = dist_info()
    out_dir = Path(cfg.out_dir)
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    tc = cfg.train
    if tc.batch_size < 1 or tc.grad_accum < 1 or tc.steps < 1:
        raise ValueError("train.batch_size, train.grad_accum and train.steps must be >= 1")

    # 1. The dataset is checked whole before any model is loaded.
    samples = scan_dataset(cfg.data)
    validate_dataset(samples, cfg.data)
    n_val = min(cfg.data.held_out, len(samples) - 1) if cfg.data.held_out > 0 else 0
    train_samples, val_samples = samples[: len(samples) - n_val], samples[len(samples) - n_val:]
    log(f"dataset: {len(train_samples)} training / {len(val_samples)} held-out samples from {cfg.data.path}")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(to_json(cfg))

    # 2. Latents and embeddings: from the cache, or encoded on the fly.
    device = rank_device(cfg, rank)
    dtype = parse_dtype(cfg.model.transformer.dtype, "transformer")
    encoders = vae = None  # the VAE is loaded for validation grids only when first needed (cached mode)
    if tc.cached:
        if rank == 0:
            entries, empty = cached_data(cfg, samples, log)
        if world > 1:
            torch.distributed.barrier()
        if rank != 0:
            entries, empty = cached_data(cfg, samples, log)  # rank 0 has written everything: only reads
        data = entries[: len(train_samples)]
        val_data = entries[len(train_samples):]
    else:
        encoders = load_components(cfg.model, which=("clip", "t5", "vae"))
        otf = OnTheFly(samples, cfg.data, encoders)
        vae = encoders.vae
        data, empty = _Slice(otf, 0, len(train_samples)), otf.empty
        val_data = _Slice(otf, len(train_samples), len(samples))

    shapes = [_shape_of(data, i) for i in range(len(data))]

    # 3. Transformer + LoRA.
    mcfg = dataclasses.replace(cfg.model, transformer=dataclasses.replace(cfg.model.transformer, device=str(device)))
    transformer = load_transformer(mcfg)
    set_attention(transformer, tc.attention_backend, device, tc.gradient_checkpointing, tc.compile, tc.autocast)
    if tc.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    torch.manual_seed(tc.seed)  # LoRA A init draws from the global generator: same seed, same start
    params = add_lora(transformer, tc)
    transformer.train()
    model = transformer
    if tc.compile:
        transformer.compile_repeated_blocks(fullgraph=False)
    if world > 1:
        # Only the LoRA is trained: DDP must neither broadcast the frozen base (gloo cannot send float8, and a 12B
        # broadcast at start is pure waste) nor re-send quantized buffers every forward.
        frozen = [n for n, p in transformer.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in transformer.named_buffers()]
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(transformer, frozen)
        model = torch.nn.parallel.DistributedDataParallel(
            transformer, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(params, tc)
    n_lora = sum(p.numel() for p in params)
    log(f"LoRA: {n_lora / 1e6:.3f}M parameters on {len(tc.target_modules)} module kinds, rank {tc.rank}")

    start = 0
    ckpt = resolve_resume(cfg.resume, out_dir)
    if ckpt is not None:
        start = load_checkpoint(ckpt, transformer, optimizer)
        log(f"resumed from {ckpt} at step {start}")

    # 4. The loop.
    from tqdm import tqdm

    log_file = open(out_dir / "log.jsonl", "a") if rank == 0 else None
    tb = _tensorboard(out_dir) if rank == 0 else None
    last_ckpt = str(ckpt) if ckpt else "none"
    history = []
    per_rank = tc.batch_size
    if tc.validate_every >= 0 and len(val_data) and start == 0:
        val = held_out_loss(transformer, val_data, empty, tc, device, dtype)
        log(f"step 0: held-out loss {val:.4f}")
        if rank == 0:
            log_file.write(json.dumps({"step": 0, "held_out_loss": val}) + "\n")
    bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, disable=rank != 0, desc="train")
    for step in bar:
        t0 = time.perf_counter()
        for g in optimizer.param_groups:
            g["lr"] = tc.lr * lr_factor(step, tc)
        loss_sum, keys = 0.0, []
        for micro in range(tc.grad_accum):
            idx = global_batch(shapes, per_rank * world, tc.seed, step * tc.grad_accum + micro)
            entries = [data[i] for i in idx]
            keys += [train_samples[i].key for i in idx]
            n = len(entries)
            lo, hi = rank * n // world, (rank + 1) * n // world
            b = collate(entries, empty, tc, ("step", step, micro), device, dtype, slice(lo, hi))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.autocast):
                loss = flow_matching_loss(model, b["x0"], b["noise"], b["t"], b["control"], b["prompt_embeds"],
                                          b["pooled_prompt_embeds"], b["img_ids"], b["text_ids"], tc.guidance,
                                          b["weight"])
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {step} (micro-batch {micro}) on samples {keys[-n:]}; "
                    f"last good checkpoint: {last_ckpt}. Lower train.lr or check these samples.")
            # DDP averages gradients over ranks; each rank's share is its slice of the global batch.
            (loss * (hi - lo) / n * world / tc.grad_accum).backward()
            loss_sum += loss.item() / tc.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_mean = _mean_over_ranks(loss_sum, world)
        dt = time.perf_counter() - t0
        rec = {"step": step + 1, "loss": loss_mean, "lr": optimizer.param_groups[0]["lr"],
               "grad_norm": float(grad_norm), "s_per_step": dt,
               "samples_per_s": per_rank * world * tc.grad_accum / dt}
        history.append(rec)
        if rank == 0:
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            if tb:
                for k, v in rec.items():
                    tb.add_scalar(k, v, step + 1)
            if (step + 1) % tc.log_every == 0:
                bar.set_postfix(loss=f"{loss_mean:.4f}", lr=f"{rec['lr']:.2e}", gn=f"{rec['grad_norm']:.3f}",
                                sps=f"{rec['samples_per_s']:.2f}")
        done = step + 1 == tc.steps
        if rank == 0 and (done or (tc.save_every and (step + 1) % tc.save_every == 0)):
            last_ckpt = str(save_checkpoint(out_dir, transformer, optimizer, step + 1, cfg, tc.keep_checkpoints))
        if tc.validate_every >= 0 and len(val_data) and (done or (tc.validate_every and (step + 1) % tc.validate_every == 0)):
            val = held_out_loss(transformer, val_data, empty, tc, device, dtype)
            log(f"step {step + 1}: held-out loss {val:.4f}")
            if rank == 0:
                log_file.write(json.dumps({"step": step + 1, "held_out_loss": val}) + "\n")
                if vae is None:
                    from load import load_vae

                    vae = load_vae(cfg.model)
                log(f"validation grid: {validation_grid(transformer, vae, val_samples, val_data, cfg, step + 1, out_dir)}")
    if rank == 0:
        save_lora(transformer, out_dir / "lora.safetensors")
        log(f"wrote {out_dir / 'lora.safetensors'} and checkpoint {last_ckpt}")
        log_file.close()
    if world > 1:
        torch.distributed.barrier()
    return {"history": history, "transformer": transformer, "lora": out_dir / "lora.safetensors"}


class _Slice:
    def __init__(self, base, lo, hi):
        self.base, self.lo, self.hi = base, lo, hi

    def __getitem__(self, i):
        return self.base[self.lo + i]

    def __len__(self):
        return self.hi - self.lo


def _shape_of(data, i) -> tuple:
    if isinstance(data, list):
        e = data[i]
        return tuple(e["image_latents"].shape) + tuple(e.get("control_latents", torch.empty(0)).shape)
    s = data.base.samples[data.lo + i]  # uncached: read sizes from the image headers, not by encoding
    from PIL import Image

    from cache import target_size

    out = ()
    for p in (s.image, s.control):
        if p is not None:
            with Image.open(p) as im:
                out += target_size((im.height, im.width), data.base.cfg)
    return out


@torch.no_grad()
def validation_grid(transformer, vae, val_samples, val_data, cfg: Config, step: int, out_dir: Path) -> Path:
    """sample.py on each held-out pair (fixed seeds, cached prompt embeddings), saved as one PNG with a row per
    sample: control | sample | target."""
    from PIL import Image

    from cache import open_image
    from load import Components
    from sample import sample

    was = transformer.training
    transformer.eval()
    rows = []
    for i, s in enumerate(val_samples):
        e = val_data[i]
        control = open_image(s.control) if s.control is not None else None
        target = open_image(s.image)
        sc = cfg.sample
        out = sample(Components(vae=vae, transformer=transformer), control, None,
                     prompt_embeds=e["prompt_embeds"][None], pooled_prompt_embeds=e["pooled_prompt_embeds"][None],
                     guidance_scale=sc.guidance_scale, num_inference_steps=sc.num_inference_steps,
                     generator=torch.Generator().manual_seed(sc.seed + i), size_mode="native",
                     height=None if control is not None else target.height,
                     width=None if control is not None else target.width, progress=False).images[0]
        tiles = ([control] if control is not None else []) + [out, target]
        h = max(t.height for t in tiles)
        row = Image.new("RGB", (sum(t.width for t in tiles), h))
        x = 0
        for t in tiles:
            row.paste(t, (x, 0))
            x += t.width
        rows.append(row)
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)))
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    path = out_dir / "validation" / f"step-{step:06d}.png"  # a log artefact, not a checkpoint
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    transformer.train(was)
    return path


@torch.no_grad()
def held_out_loss(transformer, val_data, empty, tc: TrainConfig, device, dtype) -> float:
    """Flow-matching loss on the held-out samples at fixed noise and t in {0.25, 0.5, 0.75} (comparable across
    steps and runs)."""
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
                                        b["text_ids"], 1.0, b["weight"]).item()
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


ATTENTION_BACKENDS = {"flash": "_native_flash", "cudnn": "_native_cudnn", "cudnn_torch": "_native_cudnn",
                      "efficient": "_native_efficient", "math": "_native_math", "default": "native"}


def resolve_attention(name: str, checkpointed: bool, compiled: bool, cudnn_ok: bool = True) -> str:
    """"auto" -> cuDNN: PyTorch's own cuDNN SDPA path where it was measured safe and faster (full gradient
    checkpointing + torch.compile), else kernels/attention.py's explicit aten calls. A Flux backward through PyTorch's
    path without checkpointing crashed on the H100 image (illegal memory access; diag_attention.py). Where cuDNN
    attention cannot run (`cudnn_ok` False: fp32 attention or a GPU before Ampere) "auto" is the memory-efficient
    kernel, which takes fp32 too."""
    if name != "auto" and name not in ATTENTION_BACKENDS:
        raise ValueError(f"train.attention_backend: {name!r}; expected auto or one of {sorted(ATTENTION_BACKENDS)}")
    if name == "auto":
        if not cudnn_ok:
            return "efficient"
        return "cudnn_torch" if checkpointed and compiled else "cudnn"
    return name


def set_attention(transformer, name: str, device: torch.device, checkpointed: bool = False,
                  compiled: bool = False, autocast: bool = False) -> str:
    """Pin the SDPA backend inside the model (diffusers' set_attention_backend), so it holds in compiled blocks and
    when gradient checkpointing recomputes a block during backward: an outer `sdpa_kernel` context does neither,
    and a recompute under another backend fails torch.utils.checkpoint's metadata check (logsumexp shapes differ).
    Returns the backend chosen (see resolve_attention)."""
    # the input embedder sets the hidden states' dtype (block Linears may hold fp8 or 4-bit codes)
    half = autocast or transformer.x_embedder.weight.dtype in (torch.bfloat16, torch.float16)
    cudnn_ok = device.type == "cuda" and half and torch.cuda.get_device_capability(device) >= (8, 0)
    name = resolve_attention(name, checkpointed, compiled, cudnn_ok)
    if device.type == "cuda":
        if ATTENTION_BACKENDS[name] == "_native_cudnn":
            from kernels.attention import install_cudnn

            install_cudnn(guarded=name == "cudnn")
        transformer.set_attention_backend(ATTENTION_BACKENDS[name])
    return name


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out_dir / "tb"))


if __name__ == "__main__":
    main(cli(description=__doc__.splitlines()[0]))
