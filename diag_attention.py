"""Why does a Flux backward through cuDNN attention crash? Each variant runs one LoRA train step (eager, no
checkpointing) of a random-weight FLUX.1 Kontext transformer in its own process and prints ok / the error's last
lines, so one illegal memory access loses one variant only.

    python diag_attention.py                 # every variant (H100: ~4 min)
    python diag_attention.py --only guarded  # one
"""

import json
import os
import subprocess
import sys
import time

import torch

# name: (double blocks, single blocks, resolution, attention, extra env)
VARIANTS = {
    "diffusers_cudnn": (19, 38, 1024, "cudnn", {"CUDA_LAUNCH_BLOCKING": "1"}),
    "guarded": (19, 38, 1024, "guarded", {}),
    "guarded_recompute": (19, 38, 1024, "guarded_recompute", {}),
    "double_only": (19, 0, 1024, "cudnn", {}),
    "single_only": (0, 38, 1024, "cudnn", {}),
    "res512": (19, 38, 512, "cudnn", {}),
    "few_blocks": (2, 4, 1024, "cudnn", {}),
    "standalone_57": (0, 0, 1024, "standalone", {}),
}


def standalone(n: int = 57):
    """57 forwards through diffusers' own cuDNN backend function, then one backward through all of them."""
    from diffusers.models.attention_dispatch import _native_cudnn_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    loss = 0
    for _ in range(n):
        q, k, v = (torch.randn(1, 8704, 24, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                   for _ in range(3))
        loss = loss + _native_cudnn_attention(q, k, v).flatten(2, 3).float().square().mean()
    loss.backward()


def model_step(double: int, single: int, res: int, attention: str):
    import bench
    from kernels.attention import install_cudnn
    from train import set_attention

    cfg = bench.BenchConfig()
    model = bench.build_transformer(cfg, "cuda", num_layers=double, num_single_layers=single)

    # "cudnn": PyTorch's own cuDNN SDPA path (diffusers' _native_cudnn); "guarded*": kernels/attention.py
    set_attention(model, "cudnn" if attention.startswith("guarded") else "cudnn_torch", torch.device("cuda"))
    if attention.startswith("guarded"):
        install_cudnn(guarded=True, recompute=attention.endswith("recompute"))
    params = bench.add_lora(model)
    inp = bench.make_inputs(cfg, res, "cuda")
    step = bench.train_step_fn(model.train(), params, inp)
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    return params


def child(name: str):
    double, single, res, attention, _ = VARIANTS[name]
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if attention == "standalone":
        standalone()
    else:
        params = model_step(double, single, res, attention)
        assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    torch.cuda.synchronize()
    print(json.dumps(dict(variant=name, ok=True, s=round(time.perf_counter() - t0, 1),
                          peak_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 1))), flush=True)


def main(only: str = ""):
    for name, (*_, env) in VARIANTS.items():
        if only and name != only:
            continue
        r = subprocess.run([sys.executable, __file__, "--child", name], capture_output=True, text=True,
                           timeout=300, env=dict(os.environ, **env))
        line = next((x for x in reversed(r.stdout.splitlines()) if x.startswith("{")), None)
        if line is None:
            err = [x for x in r.stderr.splitlines() if x.strip()][-12:]
            line = json.dumps(dict(variant=name, ok=False, exit=r.returncode, error=err))
        print(line, flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    else:
        main(sys.argv[2] if len(sys.argv) == 3 and sys.argv[1] == "--only" else "")
