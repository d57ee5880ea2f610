"""Benchmark: stock diffusers+peft vs ours, side by side in one run, on a full-size random FLUX.1 Kontext
transformer (speed does not depend on the weights' values). Prints DESIGN.md §5's table and a JSON last line.

    python bench.py                         # every row (H100: ~20 min)
    python bench.py --rows bf16 --res 1024  # a subset; --match ours / --match stock select rows by label
    python bench.py --tiny                  # the miniature model on CPU: checks the script, times nothing useful

"stock" runs diffusers' FluxTransformer2DModel with peft LoRA as a user would, except that attention is pinned to
PyTorch's flash backend: on the H100 image the default SDPA choice crashed in a Flux backward (diag_attention.py). A
train step = forward + MSE on the target tokens + backward (LoRA r16 on to_q/to_k/to_v/to_out.0, frozen base) +
AdamW step. Kontext at 1024^2: 4096 target + 4096 control + 512 text tokens. Each row builds the model anew, warms
up (compilation included) outside the timing, then reports the median of `iters` steps (CUDA events) and the peak
allocated memory. Every optimisation of "ours" is a flag (--no-compile, --attention flash, ...).
"""

import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FLUX_KONTEXT = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                    guidance_embeds=True, axes_dims_rope=(16, 56, 56))
TINY = dict(FLUX_KONTEXT, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class BenchConfig:
    rows: tuple[str, ...] = ("bf16", "ckpt", "denoise", "fp8", "int4")  # which groups of the table to run
    res: tuple[int, ...] = (1024, 512)  # 512 runs only the bf16 no-recompute row
    iters: int = 5
    warmup: int = 2
    compile: bool = True  # ours: torch.compile each repeated block (diffusers' compile_repeated_blocks)
    attention: str = "auto"  # ours: auto | cudnn | cudnn_torch | flash | default (train.resolve_attention)
    profile: bool = True  # ours: one extra step under torch.profiler, GPU time by kernel kind
    stock_compile: bool = True  # also time stock + compile_repeated_blocks
    stock_int4: bool = True  # stock bitsandbytes nf4 + peft (needs bitsandbytes)
    tiny: bool = False
    text_tokens: int = 512
    out: str = ""  # also write the rows as JSON here
    match: tuple[str, ...] = ()  # run only rows whose label contains one of these (e.g. --match ours)
    only: int = -1  # internal: run only this row of the plan, in this process


# ---------------------------------------------------------------- model and inputs


def build_transformer(cfg: BenchConfig, device, **dims_override):
    from diffusers import FluxTransformer2DModel

    dims = dict(TINY if cfg.tiny else FLUX_KONTEXT, **dims_override)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build straight in bf16 on the device: no fp32 copy of 12B weights
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**dims)
    finally:
        torch.set_default_dtype(prev)
    return model.requires_grad_(False)


def make_inputs(cfg: BenchConfig, res: int, device):
    dims = TINY if cfg.tiny else FLUX_KONTEXT
    from encode import latent_ids

    n = (res // 16) ** 2  # target tokens; the control image has the same size
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device, torch.bfloat16)  # noqa: E731
    ids = torch.cat([latent_ids(res // 8, res // 8, 0.0), latent_ids(res // 8, res // 8, 1.0)])
    return dict(x0=r(1, n, 64), noise=r(1, n, 64), control=r(1, n, 64),
                prompt_embeds=r(1, cfg.text_tokens, dims["joint_attention_dim"]),
                pooled=r(1, dims["pooled_projection_dim"]), img_ids=ids.to(device, torch.bfloat16),
                txt_ids=torch.zeros(cfg.text_tokens, 3, device=device, dtype=torch.bfloat16))


def forward(model, inp, t=0.5):
    from encode import predict_velocity

    tt = torch.full((1,), t, device=inp["x0"].device, dtype=torch.bfloat16)
    x_t = (1 - t) * inp["x0"] + t * inp["noise"]
    return predict_velocity(model, x_t, inp["control"], tt, torch.ones(1, device=tt.device), inp["prompt_embeds"],
                            inp["pooled"], inp["txt_ids"], inp["img_ids"])


def add_lora(model):
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=LORA_TARGETS))
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
    return params


# ---------------------------------------------------------------- timing


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, cfg: BenchConfig) -> tuple[float, float]:
    """(median seconds, peak GiB) of fn() after cfg.warmup untimed calls."""
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
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else float("nan")
    return statistics.median(times), peak


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


def train_step_fn(model, params, inp):
    opt = torch.optim.AdamW(params, lr=1e-5)
    target = inp["noise"] - inp["x0"]

    def step():
        loss = F.mse_loss(forward(model, inp).float(), target.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def denoise_fn(model, inp):
    @torch.no_grad()
    def step():
        forward(model, inp)

    return step


# ---------------------------------------------------------------- the rows


def quantize(model, kind: str):
    import quant

    return quant.quantize_transformer(model, kind)


def stock_int4(model):
    """diffusers' bitsandbytes path: every Linear of the blocks as bnb.nn.Linear4bit nf4, bf16 compute."""
    import bitsandbytes as bnb

    for block in list(model.transformer_blocks) + list(model.single_transformer_blocks):
        for name, mod in list(block.named_modules()):
            if isinstance(mod, torch.nn.Linear):
                parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
                new = bnb.nn.Linear4bit(mod.in_features, mod.out_features, mod.bias is not None,
                                        compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
                # quantized on the GPU where the weight lies (a CPU round trip copies 12B weights twice)
                new.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, quant_type="nf4").cuda()
                if mod.bias is not None:
                    new.bias = torch.nn.Parameter(mod.bias.data, requires_grad=False)
                setattr(parent, name.rsplit(".", 1)[-1], new)
    return model


def run_row(label: str, cfg: BenchConfig, device, res: int, *, kind: str = "bf16", ckpt: bool = False,
            compile_: bool = False, attention: str = "flash", denoise: bool = False, fuse: bool = False,
            stock4: bool = False, fp8_backward: bool = False) -> dict:
    import kernels.fp8

    kernels.fp8.BACKWARD_FP8 = fp8_backward  # input gradient as an e5m2 x e4m3 GEMM instead of bf16
    model = build_transformer(cfg, device)
    if kind != "bf16":
        model = quantize(model, kind)
    if stock4:
        model = stock_int4(model)
    if torch.cuda.is_available():
        from train import set_attention

        # inside the model: holds under compile and checkpoint recompute
        set_attention(model, attention, device, checkpointed=ckpt, compiled=compile_)
    params = add_lora(model)
    if fuse:
        model.fuse_lora(lora_scale=1.0)  # sampling with a fixed LoRA: merge it into the base weights
    if ckpt:
        model.enable_gradient_checkpointing()
    if compile_:
        model.compile_repeated_blocks(fullgraph=False)
    inp = make_inputs(cfg, res, device)
    fn = denoise_fn(model, inp) if denoise else train_step_fn(model.train(), params, inp)
    t0 = time.perf_counter()
    try:
        sec, peak = timed(fn, cfg)
        row = dict(row=label, res=res, seconds=round(sec, 4), peak_gib=round(peak, 2))
        if cfg.profile and "stock" not in label and torch.cuda.is_available():
            prof = profile_step(fn)
            # timed step minus GPU kernel time: launch overhead, host work and syncs while the GPU idles
            row["profile_ms"] = dict(prof, gap_ms=round(sec * 1e3 - prof["kernels_ms"], 1))
    except Exception as e:  # a failing variant is a finding to print, not a reason to lose the other rows
        row = dict(row=label, res=res, seconds=None, peak_gib=None, error=f"{type(e).__name__}: {str(e)[:200]}")
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(row), flush=True)
    del model, params, inp, fn
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def plan(cfg: BenchConfig, attention: str) -> list[tuple[str, int, dict]]:
    ours = dict(compile_=cfg.compile, attention=attention)
    rows = []
    big = cfg.res[0]  # the full-size rows run at the first resolution only (1024 by default)
    for res in cfg.res:
        if "bf16" in cfg.rows:
            rows += [("bf16 train, no recompute: stock", res, {}),
                     *([("bf16 train, no recompute: stock+compile", res, dict(compile_=True))]
                       if cfg.stock_compile and res == big else []),
                     ("bf16 train, no recompute: ours", res, ours)]
        if res != big:
            continue
        if "ckpt" in cfg.rows:
            rows += [("bf16 train, full ckpt: stock", res, dict(ckpt=True)),
                     *([("bf16 train, full ckpt: stock+compile", res, dict(ckpt=True, compile_=True))]
                       if cfg.stock_compile else []),
                     ("bf16 train, full ckpt: ours", res, dict(ours, ckpt=True)),
                     ("bf16 train, full ckpt: ours with kernels/attention.py's cuDNN path", res,
                      dict(ours, ckpt=True, attention="cudnn"))]
        if "denoise" in cfg.rows:
            rows += [("denoise step: stock", res, dict(denoise=True)),
                     *([("denoise step: stock+compile", res, dict(denoise=True, compile_=True))]
                       if cfg.stock_compile else []),
                     ("denoise step: ours (LoRA fused)", res, dict(ours, denoise=True, fuse=True))]
        if "fp8" in cfg.rows:
            rows += [("fp8 train, no recompute: ours", res, dict(ours, kind="fp8")),
                     ("fp8 train, no recompute: ours, fp8 input gradient", res,
                      dict(ours, kind="fp8", fp8_backward=True)),
                     ("fp8 train, full ckpt: ours", res, dict(ours, kind="fp8", ckpt=True)),
                     ("denoise step: ours fp8 (LoRA unfused)", res, dict(ours, kind="fp8", denoise=True))]
        if "int4" in cfg.rows:
            if cfg.stock_int4:
                rows += [("nf4 train, full ckpt: stock bnb", res, dict(ckpt=True, stock4=True))]
            rows += [("nf4 train, full ckpt: ours", res, dict(ours, kind="nf4", ckpt=True))]
    return rows


def run_child(cfg: BenchConfig, i: int, attention: str, label: str, res: int) -> dict:
    """Each row in its own process: a crash (an illegal memory access poisons the CUDA context) or an
    out-of-memory loses that row only, and every row starts with an empty GPU."""
    args = [sys.executable, __file__, "--only", str(i), "--attention", attention, "--rows", *cfg.rows,
            "--res", *map(str, cfg.res), "--iters", str(cfg.iters), "--warmup", str(cfg.warmup)]
    args += [f"--{'' if v else 'no-'}{k.replace('_', '-')}" for k, v in
             (("compile", cfg.compile), ("stock_compile", cfg.stock_compile), ("stock_int4", cfg.stock_int4),
              ("tiny", cfg.tiny), ("profile", cfg.profile))]
    r = subprocess.run(args, capture_output=True, text=True, timeout=900)
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("{"):
            print(line, flush=True)  # as each row ends: a parent stopped later keeps what finished
            return json.loads(line)
    row = dict(row=label, res=res, seconds=None, peak_gib=None, error=f"exit {r.returncode}: {r.stderr[-300:]}")
    print(json.dumps(row), flush=True)
    return row


def main(cfg: BenchConfig) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.tiny:
        cfg = dataclasses.replace(cfg, res=(64, 32)[: len(cfg.res)], text_tokens=16, iters=2, warmup=1)
    attention = cfg.attention
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    if cfg.only < 0:
        print(f"# {gpu}, torch {torch.__version__}, ours: compile={cfg.compile} attention={attention}", flush=True)
    rows = plan(cfg, attention)
    if cfg.only >= 0:  # child: run one row in this process
        label, res, kw = rows[cfg.only]
        return [run_row(label, cfg, device, res, **kw)]
    results = [run_child(cfg, i, attention, label, res) for i, (label, res, _) in enumerate(rows)
               if not cfg.match or any(m in label for m in cfg.match)]
    print(format_table(results))
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump(dict(gpu=gpu, torch=torch.__version__, attention=attention, rows=results), f, indent=1)
    print(json.dumps(dict(gpu=gpu, torch=torch.__version__, rows=results)))
    return results


def format_table(rows: list[dict]) -> str:
    lines = ["| work | res | s/step | peak GiB | GPU ms by kernel kind (one profiled step) |", "|---|---|---|---|---|"]
    for r in rows:
        s = f"{r['seconds']:.3f}" if r["seconds"] is not None else f"failed: {r.get('error', '')[:60]}"
        p = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        prof = " · ".join(f"{k} {v:g}" for k, v in r.get("profile_ms", {}).items())
        lines.append(f"| {r['row']} | {r['res']} | {s} | {p} | {prof} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import tyro

    main(tyro.cli(BenchConfig, description=__doc__.splitlines()[0]))
