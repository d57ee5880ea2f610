"""Benchmark: stock diffusers+peft vs ours, side by side in one run, on a full-size random FLUX.1 Kontext
transformer (speed does not depend on the weights' values). Prints a markdown table and a JSON last line.

    python bench.py                          # every row (H200: ~13 min; each row in its own process)
    python bench.py --rows bf16 ckpt         # a 10-minute call holds ~12 rows: split the groups across calls
    python bench.py --match ours             # --match selects rows by label (ours / stock / 'full ckpt')
    python bench.py --tiny                   # the miniature model on CPU: checks the script, times nothing useful
    python bench.py --rows stepcache --iters 2 --warmup 0   # a 28-step sample() per SampleConfig.cache option
    python bench.py --rows masked            # the IP-Adapter and region-token recipe beside the plain bf16 step
    python bench.py --rows full              # full fine-tune (configs/full_bf16.py) beside the LoRA step
    python bench.py --rows lokr loha dora    # train.adapter lokr / loha / dora in configs/bf16.py's step, beside it
    python bench.py --rows compile_cache     # first-step time in a cold process, then a warm one (compile_cache.py)
    python bench.py --rows budget budget_fp8 budget_nf4  # train.memory_budget's curves (recompute.py), PNG (--plot)

Each timed row also gives its TFLOP per step (step_tflop: the Linears and attention counted from the dims), TFLOP/s
and the % of the dense peak of its GEMMs' precision (bf16 989, fp8 1979 TFLOP/s).

"ours" rows run train.py's own step: the TrainConfig of the shipped config file (configs/bf16.py, configs/fp8.py,
configs/fp4.py; a row may change gradient_checkpointing and memory_budget), train.prepare_transformer,
train.make_optimizer, and per step train.micro_batches + train.train_step on random cache entries, as `python
train.py` does. Denoise rows run sample.prepare_transformer and encode.predict_velocity (sample.py's denoising loop's
call, LoRA loaded unfused); "stepcache" rows run sample.sample, 28 steps, per cache option, with its latents' error
against the uncached call (random weights: not image quality). "stock" rows are diffusers' FluxTransformer2DModel with
peft LoRA (r16 on to_q/to_k/to_v/to_out.0) as a diffusers user writes them, attention pinned to PyTorch's flash
backend (PyTorch's default SDPA choice crashed in the first Flux LoRA backward on the H100 and H200 images). Kontext
at 1024^2: 4096 target + 4096 control + 512 text tokens, batch 1. Each row: a fresh process, the model built anew,
the first step timed on its own (first_s: compilation), one more warm-up, then the median of `iters` steps (CUDA
events) and the peak allocated memory. accuracy.py measures the quantized kinds' error instead of their time.
"""

import dataclasses
import gc
import hashlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import bench_tables
import compile_cache as compile_cache_
import fixtures
import quant
import sample
import tiny
import train
from config import ModelConfig, Part, SampleConfig, TrainConfig, load_config
from encode import predict_velocity
from load import Components, add_ip_adapter, load_components, load_vae
import quiet

STOCK_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
CONFIGS = {"bf16": "configs/bf16.py", "fp8": "configs/fp8.py", "nf4": "configs/fp4.py",  # kind -> shipped config
           "region_depth": "configs/region_depth.py",  # bf16 + IP-Adapter + region token + dual masked loss
           "full": "configs/full_bf16.py"}  # train.mode full: every block Linear, torchao 8-bit AdamW in the backward
# --rows stepcache: SampleConfig.cache values timed ("" = uncached, the speed-up's reference); values from the
# methods' papers / defaults for FLUX.1-dev (stepcache.py)
STEPCACHE_SPECS = ("", "first_block:0.08", "mag:0.06", "taylorseer:5", "faster:2", "tea:0.25", "tea:0.6")
# --rows budget: TrainConfig.memory_budget values timed (recompute.py; 0 = full checkpointing, 1 = keep all), each
# level's own SHARE among them (every block at one level) and points between them
BUDGETS = (0.0, 0.075, 0.2, 0.34, 0.5, 0.65, 1.0)


@dataclass
class BenchConfig:
    rows: tuple[str, ...] = ("bf16", "ckpt", "denoise", "fp8", "int4")  # which groups of the table to run
    res: tuple[int, ...] = (1024, 512)  # 512 runs only the bf16 no-recompute rows
    iters: int = 5
    warmup: int = 1  # untimed steps after the first (timed apart) step
    compile: bool = True  # ours: TrainConfig.compile (False: eager, for debugging)
    attention: str = "auto"  # ours: TrainConfig.attention_backend
    profile: bool = True  # ours: one extra step under torch.profiler, GPU time by kernel kind
    stock_compile: bool = True  # also time stock + compile_repeated_blocks
    stock_int4: bool = True  # stock bitsandbytes nf4 + peft (needs bitsandbytes)
    tiny: bool = False
    text_tokens: int = 512
    out: str = ""  # also write the rows as JSON here
    match: tuple[str, ...] = ()  # run only rows whose label contains one of these (e.g. --match ours)
    only: int = -1  # internal: run only this row of the plan, in this process
    budgets: tuple[float, ...] = BUDGETS  # --rows budget / budget_fp8 / budget_nf4: the memory budgets timed
    plot: str = "memory_budget.png"  # with budget rows: s/step against peak GiB, one line per kind (PNG)


def dims(cfg: BenchConfig) -> dict:
    return fixtures.MINI_DIMS if cfg.tiny else fixtures.FLUX_KONTEXT_DIMS


# dense tensor-core peaks (H100/H200 SXM datasheet, TFLOP/s): a row's % of peak uses its GEMMs' precision
PEAK_TFLOPS = {"bf16": 989.0, "fp8": 1979.0}


def step_tflop(d: dict, res: int, text_tokens: int, *, denoise: bool = False, ckpt: bool = False,
               controls: int = 1) -> float:
    """TFLOP of one transformer call (denoise) or one LoRA training step at res^2 with `controls` reference images:
    the block Linears (2 x params x tokens; every double-block stream and single block holds 4 + 2 x 4 = 12 inner^2
    weights... counted below from the dims) and attention (4 x S^2 x inner per block forward; its backward is 2.5x the
    forward: dQ, dK, dV and the recomputed scores). A LoRA step's backward is input gradients only (the base is
    frozen): one more pass of the Linears. Full checkpointing re-runs the forward. The LoRA's own FLOPs (r=16) and
    the embedders are < 1% and left out. 1024^2, one control, 512 text tokens: 165 forward, 410 train, 575 ckpt."""
    inner = d["num_attention_heads"] * d["attention_head_dim"]
    img = (res // 16) ** 2 * (1 + controls)  # target + controls, 2x2-packed latent tokens
    tokens = img + text_tokens
    per_block = 12 * inner ** 2
    blocks = d["num_layers"] + d["num_single_layers"]
    linear = 2 * per_block * tokens * blocks  # double blocks: img stream on img tokens + txt stream on text tokens
    attention = 4 * tokens ** 2 * inner * blocks
    forward = linear + attention
    total = forward if denoise else forward + linear + 2.5 * attention + (forward if ckpt else 0)
    return total / 1e12


def build(cfg: BenchConfig, device, kind: str = "bf16"):
    """The random transformer, quantized as load.py does at load (quant.quantize_transformer)."""
    model = fixtures.full_size_transformer(device, **dims(cfg))
    return model if kind in ("bf16", "region_depth", "full") else quant.quantize_transformer(model, kind)


def ours_config(kind: str, cfg: BenchConfig, **overrides) -> TrainConfig:
    """The shipped config's TrainConfig for this kind, with the bench's flags and the row's overrides."""
    tc = load_config(Path(__file__).resolve().parent / CONFIGS[kind]).train
    return dataclasses.replace(tc, batch_size=1, grad_accum=1, compile=cfg.compile, attention_backend=cfg.attention,
                               **overrides)


# ---------------------------------------------------------------- the step functions timed


def ours_train_fn(model, tc: TrainConfig, cfg: BenchConfig, res: int, device, offload: int | None = None,
                  ip_adapter: bool = False):
    """train.py's step on random cache entries of the Kontext shape (offload: ModelConfig.resident_blocks). With
    ip_adapter, an XLabs-sized random IP-Adapter is loaded first (as load_transformer does) and each entry carries
    CLIP image embeddings; with tc.region_token (configs/region_depth.py) the region token trains too, and entries
    carry a mask (the left half)."""
    if ip_adapter:
        add_ip_adapter(model, fixtures.random_ip_adapter_state(model))
    params, attention = train.prepare_transformer(model, tc, device, offload)
    region = train.make_region(model, tc, device)
    params = params + (list(region.parameters()) if region is not None else [])
    optimizer = train.make_optimizer(params, tc)
    entries = fixtures.random_entries(tc.batch_size, res, cfg.text_tokens, dims(cfg))
    for e in entries:
        if ip_adapter:
            e["ip_image_embeds"] = torch.randn(1, 768)  # CLIP ViT-L/14's projection width
        if tc.region_token or tc.loss == "dual_masked":
            e["mask"] = torch.zeros(1, *e["image_latents"].shape[1:])
            e["mask"][..., : e["mask"].shape[-1] // 2] = 1.0
    empty = fixtures.random_empty(cfg.text_tokens, dims(cfg))
    shapes = [tuple(e["image_latents"].shape) + tuple(e["control_latents"].shape) for e in entries]
    steps = itertools.count()

    def step():
        i = next(steps)
        for g in optimizer.param_groups:
            g["lr"] = tc.lr * train.lr_factor(i, tc)
        batches = train.micro_batches(entries, shapes, empty, tc, i, 0, 1, device, torch.bfloat16)
        train.train_step(model, params, optimizer, batches, tc, region=region)

    return step, attention


def stock_forward(model, inp, t=0.5):
    """The Kontext call as a diffusers user writes it (pipeline_flux_kontext's denoising loop)."""
    x_t = (1 - t) * inp["x0"] + t * inp["noise"]
    out = model(hidden_states=torch.cat([x_t, inp["control"]], 1),
                timestep=torch.full((1,), t, device=x_t.device, dtype=x_t.dtype),
                guidance=torch.ones(1, device=x_t.device), pooled_projections=inp["pooled"],
                encoder_hidden_states=inp["prompt_embeds"], txt_ids=inp["txt_ids"], img_ids=inp["img_ids"],
                return_dict=False)[0]
    return out[:, :x_t.shape[1]]


def stock_train_fn(model, inp, ckpt: bool, compile_: bool, group_offload: bool = False):
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=STOCK_TARGETS))
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
    if ckpt:
        model.enable_gradient_checkpointing()
    if group_offload:  # what a diffusers user would try first (offload.py's docstring says why it cannot train)
        model.enable_group_offload(onload_device=inp["x0"].device, offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1, use_stream=True)
    if compile_:
        model.compile_repeated_blocks(fullgraph=False)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-5)
    target = inp["noise"] - inp["x0"]

    def step():
        F.mse_loss(stock_forward(model, inp).float(), target.float()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def ours_denoise_fn(model, cfg: BenchConfig, res: int, device, compile_: bool, offload: int | None = None):
    """One denoising step as sample.py runs it: a LoRA loaded (unfused, as lora.load_lora leaves it), the shipped
    SampleConfig (compile off unless the row turns it on) through sample.prepare_transformer, then predict_velocity."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=STOCK_TARGETS))  # a LoRA being sampled
    sc = dataclasses.replace(SampleConfig(), compile=compile_ and cfg.compile, attention_backend=cfg.attention)
    attention = sample.prepare_transformer(model, sc, device, offload)
    inp = fixtures.random_inputs(res, cfg.text_tokens, dims(cfg), device)
    t = torch.full((1,), 0.5, device=device, dtype=torch.bfloat16)
    guidance = torch.full((1,), 3.5, device=device)

    @torch.no_grad()
    def step():
        predict_velocity(model, inp["x0"], inp["control"], t, guidance, inp["prompt_embeds"], inp["pooled"],
                         inp["txt_ids"], inp["img_ids"])

    return step, attention


def ours_stepcache_fn(model, cfg: BenchConfig, res: int, device, cache: str):
    """A whole sample.sample call as sample.py makes it (LoRA unfused, the shipped SampleConfig's 28 steps, only
    `cache` changed) on a res x res control image (encoded by the tiny random VAE: only its size matters here) with
    random prompt embeddings (no text encoders), latents out. Returns (fn, attention, extra): extra holds the
    latents' relative error against the same call uncached and, once fn ran, denoise_s (its steps' seconds)."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=STOCK_TARGETS))
    sc = dataclasses.replace(SampleConfig(), compile=False, attention_backend=cfg.attention, cache=cache)
    attention = sample.prepare_transformer(model, sc, device)
    vae = load_vae(ModelConfig(path=str(tiny.ensure_tiny()), vae=Part(dtype="bf16", device=str(device))))
    components = Components(vae=vae, transformer=model)
    d, g = dims(cfg), torch.Generator().manual_seed(0)
    embeds = torch.randn(1, cfg.text_tokens, d["joint_attention_dim"], generator=g).to(device, torch.bfloat16)
    pooled = torch.randn(1, d["pooled_projection_dim"], generator=g).to(device, torch.bfloat16)
    image = fixtures.random_image(res)
    kw = {k: v for k, v in dataclasses.asdict(sc).items() if k not in sample.NOT_SAMPLE_KWARGS}
    extra = {}

    def run(**override):
        out = sample.sample(components, image, None, prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                            generator=torch.Generator().manual_seed(0), output_type="latent", progress=False,
                            **dict(kw, **override))
        extra["denoise_s"] = round(sum(out.timings.steps), 4)
        return out.latents.float()

    ref = run(cache="")
    extra["latent_rel_err"] = float((run() - ref).norm() / ref.norm())
    return run, attention, extra


def ours_pipeline_fn(cfg: BenchConfig, res: int, device, offload: int | None):
    """sample.py's whole call on full-size random components, all bf16 on the GPU (CLIP-L, T5-XXL, the FLUX VAE)
    but the transformer, which streams from host memory with offload (sample.prepare_transformer): prompt encoding,
    a res x res control image encoded, the shipped SampleConfig's 28 steps, decoding to a PIL image."""
    if cfg.tiny:  # the code path on the miniature checkpoint (full-size encoders do not fit a CPU box beside 12B)
        part = Part(dtype="bf16", device=str(device))
        c = load_components(ModelConfig(path=str(tiny.ensure_tiny()), clip=part, t5=part, vae=part, transformer=part))
    else:
        parts = fixtures.full_size_components(device)  # random init of 12B weights is minutes on a CPU, seconds here
        c = Components(clip=parts["text_encoder"], clip_tokenizer=parts["tokenizer"], t5=parts["text_encoder_2"],
                       t5_tokenizer=parts["tokenizer_2"], vae=parts["vae"], transformer=parts["transformer"])
        if offload is not None:  # where load_transformer leaves it with model.offload (timed() resets the peak)
            c.transformer.to("cpu")
            torch.cuda.empty_cache()
    sc = dataclasses.replace(SampleConfig(), attention_backend=cfg.attention)
    attention = sample.prepare_transformer(c.transformer, sc, device, offload)
    image = fixtures.random_image(res)
    kw = {k: v for k, v in dataclasses.asdict(sc).items() if k not in sample.NOT_SAMPLE_KWARGS}

    def run():
        sample.sample(c, image, "make the sky red", generator=torch.Generator().manual_seed(0), progress=False, **kw)

    return run, attention


def stock_denoise_fn(model, inp, compile_: bool):
    if compile_:
        model.compile_repeated_blocks(fullgraph=False)
    model.eval()

    @torch.no_grad()
    def step():
        stock_forward(model, inp)

    return step


# ---------------------------------------------------------------- timing


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, cfg: BenchConfig) -> dict:
    """first_s (the first call: compilation and warm-up), then the median seconds and peak GiB of cfg.iters calls
    after cfg.warmup more untimed ones."""
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    for _ in range(cfg.warmup):
        fn()
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(cfg.iters):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1000)
        else:
            t1 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t1)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else float("nan")
    return dict(seconds=round(statistics.median(times), 4), peak_gib=round(peak, 2), first_s=round(first, 1))


KERNEL_KINDS = (  # first match wins; names as the profiler reports CUDA kernels
    ("quant", ("_quantize_rows", "_dequant")),  # our Triton fp8/4-bit kernels
    ("gemm", ("triton_tem", "gemm", "xmma", "cutlass", "nvjet")),  # cuBLAS/CUTLASS and inductor GEMM templates
    ("fused elementwise (triton)", ("triton_",)),  # inductor; checked before attention: its kernel names can
    ("attention", ("sdpa", "fmha", "flash")),  # spell the aten ops they fused (e.g. ..._flash_attention_...)
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other (aten)")


def profile_step(fn) -> dict:
    """One call of fn under torch.profiler: milliseconds of GPU kernel time per kind, and their sum. (The profiler
    slows the host, so the gap to the step time is taken against the unprofiled median in run_row.)"""
    from torch.profiler import ProfilerActivity, profile

    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    kinds: dict[str, float] = {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0:
            k = kernel_kind(e.key)
            kinds[k] = kinds.get(k, 0.0) + e.self_device_time_total / 1e3
    return dict({k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
                kernels_ms=round(sum(kinds.values()), 1))


# ---------------------------------------------------------------- the rows


def run_row(label: str, cfg: BenchConfig, device, res: int, *, who: str, kind: str = "bf16", ckpt: bool = False,
            compile_: bool = False, denoise: bool = False, fp8_backward: bool | None = None,
            offload: int | None = None, cache: str | None = None, ip_adapter: bool = False,
            pipeline: bool = False, compile_cache: str | None = None, budget: float | None = None,
            adapter: str = "lora") -> dict:
    t0 = time.perf_counter()
    row = dict(row=label, res=res)
    if compile_cache is not None:  # "cold": inductor's and triton's own caches empty, then our file; "warm": our file
        saved = cache_rows_file(cfg, label)
        for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # this child process only
            os.environ[var] = tempfile.mkdtemp(prefix=f"bench-{var.lower()}-")
        if compile_cache == "cold" and saved.exists():
            saved.unlink()
    try:
        model = None if pipeline else build(cfg, device, "bf16" if who == "stock" else kind)
        if pipeline:
            fn, row["attention"] = ours_pipeline_fn(cfg, res, device, offload)
        elif who == "stock":
            if kind == "nf4":
                model = fixtures.stock_int4(model)
            if torch.cuda.is_available():
                model.set_attention_backend("_native_flash")
            inp = fixtures.random_inputs(res, cfg.text_tokens, dims(cfg), device)
            fn = (stock_denoise_fn(model, inp, compile_) if denoise else
                  stock_train_fn(model, inp, ckpt, compile_, group_offload=offload is not None))
        elif cache is not None:
            row["cache"] = cache
            fn, row["attention"], extra = ours_stepcache_fn(model, cfg, res, device, cache)
        elif denoise:
            fn, row["attention"] = ours_denoise_fn(model, cfg, res, device, compile_, offload)
        else:
            # fp8_backward None: the shipped config's choice (configs/fp8.py: on)
            extra = {} if fp8_backward is None else dict(fp8_backward=fp8_backward)
            extra.update(memory_budget=budget or 0.0)  # None: all or nothing, as the label says
            if budget is not None:  # recompute.py: the budget's levels with checkpointing on
                row.update(kind=kind, budget=budget)
            tc = ours_config(kind, cfg, gradient_checkpointing=ckpt, adapter=adapter, **extra)
            fn, row["attention"] = ours_train_fn(model, tc, cfg, res, device, offload, ip_adapter)
        if compile_cache is not None:  # as sample.py / train.py do around their first compiled call
            row["cache_loaded"] = compile_cache_.load(saved)
            fn = first_then_save(fn, saved)
        row.update(timed(fn, cfg))
        if not pipeline and cache is None:  # the distance to the chip: work per step over time, against the peak
            # a budget row counts the work of the step without its partial recompute (the useful work)
            row["tflop"] = round(step_tflop(dims(cfg), res, cfg.text_tokens, denoise=denoise,
                                            ckpt=ckpt and not budget), 1)
            row["tflops"] = round(row["tflop"] / row["seconds"], 1)
            row["pct_peak"] = round(100 * row["tflops"] / PEAK_TFLOPS["fp8" if kind == "fp8" else "bf16"], 1)
        if offload is not None and who == "ours" and not pipeline:  # what crosses the host link per step
            off = model._block_offload
            row["host_gb_per_step"] = round(off.bytes_per_fetch * (1 if denoise else 2) / 1e9, 1)
        if cache is not None:
            row.update(extra)  # denoise_s of the last timed call
        elif cfg.profile and who == "ours" and torch.cuda.is_available() and not pipeline:
            prof = profile_step(fn)
            # timed step minus GPU kernel time: launch overhead, host work and syncs while the GPU idles
            row["profile_ms"] = dict(prof, gap_ms=round(row["seconds"] * 1e3 - prof["kernels_ms"], 1))
    except Exception as e:  # a failing variant is a finding to print, not a reason to lose the other rows
        row.update(seconds=None, peak_gib=None, error=f"{type(e).__name__}: {str(e)[:300]}")
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(row), flush=True)
    gc.collect()
    return row


def cache_rows_file(cfg: BenchConfig, label: str) -> Path:
    """The compile-cache file a cold row writes and its warm row reads (one per row pair, in the system temp folder)."""
    name = hashlib.sha256(label.rsplit(", ", 1)[0].encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "bench-compile-cache" / f"{name}.bin"


def first_then_save(fn, saved: Path):
    """fn, saving the compile cache once after its first call (as train.py after its first step)."""
    calls = []

    def run():
        fn()
        if not calls:
            sync()
            calls.append(compile_cache_.save(saved))
    return run


def plan(cfg: BenchConfig) -> list[tuple[str, int, dict]]:
    stock, ours = dict(who="stock"), dict(who="ours")
    sc = [True] if cfg.stock_compile else []
    rows = []
    big = cfg.res[0]  # the full-size rows run at the first resolution only (1024 by default)
    shipped = ours_config("bf16", cfg).memory_budget
    for res in cfg.res:
        if "bf16" in cfg.rows:
            rows += [("bf16 train, no recompute: stock", res, stock),
                     *[("bf16 train, no recompute: stock+compile", res, dict(stock, compile_=True)) for _ in sc
                       if res == big],
                     ("bf16 train, no recompute: ours", res, ours)]
        if res != big:
            continue
        if "ckpt" in cfg.rows:
            rows += [("bf16 train, full ckpt: stock", res, dict(stock, ckpt=True)),
                     *[("bf16 train, full ckpt: stock+compile", res, dict(stock, ckpt=True, compile_=True))
                       for _ in sc],
                     ("bf16 train, full ckpt: ours", res, dict(ours, ckpt=True)),
                     (f"bf16 train, memory budget {shipped:g}: ours (configs/bf16.py)", res,
                      dict(ours, ckpt=True, budget=shipped))]
        if "fp8" in cfg.rows:
            rows += [("fp8 train, no recompute: ours (configs/fp8.py)", res, dict(ours, kind="fp8")),
                     ("fp8 train, no recompute: ours, bf16 input gradient", res,
                      dict(ours, kind="fp8", fp8_backward=False)),
                     ("fp8 train, full ckpt: ours", res, dict(ours, kind="fp8", ckpt=True))]
        if "int4" in cfg.rows:
            rows += [*([("nf4 train, full ckpt: stock bnb", res, dict(stock, kind="nf4", ckpt=True))]
                       if cfg.stock_int4 else []),
                     ("nf4 train, full ckpt: ours", res, dict(ours, kind="nf4", ckpt=True))]
        if "denoise" in cfg.rows:
            rows += [("denoise step: stock", res, dict(stock, denoise=True)),
                     *[("denoise step: stock+compile", res, dict(stock, denoise=True, compile_=True)) for _ in sc],
                     ("denoise step: ours (sample.py defaults)", res, dict(ours, denoise=True)),
                     ("denoise step: ours, SampleConfig.compile=True", res, dict(ours, denoise=True, compile_=True)),
                     ("denoise step: ours fp8", res, dict(ours, kind="fp8", denoise=True))]
        if "stepcache" in cfg.rows:  # not in the default rows: --rows stepcache
            rows += [(f"28-step sample: cache {spec or 'off'}", res, dict(ours, cache=spec))
                     for spec in STEPCACHE_SPECS]
        if "masked" in cfg.rows:  # not in the default rows: issue #12's conditioning, beside the plain bf16 step
            rows += [("bf16 train, full ckpt: ours", res, dict(ours, ckpt=True)),
                     ("bf16 train, full ckpt: ours + IP-Adapter", res, dict(ours, ckpt=True, ip_adapter=True)),
                     ("bf16 train, full ckpt: ours + IP-Adapter + region token + dual masked loss "
                      "(configs/region_depth.py)", res, dict(ours, kind="region_depth", ckpt=True, ip_adapter=True))]
        if "full" in cfg.rows:  # not in the default rows: train.mode full (full.py) beside the LoRA step
            rows += [*([("bf16 train, full ckpt: ours", res, dict(ours, ckpt=True))]
                       if "ckpt" not in cfg.rows else []),
                     ("bf16 full fine-tune, full ckpt: ours (configs/full_bf16.py)", res,
                      dict(ours, kind="full", ckpt=True))]
        adapter_rows = [a for a in ("lokr", "loha", "dora") if a in cfg.rows]
        if adapter_rows:  # not in the default rows: train.adapter swapped in configs/bf16.py's step (adapters.py)
            rows += [*([("bf16 train, full ckpt: ours (configs/bf16.py)", res, dict(ours, ckpt=True))]
                       if not {"ckpt", "full", "masked"} & set(cfg.rows) else []),
                     *[(f"bf16 train, full ckpt: ours, train.adapter {a} (configs/bf16.py)", res,
                        dict(ours, ckpt=True, adapter=a)) for a in adapter_rows]]
        if "offload" in cfg.rows:  # ModelConfig.offload: the weights stream from host memory (offload.py)
            rows += [("bf16 train, full ckpt, diffusers group offloading (block level, stream): stock", res,
                      dict(stock, ckpt=True, offload=0)),
                     ("bf16 train, full ckpt, block offload, all blocks streamed: ours", res,
                      dict(ours, ckpt=True, offload=0)),
                     ("bf16 train, full ckpt, block offload, 24 blocks resident: ours", res,
                      dict(ours, ckpt=True, offload=24)),
                     ("nf4 train, full ckpt, block offload, all blocks streamed: ours", res,
                      dict(ours, kind="nf4", ckpt=True, offload=0)),
                     ("denoise step: ours, block offload, all blocks streamed", res,
                      dict(ours, denoise=True, offload=0))]
        if "compile_cache" in cfg.rows:  # not in the default rows: compile_cache.py, a cold process then a warm one
            for what, kw in (("denoise step: ours compiled", dict(denoise=True, compile_=True)),
                             ("denoise step: ours fp8 compiled", dict(kind="fp8", denoise=True, compile_=True)),
                             ("bf16 train, full ckpt: ours", dict(ckpt=True))):
                rows += [(f"{what}, {state} compile", res, dict(ours, **kw, compile_cache=state))
                         for state in ("cold", "warm")]
        for group, kind in (("budget", "bf16"), ("budget_fp8", "fp8"), ("budget_nf4", "nf4")):  # recompute.py
            if group in cfg.rows:
                rows += [(f"{kind} train, no recompute: ours", res, dict(ours, kind=kind))]
                rows += [(f"{kind} train, memory budget {b:g}: ours", res, dict(ours, kind=kind, ckpt=True, budget=b))
                         for b in cfg.budgets]
        if "pipeline" in cfg.rows:  # not in the default rows: a whole sample.py call, encoders and VAE included
            rows += [("sample.py whole call (28 steps; CLIP, T5, VAE bf16 on the GPU), transformer streamed: ours",
                      res, dict(ours, pipeline=True, offload=0))]
    return rows


def run_child(cfg: BenchConfig, i: int, label: str, res: int) -> dict:
    """Each row in its own process: a crash (an illegal memory access poisons the CUDA context) or an
    out-of-memory loses that row only, and every row starts with an empty GPU."""
    args = [sys.executable, __file__, "--only", str(i), "--attention", cfg.attention, "--rows", *cfg.rows,
            "--res", *map(str, cfg.res), "--iters", str(cfg.iters), "--warmup", str(cfg.warmup),
            "--text-tokens", str(cfg.text_tokens), "--budgets", *map(str, cfg.budgets)]
    args += [f"--{'' if v else 'no-'}{k.replace('_', '-')}" for k, v in
             (("compile", cfg.compile), ("stock_compile", cfg.stock_compile), ("stock_int4", cfg.stock_int4),
              ("tiny", cfg.tiny), ("profile", cfg.profile))]
    r = subprocess.run(args, capture_output=True, text=True, timeout=900)
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("{"):
            print(line, flush=True)  # as each row ends: a parent stopped later keeps what finished
            return json.loads(line)
    row = dict(row=label, res=res, seconds=None, peak_gib=None, error=f"exit {r.returncode}: {r.stderr[-400:]}")
    print(json.dumps(row), flush=True)
    return row


def main(cfg: BenchConfig) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.tiny:
        cfg = dataclasses.replace(cfg, res=(64, 32)[: len(cfg.res)], text_tokens=16, iters=2, warmup=1)
    rows = plan(cfg)
    if cfg.only >= 0:  # child: run one row in this process
        label, res, kw = rows[cfg.only]
        return [run_row(label, cfg, device, res, **kw)]
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    import diffusers
    import peft

    versions = dict(gpu=gpu, torch=torch.__version__, diffusers=diffusers.__version__, peft=peft.__version__,
                    date=time.strftime("%Y-%m-%d"))
    print(f"# {versions}; ours: compile={cfg.compile} attention={cfg.attention}", flush=True)
    results = [run_child(cfg, i, label, res) for i, (label, res, _) in enumerate(rows)
               if not cfg.match or any(m in label for m in cfg.match)]
    print(bench_tables.format_table([r for r in results if "cache" not in r]))
    if any("cache" in r for r in results):  # whole images, not steps: their own table
        print(bench_tables.format_stepcache(results))
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump(dict(versions, attention=cfg.attention, rows=results), f, indent=1)
    print(json.dumps(dict(versions, rows=results)))
    if any("budget" in r for r in results) and cfg.plot:  # last: the rows are printed whatever the plot does
        bench_tables.plot_budget(results, cfg.plot)
    return results


if __name__ == "__main__":
    quiet.install()
    import tyro

    main(tyro.cli(BenchConfig, description=__doc__.splitlines()[0]))
