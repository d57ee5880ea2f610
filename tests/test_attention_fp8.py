"""kontext_kernels/attention_fp8.py: fp8 attention on cuDNN's graph API, its torch twin, and the "cudnn_fp8" choice.

- CPU: the module imports without the `cudnn` package and says which pip package to install; "cudnn_fp8" on the CPU
  is refused by name; the e4m3 quantizer's contract; the whole autograd path (quantize, scales, delayed scaling and
  its re-run on overflow, dequantize) with the cuDNN calls replaced by their torch twins, against PyTorch's math SDPA;
  the fp8 processor is diffusers' FluxAttnProcessor with the attention call swapped, one scale state per module.
- GPU (-m gpu, skipped without CUDA or without the `cudnn` module): cuDNN's fp8 graphs against the torch twin on the
  same e4m3 inputs (the scale and amax conventions), the autograd path against fp32 math at Flux shapes, and a narrow
  Flux LoRA step (eager and compiled) against the bf16 cuDNN path.

Tolerances. e4m3 keeps 3 mantissa bits: one rounding costs ~2.5-4% relative rms error. The forward rounds four times
(q and k in the logits, v, P, O; cuDNN on Hopper writes fp8 O only), which the twin measures at ~6% relative L2 error
for N(0, 1) inputs at D = 128 (q.k ~3.9%, v 2.7%, P 2.5%, O 2.7%, in quadrature), and ~7% for dQ/dK/dV (cosine
0.9975). Hence out rel err < 0.08, gradients rel err < 0.10 and cosine > 0.995 against fp32 math; the cuDNN kernels
against the twin on identical fp8 inputs differ only where P or dS round across an e4m3 step (the forward rounds P
against the running row max, the twin against the final one; summation order): rel < 0.08 for O, < 0.05 for the
gradients (P and dS are recomputed from the same stats there), and the amaxes cuDNN reports agree with the twin's
within 10%.
"""

import importlib.util

import pytest
import torch

import kontext_kernels.attention_fp8 as fp8
import fixtures
from config import TrainConfig
from kontext_kernels.attention import CudnnFp8FluxAttnProcessor, attention_of, attention_ref, set_attention
from test_attention import inputs, narrow_flux_step

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
HAS_CUDNN = importlib.util.find_spec("cudnn") is not None


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def cos(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.skipif(HAS_CUDNN, reason="the cudnn module is installed")
def test_import_without_cudnn_names_the_package():
    with pytest.raises(ImportError, match="pip install nvidia-cudnn-frontend"):
        fp8.import_cudnn()


def test_cudnn_fp8_refused_on_cpu():
    model = fixtures.full_size_transformer("cpu", **fixtures.MINI_DIMS)
    with pytest.raises(ValueError, match="compute capability >= 9.0"):
        set_attention(model, "cudnn_fp8", CPU, torch.bfloat16)
    assert TrainConfig(attention_backend="cudnn_fp8").attention_backend == "cudnn_fp8"


def test_quantize_e4m3():
    x = torch.randn(1, 64, 2, 32, dtype=torch.bfloat16) * 3
    x8, descale = fp8.quantize_e4m3(x.transpose(1, 2).transpose(1, 2))  # any strides in, contiguous out
    assert x8.dtype == fp8.E4M3 and x8.is_contiguous() and descale.shape == (1, 1, 1, 1)
    scale = 1 / float(descale)
    assert scale == 2.0 ** round(torch.log2(torch.tensor(scale)).item())  # a power of two: scaling is exact
    assert 224 < float(x.abs().amax()) * scale <= 448
    assert rel(x8.float() * descale, x) < 0.04  # one e4m3 rounding


def qkv(shape, seed=0, device="cpu"):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(*shape, device=device, generator=g) for _ in range(4)]


def run(fn, tensors, dtype, **kw):
    """(out, dq, dk, dv) of fn on fresh leaves of `dtype`; tensors = q, k, v, grad."""
    *leaves, grad = tensors
    t = [x.detach().to(dtype).requires_grad_() for x in leaves]
    out = fn(*t, **kw)
    out.backward(grad.to(dtype))
    return [out.detach()] + [x.grad for x in t]


def report(name, got, want):
    """rel err and cosine of out, dq, dk, dv, printed (a failing GPU run shows every number)."""
    rows = {n: (rel(a, b), cos(a, b), bool(torch.isfinite(a).all())) for n, a, b in zip(("out", "dq", "dk", "dv"),
                                                                                     got, want)}
    print(name, {n: f"rel {r:.4f} cos {c:.5f} finite {f}" for n, (r, c, f) in rows.items()})
    return rows


def check_accuracy(rows):
    for n, (r, c, finite) in rows.items():
        assert finite, (n, rows)
        assert r < (0.08 if n == "out" else 0.10) and c > 0.995, (n, rows)


@torch.enable_grad()  # conftest runs tests under no_grad
def test_autograd_path_with_torch_twin(monkeypatch):
    """Everything but the two cuDNN calls: their torch twins stand in. The first backward calibrates (a second pass),
    the next reuses its scales (no pass repeated); scales far too large overflow and are re-run, same result."""
    monkeypatch.setattr(fp8, "fp8_forward", fp8.fp8_forward_emulated)
    monkeypatch.setattr(fp8, "fp8_backward", fp8.fp8_backward_emulated)
    tensors = qkv((1, 256, 2, 64))
    want = run(attention_ref, tensors, torch.float32)
    st = fp8.Fp8Scales()
    report("first call", run(fp8.cudnn_fp8_attention, tensors, torch.bfloat16, scales=st), want)
    assert st.calls == 1 and st.reruns >= 1 and all(a > 0 for a in st.amax), vars(st)
    reruns = st.reruns
    check_accuracy(report("second call", run(fp8.cudnn_fp8_attention, tensors, torch.bfloat16, scales=st), want))
    assert st.calls == 2 and st.reruns == reruns, vars(st)  # the same inputs: the delayed scales fit at once
    st.amax = [a / 64 for a in st.amax]  # as after a step whose gradients were 64x smaller: every scale overflows
    check_accuracy(report("after overflow", run(fp8.cudnn_fp8_attention, tensors, torch.bfloat16, scales=st), want))
    assert st.reruns > reruns, vars(st)


@torch.enable_grad()
def test_compiled_caller_breaks_the_graph_at_the_kernel(monkeypatch):
    """Under torch.compile (aot_eager) the quantization is traced and the cuDNN call runs eager behind a graph
    break: the same output and gradients as eager."""
    monkeypatch.setattr(fp8, "fp8_forward", fp8.fp8_forward_emulated)
    monkeypatch.setattr(fp8, "fp8_backward", fp8.fp8_backward_emulated)
    tensors = qkv((1, 128, 2, 64), seed=1)

    def block(q, k, v, scales):  # what a compiled block does around the call: produce q, k, v, use the output
        return fp8.cudnn_fp8_attention(q * 1.5, k, v, scales) * 2

    eager_st, compiled_st = fp8.Fp8Scales(), fp8.Fp8Scales()
    want = run(block, tensors, torch.bfloat16, scales=eager_st)
    torch._dynamo.reset()
    got = run(torch.compile(block, backend="aot_eager"), tensors, torch.bfloat16, scales=compiled_st)
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and compiled_st.amax == eager_st.amax


def test_fits():
    assert fp8._fits([1.0, 0.0], [128.0, 1.0], calibrating=False)  # 128 <= 448; an amax of 0 always fits
    assert not fp8._fits([4.0], [128.0], calibrating=False)  # 512 > 448: overflow
    assert not fp8._fits([0.1], [128.0], calibrating=True) and fp8._fits([0.1], [128.0], calibrating=False)


def test_fp8_processor_is_diffusers_processor(monkeypatch):
    """CudnnFp8FluxAttnProcessor is FluxAttnProcessor with the attention call swapped (the kernel replaced by the
    math reference, the whole transformer equals diffusers' processor exactly); each module holds its own scales."""
    monkeypatch.setattr("kontext_kernels.attention.check_fp8_attention", lambda device, dtype: None)
    calls = []
    monkeypatch.setattr("kontext_kernels.attention.cudnn_fp8_attention",
                        lambda q, k, v, scales: calls.append(scales) or attention_ref(q, k, v))
    torch.manual_seed(0)
    model = fixtures.full_size_transformer("cpu", torch.float32, **dict(fixtures.MINI_DIMS, num_layers=2, num_single_layers=2))
    want = (set_attention(model, "math", CPU, torch.float32), model(**inputs(1))[0])[1]
    assert set_attention(model, "cudnn_fp8", CUDA, torch.bfloat16) == "cudnn_fp8"
    got = model(**inputs(1))[0]
    procs = [m.processor for m in model.modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]
    assert attention_of(model) == {"kontext_cudnn_fp8"} and torch.equal(got, want)
    assert all(isinstance(p, CudnnFp8FluxAttnProcessor) for p in procs) and len({id(p.scales) for p in procs}) == 4
    assert len(calls) == 4 and len({id(s) for s in calls}) == 4


# ---------------------------------------------------------------- GPU

def gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDNN, reason=f"needs the cudnn module (pip install {fp8.PIP})")(
        test))


def hopper():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("cuDNN's fp8 attention needs sm >= 9.0")
    import cudnn

    print(f"cuDNN {cudnn.backend_version_string()}, frontend {getattr(cudnn, '__version__', '?')}, "
          f"{torch.cuda.get_device_name()}")


@gpu
@pytest.mark.parametrize("s", [1024, 4608])
def test_kernels_match_torch_twin_gpu(s):
    """cuDNN's forward and backward graphs against their torch twins on the same e4m3 inputs and scales: the
    descale / scale / amax conventions (amax_dP = the softmax gradient's, before scale_dP) and the layouts."""
    hopper()
    b, h, d = 1, 24, 128
    q, k, v, g = qkv((b, s, h, d), device="cuda")
    (q8, dq), (k8, dk), (v8, dv) = fp8.quantize_e4m3(q), fp8.quantize_e4m3(k), fp8.quantize_e4m3(v)
    descale_o = dv * fp8.O_HEADROOM
    o8, stats = fp8.fp8_forward(q8, k8, v8, dq, dk, dv, descale_o, d ** -0.5)
    o8_t, stats_t = fp8.fp8_forward_emulated(q8, k8, v8, dq, dk, dv, descale_o, d ** -0.5)
    fwd = dict(o=rel(o8.float(), o8_t.float()), stats=rel(stats, stats_t), o_max_code=float(o8.float().abs().amax()),
               o_max_code_twin=float(o8_t.float().abs().amax()))
    print("forward vs twin", fwd)
    assert torch.isfinite(o8.float()).all() and torch.isfinite(stats).all(), fwd  # e4m3 overflows to NaN
    assert fwd["o"] < 0.08 and fwd["stats"] < 1e-3, fwd
    do8, ddo = fp8.quantize_e4m3(g)
    descales = (dq, dk, dv, descale_o, ddo)
    _, _, _, amax_t = fp8.fp8_backward_emulated(q8, k8, v8, o8, do8, stats, descales, [1.0] * 4, d ** -0.5)
    scales = [fp8.host_pow2_scale(a, fp8.E4M3_MAX / fp8.GRAD_MARGIN) for a in amax_t.tolist()]
    got = fp8.fp8_backward(q8, k8, v8, o8, do8, stats, descales, scales, d ** -0.5)
    want = fp8.fp8_backward_emulated(q8, k8, v8, o8, do8, stats, descales, scales, d ** -0.5)
    bwd = {n: rel(a.float() / sc, w.float() / sc) for n, a, w, sc in zip(("dq", "dk", "dv"), got, want, scales[1:])}
    amax = dict(zip(fp8.Fp8Scales.NAMES, zip(got[3].tolist(), want[3].tolist())))
    print("backward vs twin", bwd, "amax (cuDNN, twin)", amax, "scales", scales)
    assert all(torch.isfinite(x.float()).all() for x in got), bwd
    assert all(r < 0.05 for r in bwd.values()), bwd
    assert all(abs(a - t) <= 0.1 * t for a, t in amax.values()), amax


@gpu
@torch.enable_grad()
@pytest.mark.parametrize("s", [1024, 4608])
def test_fp8_attention_matches_math_gpu(s):
    hopper()
    tensors = qkv((1, s, 24, 128), device="cuda")
    want = run(attention_ref, tensors, torch.float32)
    st = fp8.Fp8Scales()
    report("first call (calibrating)", run(fp8.cudnn_fp8_attention, tensors, torch.bfloat16, scales=st), want)
    reruns = st.reruns
    rows = report("second call (delayed scales)", run(fp8.cudnn_fp8_attention, tensors, torch.bfloat16, scales=st),
                  want)
    print("scales state", vars(st))
    check_accuracy(rows)
    assert st.reruns == reruns, vars(st)  # the same inputs again: the delayed scales fit at once


@gpu
@torch.enable_grad()
@pytest.mark.parametrize("compile_", [False, True])
def test_flux_train_step_fp8_equals_cudnn_gpu(compile_):
    """test_attention.narrow_flux_step with head_dim 128 (cuDNN's Hopper fp8 backward takes d = 128 only), eager and
    regionally compiled (the fp8 call is a graph break), step 1 first (the fp8 scales then come from another batch, as
    in training): loss and LoRA grads vs the bf16 cuDNN path."""
    hopper()
    results = [narrow_flux_step(backend, 128, compile_, steps=(1, 0)) for backend in ("cudnn", "cudnn_fp8")]
    assert [r[2] for r in results] == [{"kontext_cudnn"}, {"kontext_cudnn_fp8"}]
    (l1, g1, _), (l2, g2, _) = results
    print(f"compile={compile_}: loss rel {rel(l2, l1):.4f}, LoRA grads rel {rel(g2, g1):.4f} cos {cos(g2, g1):.5f}")
    assert torch.isfinite(g2).all() and rel(l2, l1) < 0.02 and cos(g2, g1) > 0.99, (rel(l2, l1), cos(g2, g1))
