"""4-bit (bitsandbytes nf4 / fp4) weights: the checkpoint layout, a Triton dequant, and a Linear that trains LoRA.

Layout (bitsandbytes `QuantState.as_dict(packed=True)`, what diffusers writes per quantized Linear `<m>`):
  <m>.weight              uint8 [ceil(n/2), 1]   n = out*in codes, row-major; element 2i in the HIGH nibble
  <m>.weight.absmax       fp32 [ceil(n/blocksize)] per-block max |w|; under double quant uint8 codes of
                          (absmax - offset) in bnb's 8-bit dynamic map, blocks of nested_blocksize (256)
  <m>.weight.nested_absmax     fp32 [ceil(len(absmax)/256)]   (double quant only)
  <m>.weight.nested_quant_map  fp32 [256]                      (double quant only)
  <m>.weight.quant_map    fp32 [16]  the nf4 / fp4 code book
  <m>.weight.quant_state.bitsandbytes__nf4|fp4  uint8 JSON: quant_type, blocksize, dtype, shape
                          (+ nested_blocksize, nested_dtype, nested_offset under double quant)
Dequant (bitsandbytes.functional.dequantize_4bit, bit for bit): w[i] = quant_map[code[i]] * absmax[i // blocksize] in
fp32, rounded once to the output dtype; double quant first rebuilds
absmax[j] = nested_quant_map[absmax_u8[j]] * nested_absmax[j // 256] + offset in fp32 (no fused multiply-add).

Linear4bit keeps only the codes and statistics (0.5 + 4/64 bytes a weight; 0.5 + ~1/64 under double quant). Forward
dequantises to the compute dtype and runs a tensor-core GEMM; backward dequantises again for the input gradient, so
autograd never holds a dequantised weight. There is no weight gradient (the base model is frozen; LoRA trains).
"""

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (macOS, some CPU installs): everything runs the pure-torch references
    triton = None

# TRITON_INTERPRET=1 (decided by Triton when this file is imported) runs the kernels on CPU tensors: correct for fp32,
# wrong for bf16 / fp16 (DESIGN.md §4), so CI tests only the fp32 instantiation that way.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

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


def _use_triton(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or INTERPRET)


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
    if not _use_triton(codes_u8):
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
        return F.linear(x.to(dtype), w, b).to(x.dtype)

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


def quantize_transformer_4bit(model: nn.Module, quant_type: str, blocksize: int = 64) -> nn.Module:
    """Replace every nn.Linear inside transformer_blocks / single_transformer_blocks with a Linear4bit (in place, one
    layer at a time, on the layer's device); embedders, norm_out and the top-level proj_out stay dense."""
    get_4bit_type(quant_type)  # validates quant_type
    for prefix in ("transformer_blocks", "single_transformer_blocks"):
        for name, module in list(model.get_submodule(prefix).named_modules(prefix=prefix)):
            if type(module) is nn.Linear:
                model.set_submodule(name, Linear4bit.from_linear(module, quant_type, blocksize))
    return model


# ---------------------------------------------------------------- reading a bitsandbytes export


_STATS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _read_quant_state(file: str, key: str, tensor: torch.Tensor) -> dict:
    try:
        return json.loads(bytes(tensor.to(torch.uint8).cpu().numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: {key} does not hold bitsandbytes quant_state JSON: {e}") from None


def _linear4bit_from_tensors(file: str, name: str, module: nn.Module, t: dict, dtype, device) -> Linear4bit:
    """Check one quantized Linear's tensors against the module it replaces and build the Linear4bit."""
    w = f"{name}.weight"
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{file}: {w} is 4-bit quantized but {name!r} is a {type(module).__name__}, not a Linear")
    qs_keys = [k for k in t if k.startswith("quant_state.")]
    unknown = set(t) - {"weight", "bias", *_STATS, *qs_keys}
    if unknown:
        raise ValueError(f"{file}: unexpected tensors {sorted(f'{w}.{k}' for k in unknown)} beside a 4-bit weight")
    for need in ("weight", "absmax", "quant_map"):
        if need not in t:
            raise ValueError(f"{file}: quantized weight {w} has no {w if need == 'weight' else w + '.' + need} "
                             f"(a bitsandbytes 4-bit Linear needs weight, weight.absmax, weight.quant_map and "
                             f"weight.quant_state.bitsandbytes__nf4|fp4)")
    if len(qs_keys) != 1 or not qs_keys[0].startswith("quant_state.bitsandbytes__"):
        raise ValueError(f"{file}: quantized weight {w} needs exactly one {w}.quant_state.bitsandbytes__nf4|fp4 "
                         f"entry, found {[f'{w}.{k}' for k in qs_keys] or 'none'}")
    qs = _read_quant_state(file, f"{w}.{qs_keys[0]}", t[qs_keys[0]])
    quant_type = qs_keys[0].rsplit("__", 1)[1]
    shape, blocksize = qs.get("shape"), qs.get("blocksize")
    expected = [module.out_features, module.in_features]
    if qs.get("quant_type", quant_type) != quant_type or quant_type not in ("nf4", "fp4"):
        raise ValueError(f"{file}: {w}.{qs_keys[0]} says quant_type {qs.get('quant_type')!r}; expected nf4 or fp4 "
                         f"matching the key")
    if shape is None or list(shape) != expected:
        raise ValueError(f"{file}: {w}.{qs_keys[0]} has shape {shape}, but {name} is a Linear of shape {expected} "
                         f"(out, in) in this config.json")
    if not isinstance(blocksize, int) or blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"{file}: {w}.{qs_keys[0]} has blocksize {blocksize!r}; expected a power of 2 in 32..4096")
    n = math.prod(expected)
    nested = "nested_absmax" in t or "nested_offset" in qs
    sizes = {"weight": ((n + 1) // 2, torch.uint8), "absmax": (-(-n // blocksize), torch.uint8 if nested else
                                                                  torch.float32), "quant_map": (16, torch.float32)}
    if nested:
        nb = qs.get("nested_blocksize")
        if "nested_quant_map" not in t or "nested_absmax" not in t or "nested_offset" not in qs or nb is None:
            raise ValueError(f"{file}: {w} is double-quantized but lacks one of {w}.nested_absmax, "
                             f"{w}.nested_quant_map, nested_offset / nested_blocksize in its quant_state")
        sizes.update(nested_absmax=(-(-sizes["absmax"][0] // nb), torch.float32), nested_quant_map=(256, torch.float32))
    for k, (numel, dt) in sizes.items():
        if t[k].numel() != numel or t[k].dtype != dt:
            key = w if k == "weight" else f"{w}.{k}"
            raise ValueError(f"{file}: {key} is {t[k].dtype} with {t[k].numel()} elements; expected {dt} with {numel} "
                             f"for a {expected} weight in blocks of {blocksize}")
    on = lambda k: t[k].to(device) if k in t else None  # noqa: E731
    return Linear4bit(module.in_features, module.out_features, on("weight"), on("absmax"), on("quant_map"), blocksize,
                      None if t.get("bias") is None else t["bias"].to(device, dtype), dtype, quant_type,
                      on("nested_absmax"), on("nested_quant_map"),
                      torch.tensor(float(qs["nested_offset"]), device=device) if nested else None,
                      qs.get("nested_blocksize", 256))


def _owner(key: str) -> str:
    """The module a tensor belongs to: "<m>.weight.absmax", "<m>.weight", "<m>.bias" -> "<m>"."""
    return key.split(".weight.", 1)[0] if ".weight." in key else key.rsplit(".", 1)[0]


def load_bnb_transformer(folder: Path, dtype: torch.dtype, device: torch.device):
    """A FluxTransformer2DModel from a diffusers bitsandbytes 4-bit folder (config.json + *.safetensors), read
    directly (bitsandbytes is not needed): quantized Linears become Linear4bit computing in `dtype` (the export's
    bnb_4bit_compute_dtype is ignored), every other tensor is cast to `dtype`. On `device`, eval mode, frozen."""
    from contextlib import ExitStack

    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    folder = Path(folder)
    conf_file = folder / "config.json"
    if not conf_file.is_file():
        raise ValueError(f"{str(folder)!r} has no config.json (expected a diffusers FluxTransformer2DModel folder)")
    config = json.loads(conf_file.read_text())
    qc = config.pop("quantization_config", None)
    if not qc or qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        raise ValueError(f"{conf_file}: quantization_config {qc} is not bitsandbytes 4-bit (expected quant_method "
                         f"'bitsandbytes' and load_in_4bit true)")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{str(folder)!r} holds no *.safetensors files")
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)

    with ExitStack() as stack:
        where, groups = {}, {}  # key -> open file; module name -> its keys
        for f in files:
            sf = stack.enter_context(safe_open(f, framework="pt"))
            for k in sf.keys():
                if k in where:
                    raise ValueError(f"{k} appears in two files of {str(folder)!r} (one is {f.name})")
                where[k] = (f, sf)
                groups.setdefault(_owner(k), []).append(k)
        # A Linear is quantized when its weight is uint8 or it has any 4-bit statistic.
        quantized = {m for m, keys in groups.items() if any(".weight." in k for k in keys) or
                     (f"{m}.weight" in keys and where[f"{m}.weight"][1].get_slice(f"{m}.weight").get_dtype() == "U8")}
        for name in sorted(quantized):
            keys = groups[name]
            file = str(where[keys[0]][0])
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{file}: {keys[0]} names no module of this FluxTransformer2DModel") from None
            tensors = {k[len(name) + 1:].removeprefix("weight."): where[k][1].get_tensor(k) for k in keys}
            model.set_submodule(name, _linear4bit_from_tensors(file, name, module, tensors, dtype, device))

        expected = {k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta}
        plain = {k for m, keys in groups.items() if m not in quantized for k in keys}
        if expected - plain:
            raise ValueError(f"{str(folder)!r}: missing tensors {sorted(expected - plain)[:8]} in "
                             f"{[f.name for f in files]}")
        if plain - expected:
            extra = sorted(plain - expected)[:8]
            raise ValueError(f"{where[extra[0]][0]}: unexpected tensors {extra} for this FluxTransformer2DModel config")
        state = {}
        for k in plain:
            t = where[k][1].get_tensor(k)
            state[k] = t.to(device, dtype) if t.is_floating_point() else t.to(device)
    model.load_state_dict(state, strict=False, assign=True)
    return model.eval().requires_grad_(False)
