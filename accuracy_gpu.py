"""Whole-model accuracy of the quantized transformers: a random-weight FLUX.1 Kontext transformer in bf16, the same
weights quantized in place to fp8 (our FP8Linear) and to nf4 / fp4 (our Linear4bit), the same LoRA on each.
Reports, against bf16: the relative error of the velocity prediction (no grad), of the training loss and of the
LoRA gradients of one train step (cosine too). Attention is flash for every kind, so only the linears differ.

    python accuracy_gpu.py           # H100, full size at 1024^2 (one model on the GPU at a time)
    python accuracy_gpu.py --tiny    # CPU, miniature dims: checks the script, measures nothing useful
"""

import gc
import json
import sys

import torch
import torch.nn.functional as F

import bench

KINDS = ("bf16", "fp8", "nf4", "fp4")


def run_kind(kind: str, cfg: bench.BenchConfig, res: int, device) -> dict:
    """Velocity prediction, loss and LoRA gradients of one model; weights and LoRA are seeded, so every kind starts
    from the same bf16 weights and the same adapter."""
    torch.manual_seed(0)
    model = bench.build_transformer(cfg, device)
    if kind != "bf16":
        model = bench.quantize(model, kind)
    if device.type == "cuda":
        from train import set_attention

        set_attention(model, "flash", device)
    params = bench.add_lora(model)
    g = torch.Generator().manual_seed(1)
    for p in params:  # lora_B starts at zero: give both factors values so the LoRA changes the output
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.enable_gradient_checkpointing()  # one step's memory stays near the weights' size
    inp = bench.make_inputs(cfg, res, device)
    with torch.no_grad():
        pred = bench.forward(model.eval(), inp).float()
    with torch.enable_grad():
        loss = F.mse_loss(bench.forward(model.train(), inp).float(), (inp["noise"] - inp["x0"]).float())
        loss.backward()
    out = dict(pred=pred.cpu(), loss=loss.detach().cpu(), grads=torch.cat([p.grad.flatten() for p in params]).cpu())
    del model, params, inp
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def compare(ref: dict, other: dict) -> dict:
    return dict(pred_rel_err=rel(other["pred"], ref["pred"]), loss_rel_err=rel(other["loss"], ref["loss"]),
                grad_rel_err=rel(other["grads"], ref["grads"]),
                grad_cosine=float(F.cosine_similarity(other["grads"].float(), ref["grads"].float(), dim=0)),
                finite=bool(torch.isfinite(other["pred"]).all() and torch.isfinite(other["grads"]).all()))


def main(tiny: bool = False) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = bench.BenchConfig(tiny=tiny, text_tokens=16 if tiny else 512)
    res = 64 if tiny else 1024
    ref = run_kind("bf16", cfg, res, device)
    rows = []
    for kind in KINDS[1:]:
        row = dict(kind=kind, res=res, **compare(ref, run_kind(kind, cfg, res, device)))
        rows.append(row)
        print(f"{kind}: prediction rel err {row['pred_rel_err']:.2e}, loss {row['loss_rel_err']:.2e}, "
              f"LoRA grads {row['grad_rel_err']:.2e} (cosine {row['grad_cosine']:.4f}), finite {row['finite']}",
              flush=True)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(json.dumps(dict(gpu=gpu, torch=torch.__version__, rows=rows)))
    return rows


if __name__ == "__main__":
    if not torch.cuda.is_available() and "--tiny" not in sys.argv:
        sys.exit("accuracy_gpu.py: full size needs CUDA; use --tiny to check the script on CPU")
    main(tiny="--tiny" in sys.argv[1:])
