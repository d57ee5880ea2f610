"""kontext_kernels/fp8.py: each fast path against its pure-torch reference.

What runs where:
- CPU: quantize_fp8's rounding bound; fp8_linear == fp8_linear_ref (CPU dispatch); the Triton kernels' fp32
  instantiations under TRITON_INTERPRET=1 (indexing, masking of odd sizes, one-tile and looped rows, absmax, scale,
  clamp, the folded column scale, dequant), checked exactly against the references with NaN-poisoned outputs; the
  autograd function with the torch twins in place of the Triton launchers and CPU torch._scaled_mm (fp8 GEMM
  layouts and scales, forward and both backward paths); FP8Linear under peft LoRA and under .to(dtype).
- GPU (-m gpu): the Triton kernels' real bf16 -> e4m3/e5m2 instantiations, CUDA _scaled_mm, fp8_linear and its
  input gradient at Flux shapes and odd ones, LoRA training on an FP8Linear.

Bounds (relative L2 error, Gaussian data): e4m3 activation quantization moves a GEMM's output ~2.6% from the
weight-only reference (3 mantissa bits), so fp8 forward < 4e-2 against fp8_linear_ref, and < 1e-2 (and < 2e-2
per row) against a reference fed the same quantized activations; weight-only and the bf16 backward < 1e-2;
the e5m2 backward (2 mantissa bits, ~5.5%) < 8e-2.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kontext_kernels.fp8 as fp8
from kontext_kernels.fp8 import E4M3, E5M2, FP8Linear, fp8_linear, fp8_linear_ref, quantize_fp8

ROOT = Path(__file__).resolve().parents[1]
FP8_FWD, FP8_BWD, BF16 = 4e-2, 8e-2, 1e-2


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def row_rel(a, b):
    a, b = a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1])
    return ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()


def weights(n, k, device="cpu", seed=0):
    g = torch.Generator(device).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=device) * 0.02
    w[: n // 8] *= 10  # rows of different magnitude: per-row scales must differ
    return w


def activations(m, k, device="cpu", dtype=torch.bfloat16, seed=1):
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=device)
    x[:, : max(1, k // 256)] *= 20  # outlier channels, as in transformer activations
    return x.to(dtype)


# --------------------------------------------------------------------------------------------------- CPU
def test_quantize_fp8_per_row():
    w = weights(37, 50)
    w[5] = 0
    codes, scale = quantize_fp8(w)
    assert codes.dtype == E4M3 and codes.shape == w.shape and scale.shape == (37,) and scale.dtype == torch.float32
    deq = codes.float() * scale[:, None]
    assert torch.equal(deq[5], torch.zeros(50)) and deq.isfinite().all()
    nonzero = torch.arange(37) != 5
    assert torch.equal(codes.float().abs().amax(1)[nonzero], torch.full((36,), 448.0))
    # e4m3 rounds to half an ulp: 2^-4 relative for normal codes, 2^-10 of the scale for subnormal ones
    assert ((deq - w).abs() <= 2**-4 * w.abs() + 2**-10 * scale[:, None] + 1e-12).all()


@pytest.mark.parametrize("per_tensor", [False, True])
def test_cpu_dispatch_is_the_reference(per_tensor):
    w, x, b = weights(48, 64), activations(2 * 7, 64, dtype=torch.float32).reshape(2, 7, 64), torch.randn(48)
    codes, scale = quantize_fp8(w)
    if per_tensor:
        scale = scale.max().reshape(())
    dense = codes.float() * scale.reshape(-1, 1)
    assert torch.equal(fp8_linear(x, codes, scale, b), F.linear(x, dense, b))
    assert torch.equal(fp8_linear_ref(x, codes, scale, None), F.linear(x, dense))


INTERPRETED = """
import torch
import kontext_kernels.fp8 as fp8

nan = float("nan")
for (m, k) in [(5, 100), (7, 64), (3, 20000), (1, 16384), (2, 16385)]:  # odd, small, looped, one tile, just over
    x = torch.randn(m, k) * torch.logspace(-3, 3, m)[:, None]
    for col_scale in (None, torch.rand(k) + 0.5):
        for dtype in (fp8.E4M3, fp8.E5M2):
            out = (torch.full((m, k), nan), torch.full((m, 1), nan))
            q, s = fp8.quantize_rows(x, dtype, col_scale, out=out)
            qr, sr = fp8.quantize_rows_ref(x, dtype, col_scale, out=(torch.empty(m, k), torch.empty(m, 1)))
            assert torch.equal(s, sr) and torch.equal(q, qr), (m, k, dtype, (q - qr).abs().max())
            assert (q.abs().amax(1) >= torch.finfo(dtype).max * (1 - 1e-6)).all()  # each row's peak maps to the max
    strided = torch.randn(m, 2 * k)[:, ::2]  # rows with a stride: copied to unit stride first
    assert torch.equal(fp8.quantize_rows(strided, out=(torch.empty(m, k), torch.empty(m, 1)))[0],
                       fp8.quantize_rows_ref(strided, out=(torch.empty(m, k), torch.empty(m, 1)))[0])
assert torch.equal(fp8.quantize_rows(torch.zeros(3, 10), out=(torch.full((3, 10), nan), torch.empty(3, 1)))[0],
                   torch.zeros(3, 10))
for (n, k) in [(37, 300), (32, 128), (1, 5), (100, 1000)]:
    codes = (torch.randn(n, k) * 100).to(fp8.E4M3).float()  # e4m3 values held in fp32
    scale = torch.rand(n)
    out = fp8.dequantize(codes, scale, torch.float32, out=torch.full((n, k), nan))
    assert torch.equal(out, fp8.dequantize_ref(codes, scale, torch.float32)), (n, k)
print("ok")
"""


def test_triton_kernels_interpreted():
    """The kernels' fp32 instantiations on CPU tensors under TRITON_INTERPRET=1 (set before triton is imported,
    hence the subprocess). The fp8 cast itself is checked on the GPU."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(INTERPRETED)], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]


def fn_cpu(x, codes, scale, bias, use_fp8=True, backward_fp8=False):
    """The autograd function on CPU: torch twins for the Triton launchers, CPU torch._scaled_mm for the GEMMs; x's
    rows in and out, reshaped as fp8_linear does."""
    rows = x.reshape(-1, x.shape[-1])
    y = fp8._FP8LinearFn.apply(rows, codes, scale, bias, use_fp8, codes.t().contiguous() if backward_fp8 else None)
    return y.reshape(*x.shape[:-1], codes.shape[0])


def quantized_activation_ref(x, codes, scale, bias):
    """fp8_linear_ref fed the activation after the same per-row e4m3 rounding as the fp8 path."""
    x_q, x_scale = fp8.quantize_rows_ref(x.reshape(-1, x.shape[-1]))
    return fp8_linear_ref((x_q.float() * x_scale).reshape(x.shape), codes, scale, None if bias is None else bias.float())


@pytest.mark.parametrize("shape", [(2, 77, 256, 96), (1, 33, 64, 48)])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_function_on_cpu(shape, bias, monkeypatch):
    b_, m, k, n = shape
    x = activations(b_ * m, k).reshape(b_, m, k)
    codes, scale = quantize_fp8(weights(n, k))
    bias = torch.randn(n).bfloat16() * 0.1 if bias else None
    ref = fp8_linear_ref(x.float(), codes, scale, bias)
    y = fn_cpu(x, codes, scale, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (b_, m, n)
    assert rel(y, ref) < FP8_FWD
    assert rel(y, quantized_activation_ref(x, codes, scale, bias)) < BF16
    assert row_rel(y, quantized_activation_ref(x, codes, scale, bias)) < 2 * BF16

    g = torch.randn(b_, m, n).bfloat16()
    x32 = x.float().requires_grad_()
    with torch.enable_grad():
        fp8_linear_ref(x32, codes, scale, bias).backward(g.float())
    for backward_fp8, bound in [(False, BF16), (True, FP8_BWD)]:
        xg = x.clone().requires_grad_()
        with torch.enable_grad():
            fn_cpu(xg, codes, scale, bias, backward_fp8=backward_fp8).backward(g)
        assert xg.grad.dtype == torch.bfloat16 and rel(xg.grad, x32.grad) < bound, (backward_fp8,
                                                                                    rel(xg.grad, x32.grad))


@pytest.mark.parametrize("use_fp8", [True, False], ids=["fp8", "weight-only"])
def test_fp8_function_returns_its_gemm_output(use_fp8):
    """Rows in, rows out: the forward returns the GEMM's own output, not a view (the old [..., N] reshape) or a
    second call's result of it, the family of aliasing that torch 2.11's dynamo mis-wires (pytorch#180642;
    the compiled gradients: tests/test_quant.py's test_compiled_lora_gradients_equal_eager)."""
    from tests_util import forward_aliases

    x, (codes, scale) = activations(32, 64), quantize_fp8(weights(48, 64))
    args = (x, codes, scale, torch.randn(48).bfloat16(), use_fp8, None)
    y, calls = forward_aliases(fp8._FP8LinearFn, *args)
    assert calls == 1 and not any(y is a for a in args)
    assert y.shape == (32, 48) and torch.equal(y, fn_cpu(x, *args[1:4], use_fp8=use_fp8))


def test_fp8_function_weight_only_and_frozen_bias():
    x, (codes, scale) = activations(9, 64, dtype=torch.float32), quantize_fp8(weights(32, 64))
    b = torch.randn(32)
    assert torch.allclose(fn_cpu(x, codes, scale, b, use_fp8=False), fp8_linear_ref(x, codes, scale, b), atol=1e-6)
    with torch.enable_grad(), pytest.raises(RuntimeError, match="frozen"):
        fn_cpu(x.requires_grad_(), codes, scale, b.requires_grad_(), use_fp8=False).sum().backward()


def test_fp8linear_backward_fp8_is_the_layers_own():
    """set_backward_fp8 gives the layer its transposed codes (a non-persistent buffer that follows .to(device) but
    never a dtype cast), the backward then runs the e5m2 GEMM (a different rounding than the bf16 one), and the
    state_dict keys stay those of a plain FP8Linear."""
    torch.manual_seed(0)
    m = FP8Linear.from_linear(nn.Linear(64, 48)).to(torch.bfloat16)
    keys = set(m.state_dict())
    x = activations(32, 64)
    grads = []
    for on in (False, True):
        m.set_backward_fp8(on)
        assert (m.weight_t is not None) == on
        xg = x.clone().requires_grad_()
        with torch.enable_grad():
            fp8._FP8LinearFn.apply(xg, m.weight, m.weight_scale, m.bias, True, m.weight_t).sum().backward()
        grads.append(xg.grad)
    assert torch.equal(m.weight_t.view(torch.uint8), m.weight.t().contiguous().view(torch.uint8))
    m.to(torch.float32)
    assert m.weight_t.dtype == E4M3 and set(m.state_dict()) == keys
    assert not torch.equal(grads[0], grads[1]) and rel(grads[1], grads[0]) < FP8_BWD


def test_fp8linear_module_to_dtype():
    lin = nn.Linear(64, 48)
    m = FP8Linear.from_linear(lin)
    x = torch.randn(5, 64)
    assert rel(m(x), lin(x)) < FP8_FWD  # weight rounding alone: ~2.6%
    codes = m.weight.clone()
    m.to(torch.bfloat16)
    assert m.weight.dtype == E4M3 and torch.equal(m.weight.view(torch.uint8), codes.view(torch.uint8))
    assert m.weight_scale.dtype == torch.float32 and m.bias.dtype == m.compute_dtype == torch.bfloat16
    m.half()
    assert m.weight.dtype == E4M3 and m.compute_dtype == torch.float16 and m.bias.dtype == torch.float16
    assert set(m.state_dict()) == {"bias", "weight", "weight_scale"}
    assert not any(p.requires_grad for p in m.parameters())


class Attn(nn.Module):
    def __init__(self, k=64, n=48, device="cpu", dtype=torch.float32):
        super().__init__()
        self.to_q = FP8Linear.from_linear(nn.Linear(k, n, device=device, dtype=dtype))
        self.to_k = FP8Linear.from_linear(nn.Linear(k, n, device=device, dtype=dtype))

    def forward(self, x):
        return self.to_q(x) * self.to_k(x)


def lora_model(model):
    from peft import LoraConfig, inject_adapter_in_model

    return inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"]), model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_lora_on_fp8linear(dtype):
    from peft.tuners.lora import Linear as LoraLinear

    model = lora_model(Attn(dtype=dtype))
    assert isinstance(model.to_q, LoraLinear) and isinstance(model.to_q.base_layer, FP8Linear)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(lora) == 4 and all(p.dtype in (torch.float32, torch.bfloat16) for p in lora.values())
    for n, p in lora.items():
        if "lora_B" in n:
            p.data.normal_()
    x = torch.randn(3, 64, dtype=dtype)
    with torch.enable_grad():
        model(x).float().pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


# --------------------------------------------------------------------------------------------------- GPU
# fp8 GEMM for the first two; the others have M, N or K off a multiple of 16 (weight-only path)
SHAPES = [(8704, 3072, 3072), (336, 3072, 1008), (77, 3072, 12288), (333, 3072, 1008), (5, 15360, 3072),
          (333, 3072, 1000), (333, 1000, 3072)]


def poison_allocator(*shape, dtype=torch.bfloat16):
    """Leave NaN in the caching allocator's free block of this size, so an output that a kernel fails to write
    shows up as NaN rather than as a stale correct value."""
    torch.full(shape, float("nan"), dtype=dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("mk", [(8704, 3072), (77, 12288), (333, 1000), (1, 15360), (3, 20000)])
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_quantize_rows_gpu(mk, dtype):
    m, k = mk
    x = activations(m, k, device="cuda")
    col_scale = torch.rand(k, device="cuda") + 0.5 if dtype == E5M2 else None
    out = (torch.full((m, k), float("nan"), device="cuda").to(dtype), torch.full((m, 1), float("nan"), device="cuda"))
    q, s = fp8.quantize_rows(x, dtype, col_scale, out=out)
    qr, sr = fp8.quantize_rows_ref(x, dtype, col_scale)
    assert q.float().isfinite().all() and s.isfinite().all()
    assert torch.allclose(s, sr, rtol=1e-6, atol=0)
    q, qr = q.float(), qr.float()
    ulp = 2.0 ** -(3 if dtype == E4M3 else 2)
    assert ((q - qr).abs() <= ulp * qr.abs() + 2**-9).all()  # at most one fp8 ulp apart (division rounding)
    assert (q != qr).float().mean() < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("nk", [(3072, 3072), (12288, 3072), (1000, 333)])
def test_dequantize_gpu(nk):
    n, k = nk
    codes, scale = quantize_fp8(weights(n, k, device="cuda"))
    out = torch.full((n, k), float("nan"), dtype=torch.bfloat16, device="cuda")
    w = fp8.dequantize(codes, scale, torch.bfloat16, out=out)
    assert torch.equal(w, fp8.dequantize_ref(codes, scale, torch.bfloat16))  # fp32 product rounded once, as the ref


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_gpu(shape, bias):
    m, k, n = shape
    x = activations(m, k, device="cuda")
    codes, scale = quantize_fp8(weights(n, k, device="cuda"))
    b = torch.randn(n, device="cuda").bfloat16() * 0.1 if bias else None
    fp8_path = m % 16 == 0 and n % 16 == 0 and k % 16 == 0 and fp8.fp8_supported(x.device)  # as fp8_linear
    poison_allocator(m, n)
    y = fp8_linear(x, codes, scale, b)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16 and not y.isnan().any()
    ref = fp8_linear_ref(x.float(), codes, scale, b)
    if fp8_path:
        assert rel(y, ref) < FP8_FWD, rel(y, ref)
        same_q = quantized_activation_ref(x, codes, scale, b)
        assert rel(y, same_q) < BF16 and row_rel(y, same_q) < 2 * BF16, (rel(y, same_q), row_rel(y, same_q))
    else:
        assert rel(y, ref) < BF16 and row_rel(y, ref) < 2 * BF16


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8704, 3072, 3072), (77, 3072, 12288), (333, 3072, 1008), (333, 3072, 1000)])
@pytest.mark.parametrize("backward_fp8", [False, True])
def test_fp8_linear_input_grad_gpu(shape, backward_fp8):
    m, k, n = shape
    x = activations(m, k, device="cuda").reshape(1, m, k).requires_grad_()
    codes, scale = quantize_fp8(weights(n, k, device="cuda"))
    g = torch.randn(1, m, n, device="cuda").bfloat16()
    x32 = x.detach().float().requires_grad_()
    with torch.enable_grad():
        fp8_linear(x, codes, scale, None, codes.t().contiguous() if backward_fp8 else None).backward(g)
        fp8_linear_ref(x32, codes, scale, None).backward(g.float())
    fp8_path = backward_fp8 and m % 16 == 0 and n % 16 == 0 and fp8.fp8_supported(x.device)
    assert x.grad.shape == x.shape and not x.grad.isnan().any()
    assert rel(x.grad, x32.grad) < (FP8_BWD if fp8_path else BF16), rel(x.grad, x32.grad)
    assert row_rel(x.grad, x32.grad) < 2 * (FP8_BWD if fp8_path else BF16)


@pytest.mark.gpu
def test_lora_on_fp8linear_trains_gpu():
    torch.manual_seed(0)
    model = lora_model(Attn(k=256, n=512, device="cuda", dtype=torch.bfloat16))
    codes = model.to_q.base_layer.weight.clone()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(lora, lr=3e-2)
    x, target = torch.randn(64, 256, device="cuda").bfloat16(), torch.randn(64, 512, device="cuda").bfloat16()
    losses = []
    for _ in range(30):
        with torch.enable_grad():
            loss = F.mse_loss(model(x).float(), target.float())
            loss.backward()
        assert all(p.grad is not None for p in lora)
        assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
        opt.step(), opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert torch.equal(model.to_q.base_layer.weight.view(torch.uint8), codes.view(torch.uint8))
