"""Quantized FLUX transformers: read fp8 and bitsandbytes 4-bit checkpoints, or quantize a bf16 one at load time.

load.load_transformer calls load_quantized_transformer when cfg.quant != "none" or the folder holds float8 weights
or a quantization_config. Everything is read from safetensors (never torch.load). Formats (DESIGN §3):

- ComfyUI "fp8 scaled": Linear `weight` float8_e4m3fn with an fp32 `scale_weight` (older) or `weight_scale` (newer)
  beside it, one value per layer (per-row [out] accepted too); w = codes * scale. `scale_input` (Comfy's static
  activation scale for its fp8 matmul) and the `scaled_fp8` marker are ignored: we quantize activations per token at
  run time, and the weights do not depend on them.
- plain-cast e4m3 exports (no scales): scale 1.
- scaled codes whose scales were dropped (e.g. AlekseyCalvin/Flux_Kontext_Dev_fp8_scaled_diffusers): refused with
  a ValueError unless `fp8_scales` names a safetensors file of `<name>.scale_weight` scales (see _check_codes).
- bitsandbytes 4-bit diffusers exports (config.json quantization_config), read by load_bnb_transformer without the
  bnb library. Per quantized Linear `<m>` (bitsandbytes `QuantState.as_dict(packed=True)`, what diffusers writes):
    <m>.weight              uint8 [ceil(n/2), 1]   n = out*in codes, row-major; element 2i in the HIGH nibble
    <m>.weight.absmax       fp32 [ceil(n/blocksize)], or uint8 under double quant
    <m>.weight.nested_absmax, <m>.weight.nested_quant_map   fp32 (double quant only)
    <m>.weight.quant_map    fp32 [16]  the nf4 / fp4 code book
    <m>.weight.quant_state.bitsandbytes__nf4|fp4  uint8 JSON: quant_type, blocksize, dtype, shape
                            (+ nested_blocksize, nested_dtype, nested_offset under double quant)
  These tensors become kontext_kernels.int4.Linear4bit's buffers as they are (its docstring gives the dequant math).
- bf16/fp32 checkpoints: quant="fp8" quantizes per row (kontext_kernels.fp8.quantize_fp8) as each tensor is read; "nf4" /
  "fp4" hand the dense model to quantize_transformer_4bit. quantize_transformer does either to a model already in
  memory (bench.py).

Format sniffing lives here too (read_config, safetensors_header, is_quantized_checkpoint): load.py asks, and never
opens a checkpoint file itself.

Key names: diffusers names (read one tensor at a time), or BFL names (`double_blocks.0.img_attn.qkv.weight`,
optionally under `model.diffusion_model.`, as in ComfyUI's single files, whose other keys are skipped) converted by
diffusers' convert_flux_transformer_checkpoint_to_diffusers (full-size FLUX.1 only: it hard-codes 3072 wide; the
whole file is read into host memory first); scales go through the same converter as [out, 1] columns, so a fused
qkv's scale splits with its rows. The folder needs the transformer's config.json beside the weights.

Which Linears are quantized (fp8 and 4-bit alike, one rule: quantized_linears): every nn.Linear inside
transformer_blocks and single_transformer_blocks (attention q/k/v/out, the add_* context projections, ff/ff_context,
proj_mlp/proj_out, the norm1/norm modulation linears). The embedders (x_embedder, context_embedder,
time_text_embed), norm_out and the top-level proj_out stay in `dtype` (a stored fp8 one is dequantized): under 1% of
the weights, at the two ends where precision costs most. A bitsandbytes export is read as stored: diffusers
quantizes every Linear, the ends included.
"""

import json
import math
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

from kontext_kernels.fp8 import E4M3, FP8Linear, quantize_fp8
from kontext_kernels.int4 import Linear4bit, get_4bit_type

QUANTS = ("none", "fp8", "nf4", "fp4")
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")  # the Linears under these are quantized
# A plain-cast e4m3 weight is the bf16 weight rounded: FLUX's Linear weights stay below ~10. Scaled-fp8 codes fill the
# e4m3 range by construction (absmax -> 448; the AlekseyCalvin export peaks at ~416), so any layer of such a file
# exceeds 64 by 6x or more, and a real weight would have to be 6x beyond FLUX's largest to be refused.
MAX_PLAUSIBLE_WEIGHT = 64.0
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_IGNORED_SUFFIXES = (".scale_input", ".input_scale")
_BFL_PREFIX = "model.diffusion_model."


# ---------------------------------------------------------------- format sniffing


def read_config(folder: Path, name: str = "transformer", expected: str = "FluxTransformer2DModel") -> dict:
    """The config.json of a diffusers model folder, as a dict. `name` (the component) and `expected` (its class)
    only word the error."""
    file = Path(folder) / "config.json"
    if not file.is_file():
        raise ValueError(f"{name}: {str(folder)!r} has no config.json (expected a diffusers {expected} folder, "
                         f"config.json beside the weights)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}: {str(file)!r} is not valid JSON: {e}") from None


def safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes, offsets) without reading any tensor."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > 100_000_000:
            raise ValueError(f"{str(file)!r} is not a safetensors file (header length {n})")
        return json.loads(f.read(n))


def is_quantized_checkpoint(folder: Path) -> bool:
    """True for a bitsandbytes export (quantization_config) or one holding float8 weights."""
    if "quantization_config" in read_config(folder):
        return True
    for f in sorted(Path(folder).glob("*.safetensors")):
        if any(isinstance(v, dict) and v.get("dtype", "").startswith("F8") for v in safetensors_header(f).values()):
            return True
    return False


# ---------------------------------------------------------------- which Linears are quantized


def quantized_linears(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """The one rule for which Linears a quantize path replaces (see the module docstring): every plain nn.Linear
    (type, not isinstance: FP8Linear and Linear4bit subclass it) under transformer_blocks and
    single_transformer_blocks, as (qualified name, parent module, attribute name, the Linear), in model order.
    A list, taken before anything changes, so `setattr(parent, attr, new)` may replace each while iterating."""
    found = []
    for name, module in model.named_modules():
        if name.startswith(BLOCKS) and type(module) is nn.Linear:
            parent, _, attr = name.rpartition(".")
            found.append((name, model.get_submodule(parent), attr, module))
    if not found:
        raise ValueError(f"quantized_linears: {type(model).__name__} has no nn.Linear under "
                         f"{' / '.join(b.rstrip('.') for b in BLOCKS)} (expected a dense FluxTransformer2DModel)")
    return found


# ---------------------------------------------------------------- load / quantize a transformer


def load_quantized_transformer(folder: Path, quant: str, dtype: torch.dtype, device: torch.device,
                               fp8_scales: str = ""):
    """A FluxTransformer2DModel on `device`, frozen, in eval mode: fp8 (FP8Linear in the blocks, the rest in
    `dtype`), 4-bit (kontext_kernels.int4), or dense `dtype` when quant="none" and nothing in the files is fp8."""
    folder = Path(folder)
    if quant not in QUANTS:
        raise ValueError(f"transformer: unknown quant {quant!r}; expected one of {QUANTS}")
    config = read_config(folder)
    if "quantization_config" in config:
        if fp8_scales:
            raise ValueError(f"transformer: fp8_scales={fp8_scales!r} given but {str(folder)!r} is a bitsandbytes "
                             f"checkpoint")
        return _load_bnb(folder, config["quantization_config"], quant, dtype, device)

    weights, scales, bfl = _open_weights(folder, fp8_scales)
    if bfl:
        weights, scales = _convert_bfl(weights, scales, folder)
    fp8 = quant == "fp8" or (quant == "none" and any(stored == E4M3 for _, stored in weights.values()))
    model = _skeleton(config, dtype, fp8)
    fp8_modules = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    state = {}
    for key in model.state_dict():  # meta tensors: only the names
        module, _, attr = key.rpartition(".")
        if module in fp8_modules and attr == "weight_scale":
            continue  # filled with its weight
        if key not in weights:
            raise ValueError(f"transformer: {str(folder)!r} has no {key!r} (expected a FluxTransformer2DModel "
                             f"checkpoint matching config.json)")
        read, stored = weights.pop(key)
        t = read().to(device)
        if module in fp8_modules and attr == "weight":
            if stored == E4M3:
                codes, scale = t, _per_row(scales.pop(key, None), t, key, folder)
            else:  # a bf16/fp32 weight in an fp8 model: quantize per row here
                codes, scale = quantize_fp8(t)
            state[key], state[module + ".weight_scale"] = codes, scale
        else:
            if stored == E4M3:  # outside the blocks (or a 4-bit target): dequantize with its scale
                s = _per_row(scales.pop(key, None), t, key, folder)
                t = t.float() * s.reshape((-1,) + (1,) * (t.dim() - 1))
            state[key] = t.to(dtype)
    if weights:
        raise ValueError(f"transformer: {str(folder)!r} holds tensors the model does not have: "
                         f"{sorted(weights)[:5]}{' ...' if len(weights) > 5 else ''} (wrong config.json?)")
    model.load_state_dict(state, strict=True, assign=True)
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(f"transformer: {meta[:5]} were not filled from {str(folder)!r}")
    model.eval().requires_grad_(False)
    return quantize_transformer(model, quant) if quant in ("nf4", "fp4") else model


def quantize_transformer(model: nn.Module, quant: str) -> nn.Module:
    """Quantize a dense FluxTransformer2DModel already in memory, in place, one Linear at a time on its device:
    "fp8" swaps the block Linears for FP8Linear (per row), "nf4" / "fp4" for kontext_kernels.int4's 4-bit Linear."""
    if quant == "fp8":
        for _, parent, attr, linear in quantized_linears(model):
            setattr(parent, attr, FP8Linear.from_linear(linear))
        return model
    if quant in ("nf4", "fp4"):
        return quantize_transformer_4bit(model, quant)
    raise ValueError(f"quantize_transformer: unknown quant {quant!r}; expected fp8, nf4 or fp4")


def quantize_t5_fp8(t5: nn.Module) -> nn.Module:
    """T5 encoder Linears as fp8 weight-only storage (FP8Linear, per row, activations in their dtype), in place on
    their device: T5-XXL's 9.5 GB of bf16 attention and wi weights halve, for caching on small cards. Each block's
    `wo` stays as loaded: transformers keeps it in fp32 (T5's _keep_in_fp32_modules) and casts the hidden states to
    wo.weight's dtype, which for fp8 codes would be float8 activations."""
    found = [(n, m) for n, m in t5.named_modules() if type(m) is nn.Linear and ".block." in f".{n}"
             and not n.endswith(".wo")]
    if not found:
        raise ValueError(f"quantize_t5_fp8: {type(t5).__name__} has no encoder block Linears (expected T5EncoderModel)")
    for name, linear in found:
        parent, _, attr = name.rpartition(".")
        q = FP8Linear.from_linear(linear)
        q.weight_only = True
        setattr(t5.get_submodule(parent), attr, q)
    return t5


def quantize_transformer_4bit(model: nn.Module, quant_type: str, blocksize: int = 64) -> nn.Module:
    """quantized_linears -> Linear4bit (in place, one layer at a time, on the layer's device), the same codes as
    bitsandbytes' quantize_4bit on the CPU; embedders, norm_out and the top-level proj_out stay dense."""
    get_4bit_type(quant_type)  # validates quant_type before any layer is touched
    for _, parent, attr, linear in quantized_linears(model):
        setattr(parent, attr, Linear4bit.from_linear(linear, quant_type, blocksize))
    return model


def _load_bnb(folder: Path, qc: dict, quant: str, dtype: torch.dtype, device: torch.device):
    stored = qc.get("bnb_4bit_quant_type")
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit") or stored not in ("nf4", "fp4"):
        raise ValueError(f"transformer: {str(folder / 'config.json')!r} has quantization_config {qc}; only "
                         f"bitsandbytes 4-bit (nf4/fp4) is supported")
    if quant not in ("none", stored):
        raise ValueError(f"transformer: quant={quant!r} but {str(folder)!r} is a bitsandbytes {stored} checkpoint; "
                         f"set quant='none' (or {stored!r}) to load it as stored, or point at a bf16 checkpoint to "
                         f"quantize it to {quant}")
    return load_bnb_transformer(folder, dtype, device)


# ---------------------------------------------------------------- reading fp8 / dense safetensors


def _open_weights(folder: Path, fp8_scales: str):
    """name -> (read(), stored dtype), weight name -> scale (BFL prefix stripped), and whether the names are BFL's.
    Tensors are read when used, one at a time, so the host holds one layer rather than the checkpoint."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"transformer: no .safetensors files in {str(folder)!r}")
    weights, scales, source, scale_source = {}, {}, {}, {}  # name -> its file, for messages
    for f in files:
        handle = safe_open(str(f), framework="pt", device="cpu")
        header = safetensors_header(f)
        # ComfyUI all-in-one files keep the transformer under model.diffusion_model. beside the VAE and text encoders
        prefixed = any(k.startswith(_BFL_PREFIX) for k in header)
        for k, v in header.items():
            name = k.removeprefix(_BFL_PREFIX)
            if (k == "__metadata__" or name == "scaled_fp8" or name.endswith(_IGNORED_SUFFIXES)
                    or (prefixed and name == k)):
                continue
            read = lambda h=handle, k=k: h.get_tensor(k)  # noqa: E731
            if name.endswith(_SCALE_SUFFIXES):
                _add_scale(scales, scale_source, name, read(), f)
            elif v["dtype"].startswith("F8") and v["dtype"] != "F8_E4M3":
                raise ValueError(f"transformer: {str(f)!r}: {k!r} is {v['dtype']}; only float8_e4m3fn weights are "
                                 f"supported")
            else:
                weights[name], source[name] = (read, E4M3 if v["dtype"] == "F8_E4M3" else None), f
    if fp8_scales:
        file = Path(fp8_scales).expanduser()
        if not file.is_file():
            raise ValueError(f"transformer: fp8_scales file {str(file)!r} does not exist")
        with safe_open(str(file), framework="pt", device="cpu") as h:
            for k in h.keys():
                name = k.removeprefix(_BFL_PREFIX)
                if not name.endswith(_SCALE_SUFFIXES):
                    raise ValueError(f"transformer: {str(file)!r} holds {k!r}; expected only '<name>.scale_weight' "
                                     f"(or '<name>.weight_scale') scales")
                _add_scale(scales, scale_source, name, h.get_tensor(k), file)
    for name in sorted(scales):
        if weights.get(name, (None, None))[1] != E4M3:
            raise ValueError(f"transformer: {str(scale_source[name])!r} holds a scale for {name!r}, which is "
                             f"not a float8 weight of {str(folder)!r} (scales must use the checkpoint's weight names)")
    for name, (read, stored) in weights.items():
        if stored == E4M3 and name not in scales:
            _check_codes(name, read(), source[name])
    bfl = any(k.startswith(("double_blocks.", "single_blocks.")) for k in weights)
    return weights, scales, bfl


def _add_scale(scales: dict, scale_source: dict, name: str, scale: torch.Tensor, file: Path):
    weight = name.rsplit(".", 1)[0] + ".weight"
    if weight in scales:
        raise ValueError(f"transformer: two scales for {weight!r}: in {str(scale_source[weight])!r} and "
                         f"{str(file)!r}")
    scales[weight], scale_source[weight] = scale.float(), file


def _check_codes(name: str, codes: torch.Tensor, file: Path):
    """Refuse e4m3 codes without a scale that cannot be weights (see MAX_PLAUSIBLE_WEIGHT), and NaN codes.
    e4m3fn magnitudes order like their low 7 bits, so the max is one integer reduction (0x7F is NaN)."""
    top = int((codes.view(torch.uint8) & 0x7F).max()) if codes.numel() else 0
    peak = torch.tensor([top], dtype=torch.uint8).view(E4M3).float().item()
    if top == 0x7F:
        raise ValueError(f"transformer: {str(file)!r}: {name!r} holds NaN float8 codes (corrupt file?)")
    if codes.dim() == 2 and peak > MAX_PLAUSIBLE_WEIGHT:
        base = name.removesuffix(".weight")
        raise ValueError(
            f"transformer: {str(file)!r}: {name!r} is float8_e4m3fn with |w| up to {peak:g} and no scale beside it "
            f"({base}.scale_weight / {base}.weight_scale). FLUX weights stay below ~10 (limit "
            f"{MAX_PLAUSIBLE_WEIGHT:g}), so these are scaled-fp8 codes whose per-layer scales the export dropped; "
            f"loaded as-is they give NaN or grid images. Fix: pass model.fp8_scales=<a safetensors file of "
            f"'<name>.scale_weight' fp32 scales with this checkpoint's names>, or load a checkpoint that keeps its "
            f"scales (ComfyUI's fp8_scaled file beside the transformer config.json), or the bf16 one with quant='fp8'.")


def _per_row(scale: torch.Tensor | None, codes: torch.Tensor, name: str, folder: Path) -> torch.Tensor:
    """A stored scale (one per layer, or one per output row) as fp32 [out] on the codes' device; None is 1."""
    n = codes.shape[0] if codes.dim() else 1
    if scale is None:
        return torch.ones(n, dtype=torch.float32, device=codes.device)
    if scale.numel() not in (1, n):
        raise ValueError(f"transformer: {str(folder)!r}: the scale of {name!r} has shape {tuple(scale.shape)}; "
                         f"expected one value or one per output row ({n})")
    return scale.float().reshape(-1).expand(n).contiguous().to(codes.device)


def _convert_bfl(weights: dict, scales: dict, folder: Path):
    """BFL names -> diffusers names with diffusers' own converter. Reads the whole checkpoint into host memory (the
    converter works on a dict). Per-layer scales ride along as [out, 1] columns of the same converter, so the
    fused qkv / linear1 splits and the final-layer shift/scale swap give each diffusers weight its rows' scales."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers as convert

    tensors = {k: read() for k, (read, _) in weights.items()}
    rows = {k: (_per_row(scales.get(k), t, k, folder).reshape(-1, 1) if t.dim() == 2 else t)
            for k, t in tensors.items()}
    left, left_rows = dict(tensors), dict(rows)
    try:
        converted, converted_rows = convert(left), convert(left_rows)
    except (KeyError, RuntimeError, IndexError) as e:
        raise ValueError(f"transformer: {str(folder)!r} has BFL key names but diffusers' FLUX converter failed on "
                         f"it ({type(e).__name__}: {e}); it handles full-size FLUX.1 checkpoints only") from e
    if left:
        raise ValueError(f"transformer: {str(folder)!r}: BFL keys the FLUX converter does not know: {sorted(left)[:5]}")
    new_weights = {k: ((lambda t=t: t), E4M3 if t.dtype == E4M3 else None) for k, t in converted.items()}
    new_scales = {k: converted_rows[k].reshape(-1) for k, t in converted.items() if t.dtype == E4M3}
    return new_weights, new_scales


def _skeleton(config: dict, dtype: torch.dtype, fp8: bool) -> nn.Module:
    """The FluxTransformer2DModel on the meta device (no memory, no init), block Linears swapped for FP8Linear."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
        if fp8:
            for _, parent, attr, m in quantized_linears(model):
                setattr(parent, attr, FP8Linear(m.in_features, m.out_features, m.bias is not None, compute_dtype=dtype))
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
    from diffusers import FluxTransformer2DModel
    from safetensors import safe_open

    folder = Path(folder)
    conf_file = folder / "config.json"
    config = read_config(folder)
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
