"""LoRA flow-matching training of FLUX.1 Kontext: `python train.py --config configs/tiny.py [--train.lr 2e-5]`.

main(cfg) is the loop, top to bottom: the dataset, the run folder and the checkpoint to resume checked before any model
loads (check_run), latents and embeddings from the cache or encoded on the fly (cache.training_data), the transformer
and its LoRA prepared as bench.py times them (prepare_transformer), then per step micro_batches -> train_step,
checkpoints and validation. The objective and its batches are objective.py's (the one place x_t and the target are
written); the conditioning check, the held-out loss and the validation grids are validate.py's.

Noise, timesteps, caption dropout and the data order are pure functions of (seed, step): a resumed run repeats
exactly what the uninterrupted one would have done, and DDP ranks slice one global batch. Multi-GPU:
`torchrun --nproc_per_node N train.py --config ...` (DDP over the LoRA parameters).
"""

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

import compile_cache
import full  # train.mode='full': the full fine-tune's pieces
import recompute
from cache import cache_dir_of, training_data
from config import Config, TrainConfig, cli, to_json, validate
from convert import save_lora_as
from data import check_dataset, cut_prompts, scan_dataset, validate_dataset
from ema import EMA
from kontext_kernels.attention import set_attention
from kontext_kernels.fp8 import FP8Linear
from load import check_model, load_t5_tokenizer, load_transformer, load_vae, parse_dtype
from lora import (add_lora, config_differences, load_checkpoint, new_run_id, resolve_resume, resume_problems,
                  save_checkpoint)
import quiet
import rundir
from objective import collate, dual_masked_loss, flow_matching_loss, global_batch, lora_l2
from offload import offload_transformer
from optim import eval_weights, is_schedulefree, lr_factor
from optim import make_optimizer as make_lora_optimizer
from preserve import check_preserve, preserve_data, preserve_loss, with_preserve
from region import MaskRegionToken, region_path, save_region
from report import check_report_to, close_reports, open_reports, plot_curves, report, report_images
from user_samples import check_sample_prompts, sample_user_prompts, user_sample_inputs
from validate import conditioning_check, edit_summary, held_out_loss, validate_edits

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
    if tc.gradient_checkpointing and tc.memory_budget > 0:  # selective checkpoints, block by block (recompute.py)
        transformer._recompute_levels = recompute.apply_budget(transformer, tc.memory_budget, tc.rank)
    elif tc.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    # full mode: the block Linears themselves train (and FSDP2 shards the model under torchrun), full.py
    with seeded(tc.seed, device):  # LoRA A init draws from the global generator: same seed, same start
        params = add_lora(transformer, tc) if tc.mode == "lora" else full.prepare_full(transformer, tc, device)
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
    with seeded(tc.seed, device):
        return MaskRegionToken(*tc.region_grid, transformer.config.in_channels).to(device)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """torch.manual_seed(seed) inside the block only: the caller's global generators (a notebook's) come back as they
    were, so training leaves no process-wide trace."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def offload_note(transformer) -> str:
    """The log line's words for block offload: blocks streamed and the bytes moved per step (forward + recompute)."""
    off = getattr(transformer, "_block_offload", None)
    if off is None:
        return ""
    return (f"; block offload: {len(off.host)} of {len(off.blocks)} blocks streamed from host memory, "
            f"{2 * off.bytes_per_fetch / 2**30:.1f} GiB moved per step")


# peft's LoKr / LoHa layers under regional compile: their step-0 gradients differed from eager by more than the
# crash matrix's 10% bound on an H200 (2026-12-06, torch 2.11); they train eager until that test passes
UNCOMPILED_ADAPTERS = ("lokr", "loha")


def compile_choice(transformer, tc: TrainConfig, device: torch.device) -> str:
    """"on", or "off (why)": regional compile runs on CUDA, for bf16, fp8 and 4-bit transformers alike (compiled
    LoRA gradients equal eager ones for each: tests/test_quant.py, tests/test_train.py's crash matrix)."""
    if not tc.compile:
        return "off"
    if device.type != "cuda":
        return "off (CPU)"
    if hasattr(transformer, "_block_offload"):
        return "off (block offload swaps the blocks' weights each call)"
    if tc.adapter in UNCOMPILED_ADAPTERS:
        return (f"off (train.adapter {tc.adapter}: compiled gradients did not match eager ones on the GPU, "
                f"tests/test_adapters.py::test_compiled_equals_eager_gpu)")
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
    if "preserve" in b:  # data.preserve_path: the base model's own prediction as the target (preserve.py)
        part["preserve"] = tc.preserve_weight * preserve_loss(model, getattr(model, "module", model), b["preserve"],
                                                              tc.guidance)
    return part


def train_step(model, params: list, optimizer, batches, tc: TrainConfig,
               terms: dict | None = None, region=None) -> tuple[float, float, int]:
    """One optimizer step: the loss (batch_terms) and backward per micro-batch (under bf16 autocast if tc.autocast),
    gradient clipping, the optimizer. Returns (mean loss, gradient norm, samples in the global batch: a shape
    bucket's last batch can be smaller than batch_size); `terms`, if given, receives the loss's terms averaged over
    the micro-batches when there are several (dual_masked, a region token). `params`: everything the optimizer
    trains (the LoRA's, then the region token's). A non-finite loss raises FloatingPointError naming the samples
    before the optimizer touches the LoRA. Full mode (full.py): each parameter steps inside the backward of the last
    micro-batch, so the loss is checked before each backward, and the gradient norm is the one the hooks saw."""
    losses, parts = [], []
    in_backward = tc.mode == "full"  # full.py: each parameter steps inside the backward, by its gradient hook
    for micro, (b, idx, share) in enumerate(batches):
        # activation offload: what the backward needs waits in pinned host memory (torch's own hook)
        with (torch.autograd.graph.save_on_cpu(pin_memory=b["x0"].is_cuda) if tc.activation_offload
              else contextlib.nullcontext()), \
                torch.autocast(b["x0"].device.type, dtype=torch.bfloat16, enabled=tc.autocast):
            part = batch_terms(model, b, tc, params, region)
            loss = sum(part.values())
            if len(part) > 1:
                parts.append({k: v.detach() for k, v in part.items()})
        if in_backward:  # the update happens in this backward: a non-finite loss must stop before it (a host sync)
            if not math.isfinite(value := loss.item()):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLoss(value, idx)
            optimizer.stepping = micro == tc.grad_accum - 1  # grad_accum: the earlier backwards only accumulate
        (loss * share).backward()
        losses.append((loss.detach(), idx))
    if terms is not None and parts:
        terms.update({k: sum(p[k].item() for p in parts) / len(parts) for k in parts[0]})
    values = [loss.item() for loss, _ in losses]  # the step's one host sync
    bad = [(v, idx) for v, (_, idx) in zip(values, losses) if not math.isfinite(v)]
    if bad:
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(*bad[0])
    if in_backward:  # already stepped; no clipping (config.py refuses train.grad_clip > 0 in full mode)
        return sum(v / tc.grad_accum for v in values), optimizer.grad_norm(), sum(len(idx) for _, idx in losses)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sum(v / tc.grad_accum for v in values), float(grad_norm), sum(len(idx) for _, idx in losses)


def make_optimizer(params, cfg: TrainConfig):
    """train.optimizer over `params`: optim.py's for a LoRA; full mode steps each parameter in the backward (full.py)."""
    if cfg.mode == "full":
        return full.make_optimizer(params, cfg)
    return make_lora_optimizer(params, cfg)


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
    """Everything checkable before any weights load: the whole dataset, the held-out split, the run folder
    (rundir.claim), the model folders and their config.json, the checkpoint to resume (its rank and targets against
    the config), captions the T5 window cuts. Only then, with --overwrite, the earlier run is set aside (rundir).
    Returns (samples, n_train, ckpt)."""
    samples = scan_dataset(cfg.data)
    validate_dataset(samples, cfg.data, cache_dir_of(cfg))  # the stat index there skips re-decoding known files
    if cfg.data.held_out >= len(samples):
        raise ValueError(f"data.held_out={cfg.data.held_out} leaves nothing to train on: the dataset has "
                         f"{len(samples)} samples")
    n_train = len(samples) - max(cfg.data.held_out, 0)
    log(f"dataset: {n_train} training / {len(samples) - n_train} held-out samples from {cfg.data.path}")
    if rank == 0:
        for note in rundir.claim(Path(cfg.out_dir), cfg.resume, cfg.overwrite):
            log(note)
    conditioning_check(samples, cfg, log)
    check_report_to(cfg.train)  # wandb importable
    check_sample_prompts(cfg)  # train.sample_prompts' lines and images
    check_preserve(cfg)  # data.preserve_path's samples
    check_model(cfg.model)  # each local component folder and its config.json, no weights
    if cfg.train.mode == "full":
        full.check_config(cfg)  # a quantized checkpoint on disk
    ckpt = resolve_resume(cfg.resume, Path(cfg.out_dir), log)
    if ckpt is not None and (problems := resume_problems(ckpt, cfg)):
        raise ValueError("\n".join(problems))
    if ckpt is not None and (diff := config_differences(ckpt, cfg)):
        log(f"warning: resuming {ckpt} with a config that differs from its config.json: {'; '.join(diff)}")
    cut = cut_prompts({str(s.image): s.prompt for s in samples}, load_t5_tokenizer(cfg.model),
                      cfg.data.max_sequence_length)
    if cut:
        log(f"warning: {len(cut)} caption(s) are longer than data.max_sequence_length={cfg.data.max_sequence_length} "
            f"and are cut there (the rest is not seen): {'; '.join(cut[:3])}" + (" ..." if len(cut) > 3 else ""))
    if rank == 0 and cfg.overwrite and not cfg.resume and (note := rundir.set_aside(Path(cfg.out_dir))):
        log(note)
    return samples, n_train, ckpt


def batch_plan(shapes: list[tuple], batch_size: int) -> str:
    """One line on how batching will go: batches hold one latent shape, so a bucket's last batch may be smaller."""
    sizes = Counter(min(batch_size, n - j) for n in Counter(shapes).values() for j in range(0, n, batch_size))
    plan = ", ".join(f"{c} x {b}" for b, c in sorted(sizes.items(), reverse=True))
    return (f"batching: {len(Counter(shapes))} shape bucket(s), {sum(sizes.values())} batches per epoch ({plan} "
            f"samples)" + ("" if set(sizes) == {batch_size} else f"; batch_size {batch_size} is not always filled"))


def main(cfg: Config) -> dict:
    """Train as cfg says; returns {"history", "transformer", "lora", "output"}. The run folder is locked for the
    run's life (rank 0: one run per folder), and an --overwrite'n earlier run comes back if this one fails before its
    first checkpoint (rundir.py)."""
    validate(cfg)  # also when main is called from Python, not only through cli()
    rank, world = dist_info()
    with rundir.one_run(Path(cfg.out_dir), hold=rank == 0):
        try:
            return train(cfg, rank, world)
        except BaseException:
            if rank == 0 and cfg.overwrite and not cfg.resume and not _checkpointed(Path(cfg.out_dir)) \
                    and (note := rundir.restore(Path(cfg.out_dir))):
                print(note, file=sys.stderr, flush=True)
            raise


def _checkpointed(out_dir: Path) -> bool:
    return (out_dir / "checkpoints" / "latest.json").is_file()


def train(cfg: Config, rank: int, world: int) -> dict:
    """main's body, inside the run folder's lock."""
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
    user_rows, user_embeds = user_sample_inputs(cfg, cache_dir_of(cfg), log) if rank == 0 else ([], {})
    pdata = preserve_data(cfg, log)  # data.preserve_path's entries, or None

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
        + (f" (memory budget {tc.memory_budget}: {recompute.describe(transformer._recompute_levels)})"
           if hasattr(transformer, "_recompute_levels") else "")
        + ("; activation offload: on" if tc.activation_offload else "") + offload_note(transformer))
    model = transformer
    if world > 1 and tc.mode == "lora":  # full mode: sharded by FSDP2 in prepare_transformer
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
    log(full.summary(transformer, params, tc) if tc.mode == "full" else
        f"LoRA ({tc.adapter}): {sum(p.numel() for p in params) / 1e6:.3f}M parameters on "
        f"{len(tc.target_modules)} module kinds, rank {tc.rank}" + (f"; region token: grid {tc.region_grid[0]}x{tc.region_grid[1]}, "
                             f"{sum(p.numel() for p in region.parameters())} parameters" if region else ""))
    # full mode's checkpoints and result (full.py): every rank takes part (FSDP shards), rank 0 renames and logs
    ckpt_save, ckpt_load, result_save, result = ((save_checkpoint, load_checkpoint, save_result, "lora.safetensors")
                                                 if tc.mode == "lora" else
                                                 (full.save_checkpoint, full.load_checkpoint, full.save_result,
                                                  full.RESULT))
    saver = rank == 0 or tc.mode == "full"
    params = params + (list(region.parameters()) if region is not None else [])
    optimizer = make_optimizer(params, tc)
    ema = EMA(params, tc.ema_decay, tc.ema_start_step) if tc.ema_decay > 0 else None  # config.py: LoRA mode only
    if ema is not None:
        log(f"EMA: decay {tc.ema_decay}, from step {tc.ema_start_step}, {ema.bytes() / 2**20:.1f} MiB fp32")
    with_ema = {"ema": ema} if ema is not None else {}  # lora.py's checkpoints keep it; full mode has none
    start, run = (ckpt_load(ckpt, transformer, optimizer, region, **with_ema, **({"log": log} if with_ema else {}))
                  if ckpt is not None else (0, new_run_id()))
    if is_schedulefree(optimizer):  # a checkpoint holds its eval weights (optim.eval_weights): back to training
        optimizer.train()
    if ckpt is not None:
        log(f"resumed from {ckpt} at step {start}" + (f"; train.steps is {tc.steps}: nothing left to train"
                                                        if start >= tc.steps else ""))

    # 4. The loop. A resume keeps one history: the log's records after the checkpoint's step go (trained again).
    if rank == 0 and ckpt is not None and (dropped := rundir.one_history(out_dir / "log.jsonl", start)):
        log(f"log.jsonl: dropped {dropped} record(s) after step {start} (this resume trains those steps again)")
    rep = open_reports(cfg, out_dir, run, log, start) if rank == 0 else None  # log.jsonl, TensorBoard, wandb (report.py)
    last_ckpt, history, vae = str(ckpt) if ckpt else "none", [], data.vae

    def validate_at(step: int) -> None:
        nonlocal vae
        rec, images = {"step": step}, {}
        rec["held_out_loss"] = held_out_loss(transformer, data.held_out, data.empty, tc, device, dtype, region)
        with ema.swapped() if ema is not None else contextlib.nullcontext():  # EMA on: its loss too, and its edits
            if ema is not None:
                rec["held_out_loss_ema"] = held_out_loss(transformer, data.held_out, data.empty, tc, device, dtype,
                                                         region)
            log(f"step {step}: held-out loss {rec['held_out_loss']:.4f}"
                + (f" (EMA {rec['held_out_loss_ema']:.4f})" if ema is not None else ""))
            if rank != 0:
                return
            if full.is_sharded(transformer):  # sampling a sharded model needs every rank
                log("edit metrics and validation grid: skipped (FSDP: the transformer is sharded)")
            else:
                vae = vae or load_vae(cfg.model)  # cached mode: loaded for the edits only when first needed
                # the base model's metrics: the adapter disabled (LoRA), or the weights as loaded (full mode, step 0)
                fields, grid = validate_edits(transformer, vae, samples[n_train:], data.held_out, cfg, step, out_dir,
                                              region, base_ok=tc.mode == "lora" or step == 0)
                rec.update(fields)
                log(edit_summary(rec, step) + (" (EMA weights)" if ema is not None else ""))
                if grid is not None:
                    log(f"validation grid: {grid}")
                    images["validation/grid"] = grid
                if user_rows:  # train.sample_prompts: the user's own edits
                    images["validation/samples"] = sample_user_prompts(transformer, vae, user_rows, user_embeds, cfg,
                                                                       step, out_dir)
                    log(f"samples: {images['validation/samples']}")
        report(rep, rec)
        try:
            plot_curves(out_dir / "log.jsonl", out_dir / "validation" / "curves.png")
            images["validation/curves"] = out_dir / "validation" / "curves.png"
        except ValueError as e:  # matplotlib missing: said, the run goes on
            log(f"curves: skipped ({e})")
        report_images(rep, images, step)

    if tc.validate_every >= 0 and n_val and start == 0:
        with eval_weights(optimizer):
            validate_at(0)
    saved = compile_cache.cache_file(tc.compile_cache, compile_cache.describe(
        transformer, job="train", shapes=sorted(set(map(str, data.shapes))), batch=tc.batch_size, world=world,
        autocast=tc.autocast, fp8_backward=tc.fp8_backward, mode=tc.mode)) if compile_cache.is_compiled(transformer) else None
    if compile_cache.load(saved):
        log(f"compile cache: loaded {saved}")
    bar = tqdm(range(start, tc.steps), initial=start, total=tc.steps, disable=rank != 0, desc="train")
    for step in bar:
        t0 = time.perf_counter()
        for g in optimizer.param_groups:
            g["lr"] = tc.lr * lr_factor(step, tc)
        batches = micro_batches(data.train, data.shapes, data.empty, tc, step, rank, world, device, dtype,
                                cfg.data.repeat)
        if pdata is not None:  # each micro-batch with a preservation batch (preserve.py)
            batches = with_preserve(batches, pdata, data.empty, tc, step, rank, world, device, dtype)
        try:
            terms: dict = {}
            loss, grad_norm, n = train_step(model, params, optimizer, batches, tc, terms, region_model)
            if ema is not None:
                ema.update(step + 1)
        except NonFiniteLoss as e:
            keys = [samples[i].key for i in e.samples]
            raise FloatingPointError(f"{e} at step {step} on samples {keys}; last good checkpoint: {last_ckpt}. "
                                     f"Lower train.lr or check these samples.") from None
        loss, dt = _mean_over_ranks(loss, world), time.perf_counter() - t0
        if step == start:
            log(f"first step: {dt:.1f} s (warm-up{' and compilation' if compiled == 'on' else ''}; later steps are faster)")
            if rank == 0 and compile_cache.save(saved):
                log(f"compile cache: saved {saved}")
        rec = {"step": step + 1, "loss": loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
               "s_per_step": dt, "samples_per_s": n / dt, **terms}
        history.append(rec)
        if rank == 0:
            report(rep, rec)
            if (step + 1) % tc.log_every == 0:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{rec['lr']:.2e}", gn=f"{grad_norm:.3f}",
                                sps=f"{rec['samples_per_s']:.2f}")
        done = step + 1 == tc.steps
        ckpt_step = done or (tc.save_every and (step + 1) % tc.save_every == 0)
        val = tc.validate_every >= 0 and n_val and (done or (tc.validate_every and (step + 1) % tc.validate_every == 0))
        # once per such step, on every rank alike (DDP replicas must stay equal), saving or not (optim.py)
        with eval_weights(optimizer) if ckpt_step or val else contextlib.nullcontext():
            if saver and ckpt_step:
                last_ckpt = str(ckpt_save(out_dir, transformer, optimizer, step + 1, cfg, tc.keep_checkpoints, run,
                                          region, **with_ema))
                if rank == 0 and (note := rundir.settle(out_dir)):
                    log(note)
            if saver and done:  # before the last grid: a crash there loses nothing
                result_save(transformer, region, out_dir, tc)
                save_ema_result(ema, transformer, region, out_dir, tc)
            if val:
                validate_at(step + 1)
    if saver and start >= tc.steps:  # resumed at or past the end: the checkpoint's weights are the result
        with eval_weights(optimizer):
            result_save(transformer, region, out_dir, tc)
            save_ema_result(ema, transformer, region, out_dir, tc)
    if rank == 0:
        log(f"wrote {out_dir / result}"
            + (f", {region_path(out_dir / 'lora.safetensors').name} beside it" if region is not None else "")
            + (f", its EMA {EMA_RESULT}" if ema is not None else "")
            + f" and checkpoint {last_ckpt}")
        close_reports(rep)
    if world > 1:
        torch.distributed.barrier()
    return {"history": history, "transformer": transformer, "lora": out_dir / "lora.safetensors",
            "output": out_dir / result}


def save_result(transformer, region, out_dir: Path, tc: TrainConfig) -> None:
    """The run's result: lora.safetensors in train.lora_format, and the region token beside it."""
    save_lora_as(transformer, out_dir / "lora.safetensors", tc.lora_format)
    if region is not None:
        save_region(region, region_path(out_dir / "lora.safetensors"))


EMA_RESULT = "lora.ema.safetensors"  # beside lora.safetensors, the same format (and its region token beside it)


def save_ema_result(ema, transformer, region, out_dir: Path, tc: TrainConfig) -> None:
    """With train.ema_decay: the EMA's weights as lora.ema.safetensors (save_result's format and region file)."""
    if ema is None:
        return
    with ema.swapped():
        save_lora_as(transformer, out_dir / EMA_RESULT, tc.lora_format)
        if region is not None:
            save_region(region, region_path(out_dir / EMA_RESULT))


def _mean_over_ranks(x: float, world: int) -> float:
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return float(t.item()) / world


def interrupted_note(argv: list[str], out_dir: str) -> str:
    """Ctrl-C's one line: where the newest checkpoint is and the command that continues from it."""
    latest = Path(out_dir) / "checkpoints" / "latest.json"
    try:
        at = json.loads(latest.read_text())
        where = f"the last checkpoint is {Path(out_dir) / 'checkpoints' / at['path']} (step {at['step']})"
    except (OSError, ValueError, KeyError):
        return f"interrupted: no checkpoint was written in {out_dir}; nothing to resume (--overwrite starts afresh)"
    keep, skip = [], False
    for a in argv:  # the same command without --overwrite / --resume X
        if skip:
            skip = False
        elif a in ("--overwrite", "--resume"):
            skip = a == "--resume"
        elif not a.startswith(("--resume=", "--overwrite=")):
            keep.append(a)
    return f"interrupted: {where}; continue with: python train.py {' '.join(keep)} --resume latest"


if __name__ == "__main__":
    quiet.install()
    cfg = None
    try:
        argv = [a for a in sys.argv[1:] if a != "--check"]
        cfg = cli(argv, description=__doc__.splitlines()[0] + " --check: only check the dataset (data.py check).")
        if len(argv) < len(sys.argv) - 1:  # --check: exit 2 on dataset errors, before any model loads
            sys.exit(check_dataset(cfg.data, cache_dir_of(cfg)))
        main(cfg)
    except ValueError as e:  # user errors (dataset, config, run folder): the message, not a traceback
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\n" + (interrupted_note(sys.argv[1:], cfg.out_dir) if cfg else "interrupted"), file=sys.stderr)
        sys.exit(130)
