"""FP8 linear for a frozen base weight: e4m3 codes [out, in] times an fp32 per-row scale [out].

    y = x @ (codes * scale[:, None]).T + bias        # the contract; fp8_linear_ref computes exactly this

CUDA, capability >= 8.9, bf16 activations, in/out features multiples of 16 (every Flux Linear): the activation
is quantized to e4m3 per row (per token) by one Triton kernel (absmax, scale, cast in one launch) and multiplied
on fp8 tensor cores by `torch._scaled_mm` with row-wise scales (DESIGN §4: 1.65-1.8x bf16; eager activation
quantization would cost as much as the GEMM). Other CUDA cases dequantize the weight with a Triton kernel and
run a bf16 GEMM (weight-only); CPU runs fp8_linear_ref. Backward gives the input gradient only (the base is
frozen): dX = dY @ W with W dequantized to bf16 by Triton, or, when the layer holds a transposed copy of its codes
(FP8Linear.set_backward_fp8(True); TrainConfig.fp8_backward), an e5m2 x e4m3 `_scaled_mm`.

Quantization error to expect (Gaussian data): e4m3 keeps 3 mantissa bits, ~2.6% relative RMS per element, so
activation quantization moves a GEMM's output by ~2.6% against the weight-only reference; e5m2 (2 bits) ~5.5%.
"""

import torch
import torch.nn.functional as F
import triton  # unguarded: the fp8 kernels are defined at import (requirements.txt installs triton on Linux)
import triton.language as tl
from torch import nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
_AMAX_EPS = 1e-12  # an all-zero row gets scale 1e-12/448 and codes 0 instead of 0/0 (the kernel's literal 1e-12)
_ONE_TILE_MAX_K = 16384  # rows up to this length are read once, held in registers (Flux: K <= 15360)


# ------------------------------------------------------------------------------------------- Triton kernels
@triton.jit
def _load_row(x_row, col_scale_ptr, cols, K, HAS_COL_SCALE: tl.constexpr):
    mask = cols < K
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_COL_SCALE:
        x = x * tl.load(col_scale_ptr + cols, mask=mask, other=0.0)
    return x, mask


@triton.jit
def _quantize_rows_kernel(x_ptr, col_scale_ptr, q_ptr, scale_ptr, K, stride_x, stride_q,
                          QMAX: tl.constexpr, HAS_COL_SCALE: tl.constexpr, BLOCK_K: tl.constexpr,
                          ONE_TILE: tl.constexpr):
    """One program per row: scale = max|x * col_scale| / QMAX, q = clamp(x * col_scale / scale) cast to q's dtype."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    q_row = q_ptr + row * stride_q
    cols = tl.arange(0, BLOCK_K)
    if ONE_TILE:  # the whole row in registers: one read of x
        x, mask = _load_row(x_row, col_scale_ptr, cols, K, HAS_COL_SCALE)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / QMAX
        q = tl.clamp(x / scale, -QMAX, QMAX)
        tl.store(q_row + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    else:  # long rows: absmax pass, then cast pass (the re-read of one row hits L2)
        amax = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            x, mask = _load_row(x_row + k, col_scale_ptr + k, cols, K - k, HAS_COL_SCALE)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / QMAX
        for k in range(0, K, BLOCK_K):
            x, mask = _load_row(x_row + k, col_scale_ptr + k, cols, K - k, HAS_COL_SCALE)
            q = tl.clamp(x / scale, -QMAX, QMAX)
            tl.store(q_row + k + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _dequantize_kernel(codes_ptr, scale_ptr, out_ptr, N, K, stride_c, stride_o,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n, k] = codes[n, k] * scale[n], computed in fp32 and rounded once to out's dtype (as the reference)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    r64 = rows[:, None].to(tl.int64)
    codes = tl.load(codes_ptr + r64 * stride_c + cols[None, :], mask=mask, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=rows < N, other=0.0)
    w = codes.to(tl.float32) * scale[:, None]
    tl.store(out_ptr + r64 * stride_o + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------- launchers and their pure-torch twins
def quantize_rows(x: torch.Tensor, fp8_dtype: torch.dtype = E4M3, col_scale: torch.Tensor | None = None,
                  out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: x [M, K] (unit column stride) -> (q [M, K], scale [M, 1] fp32) with x * col_scale ~= q * scale.

    q is `fp8_dtype` unless `out` gives (q, scale) buffers; a float32 q holds the scaled values before the fp8
    cast, which is what the CPU interpreter test checks (TRITON_INTERPRET handles fp32, not fp8; DESIGN §4)."""
    M, K = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    q, scale = out if out is not None else (torch.empty(M, K, dtype=fp8_dtype, device=x.device),
                                            torch.empty(M, 1, dtype=torch.float32, device=x.device))
    if M == 0:
        return q, scale
    block = triton.next_power_of_2(min(K, _ONE_TILE_MAX_K))
    _quantize_rows_kernel[(M,)](
        x, col_scale if col_scale is not None else x, q, scale, K, x.stride(0), q.stride(0),
        QMAX=torch.finfo(fp8_dtype).max, HAS_COL_SCALE=col_scale is not None, BLOCK_K=block,
        ONE_TILE=K <= block, num_warps=max(1, min(16, block // 512)))
    return q, scale


def quantize_rows_ref(x: torch.Tensor, fp8_dtype: torch.dtype = E4M3, col_scale: torch.Tensor | None = None,
                      out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    qmax = torch.finfo(fp8_dtype).max
    x = x.float() if col_scale is None else x.float() * col_scale.float()
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=_AMAX_EPS) / qmax
    q = (x / scale).clamp(-qmax, qmax)
    if out is None:
        return q.to(fp8_dtype), scale
    out[0].copy_(q), out[1].copy_(scale)
    return out


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton: codes [N, K] (unit column stride) * scale [N] fp32 -> [N, K] in `dtype` (or into `out`)."""
    N, K = codes.shape
    out = torch.empty(N, K, dtype=dtype, device=codes.device) if out is None else out
    grid = (triton.cdiv(N, 32), triton.cdiv(K, 128))
    _dequantize_kernel[grid](codes, scale, out, N, K, codes.stride(0), out.stride(0), BLOCK_N=32, BLOCK_K=128,
                             num_warps=4)
    return out


def dequantize_ref(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    w = (codes.float() * scale.float().reshape(-1, 1)).to(dtype)
    return w if out is None else out.copy_(w)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 codes [out, in] and fp32 scale [out] = max|row| / 448 (Triton on CUDA)."""
    codes, scale = (quantize_rows if w.is_cuda else quantize_rows_ref)(w.detach().reshape(w.shape[0], -1))
    return codes, scale.reshape(-1)


# ------------------------------------------------------------------------------------------ the linear
def fp8_linear_ref(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only: dequantize to x's dtype, then F.linear. w_scale is [out] or a single per-tensor value."""
    w = (w_codes.float() * w_scale.float().reshape(-1, 1)).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
               w_codes_t: torch.Tensor | None = None, weight_only: bool = False) -> torch.Tensor:
    """Same result as fp8_linear_ref (up to activation rounding on the fp8 path); see the module docstring.
    w_codes_t (w_codes.T, contiguous) selects the fp8 input-gradient GEMM in backward; weight_only keeps the
    activations in their dtype (dequantized weight, then F.linear: fp8 storage only)."""
    if not x.is_cuda:
        return fp8_linear_ref(x, w_codes, w_scale, bias)
    N, K = w_codes.shape
    M = x.numel() // K
    # _scaled_mm wants in/out features in multiples of 16; on the H100 (torch 2.11) cuBLASLt also refused the
    # row-wise + bias case for M = 5 (CUBLAS_STATUS_NOT_SUPPORTED), so token counts off 16 take the weight-only path.
    use_fp8 = (not weight_only and x.dtype == torch.bfloat16 and w_codes.dtype == E4M3 and N % 16 == 0
               and K % 16 == 0 and M % 16 == 0 and fp8_supported(x.device))
    return _FP8LinearFn.apply(x.reshape(M, K), w_codes, w_scale, bias, use_fp8, w_codes_t).reshape(*x.shape[:-1], N)


def _per_row(w_scale: torch.Tensor, n: int) -> torch.Tensor:
    s = w_scale.float().reshape(-1)
    return s.expand(n).contiguous() if s.numel() == 1 else s


def _fp8_mm(a_q, a_scale, b_codes, b_scale, bias, use_fast_accum):
    """a_q [M, K] fp8 row-major, b_codes [N, K] fp8 row-major (passed as the column-major [K, N] _scaled_mm wants),
    a_scale [M, 1], b_scale [N] fp32 -> a_q * a_scale @ (b_codes * b_scale).T + bias in bf16."""
    return torch._scaled_mm(a_q, b_codes.t(), scale_a=a_scale, scale_b=b_scale.reshape(1, -1), bias=bias,
                            out_dtype=torch.bfloat16, use_fast_accum=use_fast_accum)


class _FP8LinearFn(torch.autograd.Function):
    """x [M, K] -> [M, N]: forward on fp8 tensor cores (use_fp8) or weight-only; backward: input gradient only.

    The Triton launchers run on CUDA; on CPU the same function runs with their torch twins, which lets the CPU
    tests check the _scaled_mm layouts and the autograd wiring (torch._scaled_mm runs on CPU, DESIGN §4).
    Rows in, rows out, the caller reshapes: forward returns the GEMM's own output, never a view or no-op of an
    intermediate, which torch 2.11's dynamo mis-wires (pytorch#180642; kontext_kernels/int4.py says how)."""

    @staticmethod
    def forward(ctx, x, w_codes, w_scale, bias, use_fp8, w_codes_t):
        N = w_codes.shape[0]
        scale = _per_row(w_scale, N)
        ctx.backward_fp8 = use_fp8 and w_codes_t is not None
        ctx.save_for_backward(w_codes_t if ctx.backward_fp8 else w_codes, scale)
        if use_fp8:
            x_q, x_scale = (quantize_rows if x.is_cuda else quantize_rows_ref)(x)
            return _fp8_mm(x_q, x_scale, w_codes, scale, None if bias is None else bias.to(torch.bfloat16), True)
        w = (dequantize if x.is_cuda else dequantize_ref)(w_codes, scale, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            raise RuntimeError("fp8_linear: the fp8 weight, its scale and the bias are frozen (no gradient); "
                               "train a LoRA on top instead")
        codes, scale = ctx.saved_tensors  # codes: w_codes [N, K], or its transpose [K, N] for the fp8 GEMM
        if ctx.backward_fp8 and dy.dtype == torch.bfloat16:
            # dX = dY @ (codes * scale[:, None]): the weight's row scale runs along the reduction (N), so it is
            # folded into dY's columns before dY is quantized per row to e5m2 (range over precision for grads).
            dy_q, dy_scale = (quantize_rows if dy.is_cuda else quantize_rows_ref)(dy, E5M2, scale)
            ones = torch.ones(codes.shape[0], dtype=torch.float32, device=dy.device)
            dx = _fp8_mm(dy_q, dy_scale, codes, ones, None, False)
        else:
            w = (dequantize if dy.is_cuda else dequantize_ref)(codes, scale, dy.dtype)
            dx = dy @ w
        return dx, None, None, None, None, None


class FP8Linear(nn.Linear):
    """A frozen Linear stored as e4m3 `weight` [out, in] and fp32 `weight_scale` [out] (parameters that never
    require grad), bias in `compute_dtype`. forward(x) = fp8_linear(x, weight, weight_scale, bias).

    Why an nn.Linear subclass: peft's LoRA dispatch is `isinstance(base, nn.Linear)` (lora/layer.py
    dispatch_default), and peft moves the adapter to the base's `compute_dtype` when there is one (the bnb
    Linear4bit convention, tuners_utils._get_base_layer_device_and_dtype), so LoRA weights become bf16/fp32, never
    float8, and the LoRA keys equal those of the bf16 model. Parameters rather than buffers: DDP re-broadcasts
    buffers at every forward. The state_dict keys (`weight`, `weight_scale`, `bias`) are ComfyUI's newer
    scaled-fp8 spelling, so quant.py reads a saved model back."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        self.weight = _frozen(torch.zeros(out_features, in_features, dtype=E4M3, device=device))
        self.weight_scale = _frozen(torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = _frozen(torch.zeros(out_features, dtype=compute_dtype, device=device)) if bias else None
        self.register_buffer("weight_t", None, persistent=False)  # set_backward_fp8
        self.weight_only = False  # True: fp8 storage, activations stay in their dtype (the fp8 T5)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        """Quantize an nn.Linear per row (quantize_fp8); the bias keeps the Linear's dtype."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device,
                compute_dtype=linear.weight.dtype)
        codes, scale = quantize_fp8(linear.weight)
        m.weight, m.weight_scale = _frozen(codes), _frozen(scale)
        if linear.bias is not None:
            m.bias = _frozen(linear.bias.detach().clone())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, self.weight_t, self.weight_only)

    def set_backward_fp8(self, on: bool) -> None:
        """Input gradient as an e5m2 x e4m3 GEMM (on) or dY @ dequantized W in bf16 (off). The fp8 GEMM needs W
        in the other major order: the layer then holds `weight_t` = weight.T contiguous (2x the fp8 weight memory;
        a non-persistent buffer, so state_dicts and LoRA keys are unchanged)."""
        self.register_buffer("weight_t", self.weight.detach().t().contiguous() if on else None, persistent=False)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() cast every floating tensor, float8 included, and a bf16 scale would lose
        # bits: the codes and scales only follow the device; the bias and compute_dtype follow the cast.
        kept = {k: self._parameters.pop(k) for k in ("weight", "weight_scale")}
        kept_t = self._buffers.pop("weight_t", None)
        try:
            super()._apply(fn, recurse)
            probe = fn(torch.empty(0, dtype=self.compute_dtype, device=kept["weight"].device))
            self.compute_dtype = probe.dtype
            kept = {k: v.to(probe.device) for k, v in kept.items()}
            kept_t = None if kept_t is None else kept_t.to(probe.device)
        finally:
            for k, v in kept.items():
                self.register_parameter(k, v if isinstance(v, nn.Parameter) else _frozen(v))
            self.register_buffer("weight_t", kept_t, persistent=False)
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, e4m3 per-row, compute_dtype={self.compute_dtype}"


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)
