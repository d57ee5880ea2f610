"""4-bit (bitsandbytes nf4 / fp4) weights: a Triton dequant beside its pure-torch reference, and a Linear that trains
LoRA. Reading a bitsandbytes checkpoint and choosing which Linears to quantize is quant.py's.

Storage, bitsandbytes' own (so a checkpoint's tensors are used as read), n = out*in values, row-major:
  codes       uint8 [ceil(n/2)]  two codes per byte, element 2i in the HIGH nibble
  absmax      fp32 [ceil(n/blocksize)] per-block max |w|; under double quant uint8 codes of (absmax - offset) in
              bnb's 8-bit dynamic map, blocks of nested_blocksize (256), with nested_absmax
              fp32 [ceil(len(absmax)/256)], nested_quant_map fp32 [256] and a scalar offset
  quant_map   fp32 [16]  the nf4 / fp4 code book
Dequant (bitsandbytes.functional.dequantize_4bit, bit for bit): w[i] = quant_map[code[i]] * absmax[i // blocksize] in
fp32, rounded once to the output dtype; double quant first rebuilds
absmax[j] = nested_quant_map[absmax_u8[j]] * nested_absmax[j // 256] + offset in fp32 (no fused multiply-add).

Linear4bit keeps only the codes and statistics (0.5 + 4/64 bytes a weight; 0.5 + ~1/64 under double quant). Forward
dequantises to the compute dtype and runs a tensor-core GEMM; backward dequantises again for the input gradient, so
autograd never holds a dequantised weight. There is no weight gradient (the base model is frozen; LoRA trains).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from kontext_kernels import tl, triton, use_triton

# bitsandbytes.functional.get_4bit_type, computed the same way (fp32 division by the largest magnitude).
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
FP4 = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]  # sign|e2m1


def get_4bit_type(quant_type: str) -> torch.Tensor:
    """The 16-entry fp32 code book of nf4 / fp4, equal to bitsandbytes' get_4bit_type(quant_type)."""
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    data = torch.tensor(NF4 if quant_type == "nf4" else FP4, dtype=torch.float32)
    return data / data.abs().max()


# ---------------------------------------------------------------- dequantisation


def dequant_absmax_ref(absmax_u8, nested_absmax, nested_quant_map, offset, nested_blocksize: int = 256):
    """Double quant: uint8 [nb] -> fp32 [nb] block scales (bitsandbytes.functional.dequantize_blockwise + offset)."""
    nb = absmax_u8.numel()
    vals = nested_quant_map[absmax_u8.reshape(-1).long()]
    vals = F.pad(vals, (0, -nb % nested_blocksize)).view(-1, nested_blocksize) * nested_absmax.view(-1, 1)
    return vals.reshape(-1)[:nb] + offset


def dequant_4bit_ref(codes_u8, absmax, quant_map, shape, blocksize: int, dtype: torch.dtype, nested_absmax=None,
                     nested_quant_map=None, offset=None, nested_blocksize: int = 256, out=None) -> torch.Tensor:
    """Packed codes [ceil(n/2)] (any shape) -> weight `shape` in `dtype`, n = prod(shape). Pure torch, the reference.

    absmax: fp32 [ceil(n/blocksize)], or uint8 with nested_absmax / nested_quant_map / offset (double quant)."""
    n = math.prod(shape)
    if nested_absmax is not None:
        absmax = dequant_absmax_ref(absmax, nested_absmax, nested_quant_map, offset, nested_blocksize)
    codes = codes_u8.reshape(-1)
    q = torch.stack([codes >> 4, codes & 15], dim=1).reshape(-1)[:n]  # element 2i sits in the high nibble
    vals = F.pad(quant_map[q.long()], (0, -n % blocksize)).view(-1, blocksize)
    w = (vals * absmax.view(-1, 1)).reshape(-1)[:n].to(dtype).view(shape)
    return w if out is None else out.copy_(w)


if triton is not None:

    @triton.jit
    def _dequant_4bit_kernel(codes_ptr, absmax_ptr, qmap_ptr, nabsmax_ptr, nqmap_ptr, offset_ptr, out_ptr, n,
                             BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                             BLOCKS: tl.constexpr):
        # One program: BLOCKS quantisation blocks, a [BLOCKS, BLOCKSIZE / 2] tile of bytes -> [BLOCKS, BLOCKSIZE].
        blk = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
        byte = blk[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
        packed = tl.load(codes_ptr + byte, mask=byte < (n + 1) // 2, other=0)
        hi = tl.load(qmap_ptr + (packed >> 4).to(tl.int32))
        lo = tl.load(qmap_ptr + (packed & 15).to(tl.int32))
        in_range = blk < tl.cdiv(n, BLOCKSIZE)
        if NESTED:
            qa = tl.load(absmax_ptr + blk, mask=in_range, other=0).to(tl.int32)
            nested = tl.load(nabsmax_ptr + blk // NESTED_BLOCKSIZE, mask=in_range, other=0.0)
            scale = tl.load(nqmap_ptr + qa) * nested + tl.load(offset_ptr)  # launched without fp fusion: as bnb
        else:
            scale = tl.load(absmax_ptr + blk, mask=in_range, other=0.0)
        vals = tl.interleave(hi * scale[:, None], lo * scale[:, None])  # high nibble first
        idx = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        tl.store(out_ptr + idx, vals.to(out_ptr.dtype.element_ty), mask=idx < n)


def dequant_4bit(codes_u8, absmax, quant_map, shape, blocksize: int, dtype: torch.dtype, nested_absmax=None,
                 nested_quant_map=None, offset=None, nested_blocksize: int = 256, out=None) -> torch.Tensor:
    """dequant_4bit_ref in one Triton pass (unpack, code book, block scale, double-quant scales fused, cast).

    CUDA tensors (or any under TRITON_INTERPRET=1) take the kernel; CPU tensors the reference (same bits)."""
    if not use_triton(codes_u8):
        return dequant_4bit_ref(codes_u8, absmax, quant_map, shape, blocksize, dtype, nested_absmax,
                                nested_quant_map, offset, nested_blocksize, out)
    n = math.prod(shape)
    if n >= 2**31:
        raise ValueError(f"dequant_4bit: {n} elements exceeds the kernel's int32 indexing")
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=codes_u8.device)
    nested = nested_absmax is not None
    blocks = max(1, 4096 // blocksize)
    grid = (triton.cdiv(triton.cdiv(n, blocksize), blocks),)
    _dequant_4bit_kernel[grid](
        codes_u8, absmax, quant_map, nested_absmax if nested else absmax, nested_quant_map if nested else quant_map,
        offset if nested else absmax, out, n, BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize, NESTED=nested,
        BLOCKS=blocks, num_warps=4, enable_fp_fusion=False)
    return out


@torch.library.custom_op("kontext_lora::dequant_4bit", mutates_args=())
def _dequant_op(codes: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, shape: list[int], blocksize: int,
                dtype: torch.dtype, nested_absmax: torch.Tensor | None, nested_quant_map: torch.Tensor | None,
                offset: torch.Tensor | None, nested_blocksize: int) -> torch.Tensor:
    # A custom op so torch.compile sees one node (flux-fast registers its kernels the same way).
    return dequant_4bit(codes, absmax, quant_map, shape, blocksize, dtype, nested_absmax, nested_quant_map, offset,
                        nested_blocksize)


@_dequant_op.register_fake
def _(codes, absmax, quant_map, shape, blocksize, dtype, nested_absmax, nested_quant_map, offset, nested_blocksize):
    return codes.new_empty(shape, dtype=dtype)


# ---------------------------------------------------------------- quantisation


def quantize_4bit_ref(w: torch.Tensor, quant_type: str, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """w (any float dtype) -> (codes uint8 [ceil(n/2)], absmax fp32 [ceil(n/blocksize)]).

    The same bits as bitsandbytes' quantize_4bit on CPU (its reference op: scale by 1/absmax, clamp, nearest code by
    midpoints, pack two per byte). bnb's CUDA kernel can pick the other code for values on a midpoint."""
    code = get_4bit_type(quant_type)
    order = torch.argsort(code)  # on the CPU, as bnb on the CPU: fp4 holds +0 and -0, and the tie order picks one
    bounds = ((code[order[:-1]] + code[order[1:]]) / 2).to(w.device)
    order = order.to(w.device)
    flat = w.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < n:  # the last, partial block (bnb divides here, and stores the clamped absmax)
        tail = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail, -1, 1)])
    q = order[torch.bucketize(F.pad(scaled, (0, n % 2)), bounds)].to(torch.uint8)
    return (q[0::2] << 4) | q[1::2], absmax


# ---------------------------------------------------------------- the layer


class _Linear4bitFunction(torch.autograd.Function):
    """y = x W^T + b with W dequantised in forward and again in backward: autograd saves only codes and stats."""

    @staticmethod
    def forward(ctx, x, bias, codes, absmax, qmap, nested_absmax, nested_qmap, offset, shape, blocksize,
                nested_blocksize, dtype):
        ctx.save_for_backward(codes, absmax, qmap, nested_absmax, nested_qmap, offset)
        ctx.meta = (shape, blocksize, nested_blocksize, dtype, x.dtype)
        w = _dequant_op(codes, absmax, qmap, shape, blocksize, dtype, nested_absmax, nested_qmap, offset,
                        nested_blocksize)
        b = bias.to(dtype) if bias is not None else None
        y = F.linear(x.to(dtype), w, b)
        # The GEMM's own output, not a no-op `.to` of it (the same TensorImpl as that intermediate): torch 2.11's
        # dynamo also returns a traced forward's intermediates, the shared TensorImpl took the intermediate's
        # gradient slot, and x got no gradient under torch.compile (pytorch#180642, fixed by PR 180921). That left
        # the single blocks' q/k/v LoRA, upstream of a 4-bit proj_out only, untrained (tests/test_int4.py).
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        codes, absmax, qmap, nested_absmax, nested_qmap, offset = ctx.saved_tensors
        shape, blocksize, nested_blocksize, dtype, x_dtype = ctx.meta
        dx = db = None
        if ctx.needs_input_grad[0]:
            w = _dequant_op(codes, absmax, qmap, shape, blocksize, dtype, nested_absmax, nested_qmap, offset,
                            nested_blocksize)
            dx = (dy.to(dtype) @ w).to(x_dtype)
        if ctx.needs_input_grad[1]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0)
        return dx, db, *([None] * 10)


class Linear4bit(nn.Linear):
    """A frozen nn.Linear stored as bitsandbytes 4-bit codes; computes in `compute_dtype`, returns the input's dtype.

    It subclasses nn.Linear so peft wraps it with its LoRA Linear (dispatch is isinstance(base, nn.Linear)) and
    diffusers' transformer.load_lora_adapter loads LoRAs into it; peft places adapters on `weight.device` in
    `compute_dtype`. `weight` is a zero-byte stand-in of the logical shape [out, in], not a parameter: the codes are
    the `codes` buffer. (Pipeline-level load_lora_weights cannot target this layer: it reads
    transformer.state_dict()["<module>.weight"]. Merging a LoRA into it fails loudly: the stand-in is read-only.)"""

    _FP32_STATS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")

    def __init__(self, in_features: int, out_features: int, codes: torch.Tensor, absmax: torch.Tensor,
                 quant_map: torch.Tensor, blocksize: int = 64, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16, quant_type: str = "", nested_absmax=None,
                 nested_quant_map=None, offset=None, nested_blocksize: int = 256):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a dense weight
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.nested_blocksize, self.quant_type = blocksize, nested_blocksize, quant_type
        self.compute_dtype = compute_dtype
        self.register_buffer("codes", codes.reshape(-1))
        self.register_buffer("absmax", absmax.reshape(-1))
        self.register_buffer("quant_map", quant_map.float())
        self.register_buffer("nested_absmax", nested_absmax)
        self.register_buffer("nested_quant_map", nested_quant_map)
        self.register_buffer("offset", None if offset is None else offset.float().reshape(()))
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.to(compute_dtype),
                                                                               requires_grad=False))

    @property
    def weight(self) -> torch.Tensor:
        return self.codes[:1].view(1, 1).expand(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense [out, in] weight (bnb's dequantize_4bit)."""
        return _dequant_op(self.codes, self.absmax, self.quant_map, [self.out_features, self.in_features],
                           self.blocksize, dtype or self.compute_dtype, self.nested_absmax, self.nested_quant_map,
                           self.offset, self.nested_blocksize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Linear4bitFunction.apply(x, self.bias, self.codes, self.absmax, self.quant_map, self.nested_absmax,
                                         self.nested_quant_map, self.offset, [self.out_features, self.in_features],
                                         self.blocksize, self.nested_blocksize, self.compute_dtype)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts every floating buffer, but the block statistics must stay fp32 to dequantise as bnb
        # does: they follow the codes' device only, and the cast changes compute_dtype instead.
        stats = {k: self._buffers.pop(k) for k in self._FP32_STATS}
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype, device=self.codes.device)).dtype
        super()._apply(fn, recurse)
        for k, t in stats.items():
            self._buffers[k] = None if t is None else t.to(self.codes.device)
        return self

    def extra_repr(self) -> str:
        nested = ", double_quant" if self.nested_absmax is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.quant_type or '4bit'}, blocksize={self.blocksize}{nested}, compute_dtype={self.compute_dtype}")

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str, blocksize: int = 64) -> "Linear4bit":
        """Quantize a dense nn.Linear (quantize_4bit_ref); computes in the linear's dtype."""
        codes, absmax = quantize_4bit_ref(linear.weight.detach(), quant_type, blocksize)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(linear.in_features, linear.out_features, codes, absmax, get_4bit_type(quant_type).to(codes.device),
                   blocksize, bias, linear.weight.dtype, quant_type)
