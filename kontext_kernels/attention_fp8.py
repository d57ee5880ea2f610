"""fp8 attention with a backward on Hopper: cuDNN's graph API (nvidia-cudnn-frontend's `sdpa_fp8` /
`sdpa_fp8_backward`, cuDNN >= 9.14), and its pure-torch twin (`fp8_forward_emulated` / `fp8_backward_emulated`).

Every tensor is diffusers' layout, contiguous [B, S, H, D], declared to cuDNN as dims (B, H, S, D) with BSHD strides
(the layout cuDNN's own fp8 test harness, test/python/sdpa/fp8.py, runs); stats (natural-log LSE) [B, H, S, 1] fp32.

What is fp8 and with which scale (per tensor, e4m3 everywhere; every scale a power of two, so scaling is exact):
- q, k, v: current scaling, `quantize_e4m3` (amax of this call; torch ops, which inductor fuses into the q/k norm and
  RoPE kernels when the block is compiled; eager they are 3 passes over each of q, k, v).
- P = exp(S - max) in [0, 1]: scale S_SCALE = 256 (P = 1 -> 256 < 448).
- O: e4m3 as well. cuDNN on Hopper writes fp8 O and fp8 dQ/dK/dV only ("sdpa fp8 forward/backward with
  HALF/BFLOAT16 output is only supported on Blackwell", include/cudnn_frontend/node/sdpa_support_surface.h and
  sdpa_fp8_bwd.h). O's scale needs no amax: each row of O is a convex combination of V's rows (P quantized adds at
  most ~10%), so |O| <= 1.1 * amax(V), and scale_o = scale_v / O_HEADROOM maps it below 448 at once.
- dO: current scaling in the backward. The softmax gradient dS = P * (dO V^T - D) * attn_scale (cuDNN calls it dP)
  and dQ/dK/dV: delayed scaling, as Transformer Engine on Hopper: the amaxes cuDNN reports in one backward give the
  next backward's scales, with GRAD_MARGIN headroom (`Fp8Scales`, one per attention module). Each backward reads the
  four amaxes back (one host sync per call) and runs again with the new scales if a value overflowed or used too
  little of e4m3's range (`_fits`); a module's first backward calibrates (usually 2 passes).

The forward returns O dequantized to the input dtype (bf16), the backward dQ/dK/dV likewise: the model around it does
not change. Saved for the backward: q8, k8, v8, o8 (1 byte each) and the stats.
"""

import math

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
S_SCALE = 256.0  # P in [0, 1] -> P * 256 in e4m3 (power of two; P = 1 -> 256, under 448)
O_HEADROOM = 2.0  # scale_o = scale_v / 2: |O| <= ~1.1 amax(V) (convex rows) lands at <= ~246
GRAD_MARGIN = 2.0  # delayed scales map the last amax to 448 / 2..4: a 2x growth between steps still fits
MAX_PASSES = 4  # backward passes before giving up on finding scales that do not overflow
CUDNN_MIN = 91400  # cuDNN backend version (cudnn.backend_version()) the fp8 graphs are used from (the floor)
PIP = "nvidia-cudnn-frontend"


def import_cudnn():
    """cuDNN's Python frontend, imported only on the fp8 path."""
    try:
        import cudnn
    except ImportError as e:
        raise ImportError(f"attention_backend 'cudnn_fp8' needs cuDNN's Python frontend (the `cudnn` module): "
                          f"pip install {PIP} ({e})") from e
    return cudnn


def check_fp8_attention(device: torch.device, dtype: torch.dtype):
    """Raise (ValueError, ImportError) unless `device` runs cuDNN's fp8 attention: a CUDA GPU of compute capability
    >= 9.0 (Hopper), bf16/fp16 attention, the frontend installed and a cuDNN backend >= 9.14."""
    if not (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability(device) >= (9, 0)):
        raise ValueError(f"attention_backend 'cudnn_fp8' needs a CUDA GPU of compute capability >= 9.0 (Hopper: "
                         f"cuDNN's fp8 attention) and bf16/fp16 attention; got {device} with {dtype}")
    cudnn = import_cudnn()
    if cudnn.backend_version() < CUDNN_MIN:
        raise ValueError(f"attention_backend 'cudnn_fp8' needs cuDNN >= 9.14 (sdpa_fp8 with a backward); this process "
                         f"loads cuDNN {cudnn.backend_version_string()}")


def pow2_scale(amax: torch.Tensor, target: float = E4M3_MAX) -> torch.Tensor:
    """The power of two s with amax * s in (target / 2, target] (fp32 tensor; amax 0 gives a large finite s)."""
    return torch.exp2(torch.floor(torch.log2(target / amax.float().clamp(min=2.0 ** -100))))


def quantize_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (x8 e4m3 contiguous, descale (1, 1, 1, 1) fp32) with x ~= x8 * descale: per-tensor current scaling, the
    amax at (224, 448]. A power-of-two scale makes x * scale exact in bf16, so the one rounding is the fp8 cast."""
    x = x.detach()
    scale = pow2_scale(x.abs().amax())
    return (x * scale).to(E4M3).contiguous(), scale.reciprocal().reshape(1, 1, 1, 1)


def host_pow2_scale(amax: float, target: float) -> float:
    """pow2_scale for a host float."""
    return 2.0 ** math.floor(math.log2(target / max(amax, 2.0 ** -100)))


class Fp8Scales:
    """Delayed scaling of one attention module's backward: the amaxes (dP, dQ, dK, dV) of its last backward (host
    floats; None before the first), and how many backward passes were repeated because a scale did not fit."""

    NAMES = ("dP", "dQ", "dK", "dV")

    def __init__(self):
        self.amax: list[float] | None = None
        self.calls = self.reruns = 0


# ---------------------------------------------------------------- cuDNN graphs

_GRAPHS: dict = {}  # ("forward" | "backward", shape, device index, attn_scale) -> (graph, its tensors by name, workspace bytes)
_HANDLES: dict = {}  # device index -> cudnn.Handle
_CONSTANTS: dict = {}  # device index -> (scale_s, descale_s) (1, 1, 1, 1) fp32 tensors


def _handle(cudnn, device: torch.device):
    """A cuDNN handle per device, set to torch's current stream on every call (cudnn.set_stream skips the backend
    call when the stream is unchanged), so cuDNN's kernels order with torch's."""
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _HANDLES:
        with torch.cuda.device(i):
            _HANDLES[i] = cudnn.create_handle()
    cudnn.set_stream(_HANDLES[i], torch.cuda.current_stream(i).cuda_stream)
    return _HANDLES[i]


def _constants(device: torch.device):
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _CONSTANTS:
        _CONSTANTS[i] = tuple(torch.full((1, 1, 1, 1), v, dtype=torch.float32, device=device)
                              for v in (S_SCALE, 1.0 / S_SCALE))
    return _CONSTANTS[i]


def _bshd(shape) -> tuple[list[int], list[int]]:
    """cuDNN's (B, H, S, D) dims and strides of a contiguous [B, S, H, D] tensor."""
    b, s, h, d = shape
    return [b, h, s, d], [s * h * d, d, h * d, 1]


def _build(cudnn, g, what: str, shape, device):
    """validate -> build_operation_graph -> plans (heuristics A, fallback) -> check_support -> build_plans; a failure
    names the shape, the cuDNN version and the GPU."""
    try:
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
    except Exception as e:
        raise RuntimeError(f"kontext_kernels.attention_fp8: cuDNN's fp8 attention {what} graph for [B, S, H, D] = "
                           f"{list(shape)} did not build on cuDNN {cudnn.backend_version_string()}, "
                           f"{torch.cuda.get_device_name(device)} (sm {torch.cuda.get_device_capability(device)}): "
                           f"{type(e).__name__}: {e}") from e
    return g


def _scalar(g, name: str, cudnn):
    return g.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.FLOAT)


def _out(x, dim, stride, data_type):
    """Mark a graph tensor as an output of this dim, stride and type."""
    x.set_output(True).set_dim(dim).set_stride(stride).set_data_type(data_type)
    return x


def _graph(what: str, cudnn, handle, shape, device, attn_scale: float, ins: tuple, add_op):
    """The fp8 attention graph `what` ("forward" | "backward") for this shape, device and attn_scale, built once: an
    e4m3-in, fp32-compute pygraph with e4m3 [B, S, H, D] tensors `ins`, then add_op(g, t, dims, strides, f8, f32)
    adds the op's other inputs and cuDNN's op to t (the tensors by name) and marks its outputs.
    Returns (graph, tensors by name, workspace bytes)."""
    key = (what, tuple(shape), device.index, attn_scale)
    if key not in _GRAPHS:
        f8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        dims, strides = _bshd(shape)
        g = cudnn.pygraph(io_data_type=f8, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
        t = {n: g.tensor(name=n, dim=dims, stride=strides, data_type=f8) for n in ins}
        add_op(g, t, dims, strides, f8, f32)
        _build(cudnn, g, what, shape, device)
        _GRAPHS[key] = (g, t, g.get_workspace_size())
    return _GRAPHS[key]


FWD_SCALARS = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")


def _forward_graph(cudnn, handle, shape, device, attn_scale: float):
    def add_op(g, t, dims, strides, f8, f32):
        t.update({n: _scalar(g, n, cudnn) for n in FWD_SCALARS})
        # Amax_S is left unrequested, as in cuDNN's harness (nothing consumes it); Amax_O is an output there, so here
        o, stats, _, amax_o = g.sdpa_fp8(**{n: t[n] for n in ("q", "k", "v", *FWD_SCALARS)}, generate_stats=True,
                                         attn_scale=attn_scale, use_causal_mask=False)
        b, h, s, _ = dims
        t.update(o=_out(o, dims, strides, f8), stats=_out(stats, [b, h, s, 1], [h * s, s, 1, 1], f32),
                 amax_o=_out(amax_o, [1, 1, 1, 1], [1, 1, 1, 1], f32))
    return _graph("forward", cudnn, handle, shape, device, attn_scale, ("q", "k", "v"), add_op)


BWD_SCALARS = ("descale_q", "descale_k", "descale_v", "descale_o", "descale_dO", "descale_s", "descale_dP",
               "scale_s", "scale_dQ", "scale_dK", "scale_dV", "scale_dP")


def _backward_graph(cudnn, handle, shape, device, attn_scale: float):
    def add_op(g, t, dims, strides, f8, f32):
        b, h, s, _ = dims
        t["stats"] = g.tensor(name="stats", dim=[b, h, s, 1], stride=[h * s, s, 1, 1], data_type=f32)
        t.update({n: _scalar(g, n, cudnn) for n in BWD_SCALARS})
        outs = g.sdpa_fp8_backward(**{n: t[n] for n in ("q", "k", "v", "o", "dO", "stats", *BWD_SCALARS)},
                                   attn_scale=attn_scale, use_padding_mask=False,
                                   diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT,
                                   use_deterministic_algorithm=False)
        t.update({n: _out(x, dims, strides, f8) for n, x in zip(("dQ", "dK", "dV"), outs[:3])})
        t.update({n: _out(x, [1, 1, 1, 1], [1, 1, 1, 1], f32)
                  for n, x in zip(("amax_dQ", "amax_dK", "amax_dV", "amax_dP"), outs[3:])})
    return _graph("backward", cudnn, handle, shape, device, attn_scale, ("q", "k", "v", "o", "dO"), add_op)


def _execute(g, pack: dict, workspace_bytes: int, handle, device):
    """Run on torch's current stream (the handle's); the buffers are torch's, freed in stream order after the call."""
    g.execute(pack, torch.empty(max(workspace_bytes, 1), dtype=torch.uint8, device=device), handle=handle)


def fp8_forward(q8, k8, v8, descale_q, descale_k, descale_v, descale_o, attn_scale: float):
    """cuDNN's fp8 forward. q8, k8, v8: [B, S, H, D] e4m3 contiguous; descale_*: (1, 1, 1, 1) fp32 (x = x8 *
    descale_x; O is written as o8 = O / descale_o). Returns (o8 [B, S, H, D] e4m3, stats [B, H, S, 1] fp32)."""
    cudnn, device = import_cudnn(), q8.device
    with torch.cuda.device(device):  # graphs are built and run for the tensors' GPU, whatever the current one
        return _fp8_forward(cudnn, device, q8, k8, v8, descale_q, descale_k, descale_v, descale_o, attn_scale)


def _fp8_forward(cudnn, device, q8, k8, v8, descale_q, descale_k, descale_v, descale_o, attn_scale):
    handle = _handle(cudnn, device)
    g, t, ws = _forward_graph(cudnn, handle, q8.shape, device, attn_scale)
    scale_s, descale_s = _constants(device)
    b, s, h, _ = q8.shape
    o8, stats = torch.empty_like(q8), torch.empty(b, h, s, 1, dtype=torch.float32, device=device)
    data = dict(q=q8, k=k8, v=v8, descale_q=descale_q, descale_k=descale_k, descale_v=descale_v, descale_s=descale_s,
                scale_s=scale_s, scale_o=descale_o.reciprocal(), o=o8, stats=stats,
                amax_o=torch.empty(1, 1, 1, 1, dtype=torch.float32, device=device))
    _execute(g, {t[n]: x for n, x in data.items()}, ws, handle, device)
    return o8, stats


def fp8_backward(q8, k8, v8, o8, do8, stats, descales: tuple, scales: tuple, attn_scale: float):
    """cuDNN's fp8 backward. descales: (q, k, v, o, dO) (1, 1, 1, 1) fp32 tensors; scales: host floats (dP, dQ, dK,
    dV); "dP" is cuDNN's name for the softmax gradient dS = P * (dO V^T - D) * attn_scale, scaled before its fp8
    cast. Returns (dq8, dk8, dv8 e4m3 [B, S, H, D], amax fp32 [4] = (dP, dQ, dK, dV) before scaling)."""
    cudnn, device = import_cudnn(), q8.device
    with torch.cuda.device(device):
        return _fp8_backward(cudnn, device, q8, k8, v8, o8, do8, stats, descales, scales, attn_scale)


def _fp8_backward(cudnn, device, q8, k8, v8, o8, do8, stats, descales, scales, attn_scale):
    handle = _handle(cudnn, device)
    g, t, ws = _backward_graph(cudnn, handle, q8.shape, device, attn_scale)
    scale_s, descale_s = _constants(device)
    full = lambda v: torch.full((1, 1, 1, 1), v, dtype=torch.float32, device=device)  # noqa: E731
    s_dp, s_dq, s_dk, s_dv = scales
    amax = {n: full(float("nan")) for n in ("amax_dP", "amax_dQ", "amax_dK", "amax_dV")}
    dq8, dk8, dv8 = torch.empty_like(q8), torch.empty_like(k8), torch.empty_like(v8)
    data = dict(q=q8, k=k8, v=v8, o=o8, dO=do8, stats=stats, **dict(zip(("descale_q", "descale_k", "descale_v",
                                                                         "descale_o", "descale_dO"), descales)),
                descale_s=descale_s, scale_s=scale_s, descale_dP=full(1.0 / s_dp), scale_dP=full(s_dp),
                scale_dQ=full(s_dq), scale_dK=full(s_dk), scale_dV=full(s_dv), dQ=dq8, dK=dk8, dV=dv8, **amax)
    _execute(g, {t[n]: x for n, x in data.items()}, ws, handle, device)
    return dq8, dk8, dv8, torch.cat([amax[n].view(1) for n in ("amax_dP", "amax_dQ", "amax_dK", "amax_dV")])


# ---------------------------------------------------------------- the pure-torch twin (same signatures)


def _bhsd(x8, descale):
    return (x8.float() * descale.float()).transpose(1, 2)


def _q8(x, scale):
    """x rounded as cuDNN stores it: x * scale cast to e4m3, back in unscaled fp32."""
    return (x * scale).to(E4M3).float() / scale


def fp8_forward_emulated(q8, k8, v8, descale_q, descale_k, descale_v, descale_o, attn_scale: float):
    """fp8_forward in torch (the recipe of cuDNN's reference, test/python/sdpa/fp8_ref.py compute_ref, with one
    softmax block: P quantized relative to the row's final max). For CPU tests and the accuracy budget."""
    q, k, v = _bhsd(q8, descale_q), _bhsd(k8, descale_k), _bhsd(v8, descale_v)
    s = q @ k.transpose(-1, -2) * attn_scale
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    o = (_q8(p, S_SCALE) @ v) / l
    o8 = (o / descale_o.float()).to(E4M3).transpose(1, 2).contiguous()
    return o8, (m + torch.log(l)).float()


def fp8_backward_emulated(q8, k8, v8, o8, do8, stats, descales: tuple, scales: tuple, attn_scale: float):
    """fp8_backward in torch (fp8_ref.compute_ref_backward's recipe). amax_dP is the amax of the softmax gradient
    dS = P * (dO V^T - D) * attn_scale before scale_dP, as in cuDNN's graph (include/cudnn_frontend/node/
    sdpa_fp8_bwd.h: the AMAX reduction "amax_dP" sits after "mul_dS_attn_scale", before "scale_dP")."""
    dq_, dk_, dv_, do_, ddo = descales
    q, k, v, o, do = _bhsd(q8, dq_), _bhsd(k8, dk_), _bhsd(v8, dv_), _bhsd(o8, do_), _bhsd(do8, ddo)
    s_dp, s_dq, s_dk, s_dv = scales
    p = torch.exp(q @ k.transpose(-1, -2) * attn_scale - stats)
    dv = _q8(p, S_SCALE).transpose(-1, -2) @ do
    dp = do @ v.transpose(-1, -2)
    ds = p * (dp - (do * o).sum(-1, keepdim=True)) * attn_scale
    amax_ds = ds.abs().amax()
    ds = _q8(ds, s_dp)
    dq, dk = ds @ k, ds.transpose(-1, -2) @ q
    amax = torch.stack([amax_ds, dq.abs().amax(), dk.abs().amax(), dv.abs().amax()])
    out = [(x * sc).to(E4M3).transpose(1, 2).contiguous() for x, sc in ((dq, s_dq), (dk, s_dk), (dv, s_dv))]
    return (*out, amax)


# ---------------------------------------------------------------- autograd


def initial_amax(grad_out: torch.Tensor, v8: torch.Tensor, descale_v: torch.Tensor, attn_scale: float) -> list[float]:
    """A module's first backward has no amax yet: dS's from an upper bound, so the first pass cannot overflow it
    (|dS_ij| = P_ij |dO_i . V_j - D_i| attn_scale <= 2 attn_scale max |dO_i| max |V_j|: P <= 1, |D_i| <= max_j
    |dO_i . V_j|, Cauchy-Schwarz), dQ/dK/dV 1.0 (the first pass measures them)."""
    bound = grad_out.float().norm(dim=-1).amax() * (v8.float().norm(dim=-1).amax() * descale_v.float().view(()))
    return [float(2 * attn_scale * bound), 1.0, 1.0, 1.0]


def _fits(amax: list[float], scales: list[float], calibrating: bool) -> bool:
    """Scales fit when no value overflowed e4m3 (amax * scale <= 448) and none wastes too much of its range: three
    binades while calibrating (amax * scale >= 28; the delayed target is (112, 224]), eight later (a gradient that
    shrank 64x since the last step, its small values falling into e4m3's subnormals); an amax of 0 always fits."""
    floor = E4M3_MAX / (16 if calibrating else 512)
    return all(a == 0 or floor <= a * s <= E4M3_MAX for a, s in zip(amax, scales))  # 0: nothing to represent


class CudnnFp8Attention(torch.autograd.Function):
    """Attention over [B, S, H, D] tensors (no mask, no dropout) on cuDNN's fp8 graphs. q, k, v (bf16/fp16) are only
    the gradients' slots; the kernels read their e4m3 copies q8, k8, v8 (quantize_e4m3). Returns O in q's dtype."""

    @staticmethod
    def forward(ctx, q, k, v, q8, k8, v8, descale_q, descale_k, descale_v, scales: Fp8Scales, attn_scale: float):
        descale_o = descale_v * O_HEADROOM
        o8, stats = fp8_forward(q8, k8, v8, descale_q, descale_k, descale_v, descale_o, attn_scale)
        ctx.save_for_backward(q8, k8, v8, o8, stats, descale_q, descale_k, descale_v, descale_o)
        ctx.scales, ctx.attn_scale, ctx.dtype = scales, attn_scale, q.dtype
        return o8.to(q.dtype) * descale_o.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q8, k8, v8, o8, stats, descale_q, descale_k, descale_v, descale_o = ctx.saved_tensors
        do8, descale_do = quantize_e4m3(grad_out)
        st = ctx.scales
        calibrating = st.amax is None
        used = initial_amax(grad_out, v8, descale_v, ctx.attn_scale) if calibrating else st.amax
        tried = []
        for _ in range(MAX_PASSES):
            scales = [host_pow2_scale(a, E4M3_MAX / GRAD_MARGIN) for a in used]
            dq8, dk8, dv8, amax = fp8_backward(q8, k8, v8, o8, do8, stats,
                                               (descale_q, descale_k, descale_v, descale_o, descale_do), scales,
                                               ctx.attn_scale)
            new = amax.tolist()  # the one host sync: whether the scales fit decides a second pass
            tried.append((scales, new))
            # dS overflowing e4m3 spoils what is computed from it (dQ, dK and their amaxes: NaN or saturated), not
            # dV or dS's own amax; any other non-finite amax means non-finite inputs
            ds_over = math.isfinite(new[0]) and new[0] * scales[0] > E4M3_MAX
            if not all(math.isfinite(a) for a in (new if not ds_over else new[:1] + new[3:])):
                raise RuntimeError(f"kontext_kernels.attention_fp8: cuDNN's fp8 attention backward reported amax "
                                   f"{dict(zip(Fp8Scales.NAMES, new))} (not finite) with scales "
                                   f"{dict(zip(Fp8Scales.NAMES, scales))}; dO descale {float(descale_do)}")
            if not ds_over and _fits(new, scales, calibrating):
                break
            st.reruns += 1
            used = [n if math.isfinite(n) else u for n, u in zip(new, used)]
        else:
            raise RuntimeError(f"kontext_kernels.attention_fp8: no fp8 scales fit dP/dQ/dK/dV in {MAX_PASSES} backward "
                               f"passes (scales, amax per pass: {tried})")
        st.amax, st.calls = new, st.calls + 1
        _, s_dq, s_dk, s_dv = scales
        return (dq8.to(ctx.dtype) * (1.0 / s_dq), dk8.to(ctx.dtype) * (1.0 / s_dk), dv8.to(ctx.dtype) * (1.0 / s_dv),
                None, None, None, None, None, None, None, None)


@torch.compiler.disable  # cuDNN's frontend graphs are host calls dynamo cannot trace: one graph break per call
def _attention(q, k, v, q8, k8, v8, descale_q, descale_k, descale_v, scales, attn_scale):
    return CudnnFp8Attention.apply(q, k, v, q8, k8, v8, descale_q, descale_k, descale_v, scales, attn_scale)


def cudnn_fp8_attention(q, k, v, scales: Fp8Scales, scale: float | None = None):
    """q, k, v: [B, S, H, D] (diffusers' layout) -> [B, S, H, D], fp8 inside. The quantization runs outside the
    graph break, so a compiled block fuses it with what produced q, k, v."""
    (q8, dq), (k8, dk), (v8, dv) = quantize_e4m3(q), quantize_e4m3(k), quantize_e4m3(v)
    return _attention(q, k, v, q8, k8, v8, dq, dk, dv, scales, scale if scale is not None else q.shape[-1] ** -0.5)
