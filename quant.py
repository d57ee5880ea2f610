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
- bitsandbytes 4-bit diffusers exports (config.json quantization_config): kernels.int4.load_bnb_transformer.
- bf16/fp32 checkpoints: quant="fp8" quantizes per row (kernels.fp8.quantize_fp8) as each tensor is read; "nf4" /
  "fp4" hand the dense model to kernels.int4.quantize_transformer_4bit. quantize_transformer does either to a
  model already in memory (bench.py).

Key names: diffusers names (read one tensor at a time), or BFL names (`double_blocks.0.img_attn.qkv.weight`,
optionally under `model.diffusion_model.`, as in ComfyUI's single files, whose other keys are skipped) converted by
diffusers' convert_flux_transformer_checkpoint_to_diffusers (full-size FLUX.1 only: it hard-codes 3072 wide; the
whole file is read into host memory first); scales go through the same converter as [out, 1] columns, so a fused
qkv's scale splits with its rows. The folder needs the transformer's config.json beside the weights.

Which Linears become FP8Linear: every nn.Linear inside transformer_blocks and single_transformer_blocks (attention
q/k/v/out, the add_* context projections, ff/ff_context, proj_mlp/proj_out, the norm1/norm modulation linears).
The embedders (x_embedder, context_embedder, time_text_embed), norm_out and the top-level proj_out stay in `dtype`
(a stored fp8 one is dequantized): under 1% of the weights, at the two ends where precision costs most.
"""

import json
from pathlib import Path

import torch
from torch import nn

from kernels.fp8 import E4M3, FP8Linear, quantize_fp8
from load import safetensors_header

QUANTS = ("none", "fp8", "nf4", "fp4")
BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")  # Linears under these are quantized
# A plain-cast e4m3 weight is the bf16 weight rounded: FLUX's Linear weights stay below ~10. Scaled-fp8 codes fill the
# e4m3 range by construction (absmax -> 448; the AlekseyCalvin export peaks at ~416), so any layer of such a file
# exceeds 64 by 6x or more, and a real weight would have to be 6x beyond FLUX's largest to be refused.
MAX_PLAUSIBLE_WEIGHT = 64.0
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_IGNORED_SUFFIXES = (".scale_input", ".input_scale")
_BFL_PREFIX = "model.diffusion_model."


def load_quantized_transformer(folder: Path, quant: str, dtype: torch.dtype, device: torch.device,
                               fp8_scales: str = ""):
    """A FluxTransformer2DModel on `device`, frozen, in eval mode: fp8 (FP8Linear in the blocks, the rest in
    `dtype`), 4-bit (kernels.int4), or dense `dtype` when quant="none" and nothing in the files is fp8."""
    folder = Path(folder)
    if quant not in QUANTS:
        raise ValueError(f"transformer: unknown quant {quant!r}; expected one of {QUANTS}")
    config = _read_config(folder)
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
    "fp8" swaps the block Linears for FP8Linear (per row), "nf4" / "fp4" for kernels.int4's 4-bit Linear."""
    if quant == "fp8":
        for name, m in list(model.named_modules()):
            if name.startswith(BLOCKS) and type(m) is nn.Linear:
                model.set_submodule(name, FP8Linear.from_linear(m))
        return model
    if quant in ("nf4", "fp4"):
        from kernels.int4 import quantize_transformer_4bit

        return quantize_transformer_4bit(model, quant)
    raise ValueError(f"quantize_transformer: unknown quant {quant!r}; expected fp8, nf4 or fp4")


def _read_config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise ValueError(f"transformer: {str(folder)!r} has no config.json (put the FLUX transformer's config.json "
                         f"beside the weights)")
    return json.loads(file.read_text())


def _load_bnb(folder: Path, qc: dict, quant: str, dtype: torch.dtype, device: torch.device):
    stored = qc.get("bnb_4bit_quant_type")
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit") or stored not in ("nf4", "fp4"):
        raise ValueError(f"transformer: {str(folder / 'config.json')!r} has quantization_config {qc}; only "
                         f"bitsandbytes 4-bit (nf4/fp4) is supported")
    if quant not in ("none", stored):
        raise ValueError(f"transformer: quant={quant!r} but {str(folder)!r} is a bitsandbytes {stored} checkpoint; "
                         f"set quant='none' (or {stored!r}) to load it as stored, or point at a bf16 checkpoint to "
                         f"quantize it to {quant}")
    from kernels.int4 import load_bnb_transformer

    return load_bnb_transformer(folder, dtype, device)


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
            for name, m in list(model.named_modules()):
                if name.startswith(BLOCKS) and type(m) is nn.Linear:
                    model.set_submodule(name, FP8Linear(m.in_features, m.out_features, m.bias is not None,
                                                        compute_dtype=dtype))
    return model
