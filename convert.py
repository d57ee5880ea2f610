"""LoRA files for other tools: `python convert.py IN.safetensors OUT.safetensors --format comfyui|kohya|diffusers`;
a fully fine-tuned transformer as one ComfyUI / BFL checkpoint: `python convert.py runs/x/transformer OUT.safetensors
--format comfyui-model`; adapters merged into the base: `python convert.py A.safetensors [B ...] OUT --merge --base
MODEL [--strength S ...] [--format comfyui-model]`; a LoRA extracted from a full fine-tune: `python convert.py
runs/x/transformer OUT.safetensors --extract RANK --base MODEL` (merge.py holds both).

The formats (safetensors, the tensors' dtype kept):
- diffusers: `transformer.<module>.lora_A.weight` / `lora_B.weight`, the LoraConfig (r, lora_alpha, patterns) as JSON
  under "lora_adapter_metadata" in the header: what lora.save_lora writes and FluxKontextPipeline.load_lora_weights
  reads. ComfyUI ignores the header, so a LoRA with alpha != rank changes strength there.
- comfyui: the same keys plus a scalar `transformer.<module>.alpha` per module, no adapter metadata. ComfyUI
  (comfy/lora.py, diffusers-keyed Flux LoRAs) scales each delta lora_B @ lora_A by alpha / rank, by 1.0 without an
  alpha tensor; diffusers reads the alphas as network_alphas (and refuses them beside lora_adapter_metadata, hence
  none). One file for both: train.py's default.
- kohya: sd-scripts / musubi-tuner's layout on BFL module names, `lora_unet_double_blocks_0_img_attn_qkv.lora_down
  .weight` / `lora_up.weight` / `.alpha`; q/k/v are fused as in BFL's qkv and a single block's q/k/v/proj_mlp as in
  its linear1 (see _fuse). Read by ComfyUI, kohya's tools and diffusers' _convert_kohya_flux_lora_to_diffusers.

- comfyui-model (train.mode full's result): the whole transformer in one safetensors file with BFL's names, as
  black-forest-labs ships flux1-kontext-dev.safetensors and ComfyUI's diffusion_models/ loader reads it
  (`double_blocks.0.img_attn.qkv.weight` = cat(to_q, to_k, to_v), `single_blocks.0.linear1` = cat(q, k, v, proj_mlp),
  `final_layer.adaLN_modulation.1` with (shift, scale) halves): the inverse of diffusers'
  convert_flux_transformer_checkpoint_to_diffusers (tests/test_convert.py round-trips it through that function).

Every LoRA layout lora.read_lora reads is an input (these three and those diffusers converts). Internally a LoRA is
{diffusers module name: (lora_A [r, in], lora_B [out, r], alpha)}, its delta alpha / r * lora_B @ lora_A.
"""

import argparse
import json
import re
import sys
from pathlib import Path

import torch

import adapters
from cache import save_atomic
from lora import _LORA_KEY, PREFIX, _few, lora_state_dict, read_lora, save_lora
from merge import extract_lora, merge_adapters, save_transformer_folder
import quiet

Modules = dict[str, tuple[torch.Tensor, torch.Tensor, float]]

# ---------------------------------------------------------------- reading: state dict (+ LoraConfig) -> modules


def modules_of(state_dict: dict[str, torch.Tensor], metadata: dict | None, where: str = "LoRA") -> Modules:
    """The modules of a diffusers-keyed LoRA (read_lora's output). Each alpha is peft's (the metadata's
    alpha_pattern entry, else lora_alpha); without metadata alpha = rank, diffusers' convention (scale 1)."""
    from peft import LoraConfig

    conf = None
    if metadata:
        conf = LoraConfig(**{k.removeprefix(f"{PREFIX}."): v for k, v in metadata.items()
                             if k.startswith(f"{PREFIX}.")})  # as diffusers' _create_lora_config
        if conf.use_dora or conf.use_rslora:
            raise ValueError(f"{where}: a {'DoRA' if conf.use_dora else 'rsLoRA'} adapter has no kohya / ComfyUI "
                             f"LoRA equivalent here")
    if not state_dict:
        raise ValueError(f"{where} holds no tensors")
    odd = [k for k in state_dict if not _LORA_KEY.fullmatch(k)]
    if odd:
        raise ValueError(f"{where}: {len(odd)} of {len(state_dict)} keys are not LoRA weights "
                         f"('{PREFIX}.<module>.lora_A.weight' / 'lora_B.weight'): {odd[:3]}; is it a LoRA file?")
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state_dict.items():
        m = _LORA_KEY.fullmatch(k)
        halves.setdefault(m["module"], {})[m["ab"]] = v
    out = {}
    for name, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{where}: {name!r} has lora_{''.join(ab)} but not lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{where}: {name!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; expected "
                             f"[r, in] and [out, r]")
        out[name] = (a, b, _alpha(conf, name) if conf else float(a.shape[0]))
    return out


def _alpha(conf, name: str) -> float:
    from peft.utils.other import get_pattern_key

    return float(conf.alpha_pattern.get(get_pattern_key(conf.alpha_pattern.keys(), name), conf.lora_alpha))


def transformer_modules(transformer) -> Modules:
    """The trained adapter of a transformer (lora.add_lora's), from the uncompiled module."""
    conf = getattr(transformer, "_orig_mod", transformer).peft_config["default"]
    return {n: (a, b, _alpha(conf, n)) for n, (a, b, _) in modules_of(lora_state_dict(transformer), None).items()}


# ---------------------------------------------------------------- writing: modules -> state dict + header


def to_diffusers(mods: Modules) -> tuple[dict, dict]:
    """PEFT keys, the LoraConfig that diffusers' load_lora_adapter builds from ranks and alphas (get_peft_kwargs)."""
    from diffusers.utils.peft_utils import get_peft_kwargs

    sd = _peft_keys(mods)
    bare = {k.removeprefix(f"{PREFIX}."): v for k, v in sd.items()}
    conf = get_peft_kwargs({f"^{m}.lora_B.weight": a.shape[0] for m, (a, _, _) in mods.items()},
                           network_alpha_dict={f"{m}.alpha": alpha for m, (_, _, alpha) in mods.items()},
                           peft_state_dict=bare)
    meta = {f"{PREFIX}.{k}": v for k, v in conf.items()}
    return sd, {"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True)}


def to_comfyui(mods: Modules) -> tuple[dict, dict]:
    """PEFT keys plus `transformer.<module>.alpha` (0-d fp32, what ComfyUI's .item() and diffusers' network_alphas
    take); no lora_adapter_metadata, which diffusers refuses beside alpha tensors."""
    sd = _peft_keys(mods)
    sd.update({f"{PREFIX}.{m}.alpha": torch.tensor(float(alpha)) for m, (_, _, alpha) in mods.items()})
    return sd, {"format": "pt"}


def _peft_keys(mods: Modules) -> dict:
    return {f"{PREFIX}.{m}.lora_{ab}.weight": t for m, (a, b, _) in mods.items() for ab, t in (("A", a), ("B", b))}


# diffusers module -> (BFL module, member of the fused BFL module or None): FLUX.1's layout, as ComfyUI's
# comfy/utils.py flux_to_diffusers and diffusers' _convert_kohya_flux_lora_to_diffusers map it
_DOUBLE = {"attn.to_q": ("img_attn_qkv", 0), "attn.to_k": ("img_attn_qkv", 1), "attn.to_v": ("img_attn_qkv", 2),
           "attn.add_q_proj": ("txt_attn_qkv", 0), "attn.add_k_proj": ("txt_attn_qkv", 1),
           "attn.add_v_proj": ("txt_attn_qkv", 2), "attn.to_out.0": ("img_attn_proj", None),
           "attn.to_add_out": ("txt_attn_proj", None), "ff.net.0.proj": ("img_mlp_0", None),
           "ff.net.2": ("img_mlp_2", None), "ff_context.net.0.proj": ("txt_mlp_0", None),
           "ff_context.net.2": ("txt_mlp_2", None), "norm1.linear": ("img_mod_lin", None),
           "norm1_context.linear": ("txt_mod_lin", None)}
_SINGLE = {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
           "proj_mlp": ("linear1", 3), "proj_out": ("linear2", None), "norm.linear": ("modulation_lin", None)}
OUTSIDE_BLOCKS = {"x_embedder": "img_in", "context_embedder": "txt_in",
                  "time_text_embed.timestep_embedder.linear_1": "time_in_in_layer",
                  "time_text_embed.timestep_embedder.linear_2": "time_in_out_layer",
                  "time_text_embed.text_embedder.linear_1": "vector_in_in_layer",
                  "time_text_embed.text_embedder.linear_2": "vector_in_out_layer",
                  "time_text_embed.guidance_embedder.linear_1": "guidance_in_in_layer",
                  "time_text_embed.guidance_embedder.linear_2": "guidance_in_out_layer",
                  "proj_out": "final_layer_linear", "norm_out.linear": "final_layer_adaLN_modulation_1"}
_FUSED = {"img_attn_qkv": 3, "txt_attn_qkv": 3, "linear1": 4}  # members: q, k, v (, proj_mlp)
_BLOCK = re.compile(r"(?P<single>single_)?transformer_blocks\.(?P<i>\d+)\.(?P<rest>.+)")


def bfl_name(module: str) -> tuple[str, int | None]:
    """('double_blocks_0_img_attn_qkv', 0) for 'transformer_blocks.0.attn.to_q', etc."""
    m = _BLOCK.fullmatch(module)
    table, name = (_SINGLE if m["single"] else _DOUBLE, m["rest"]) if m else (None, module)
    hit = table.get(name) if table else (OUTSIDE_BLOCKS[name], None) if name in OUTSIDE_BLOCKS else None
    if hit is None:
        raise ValueError(f"module {module!r} has no name in kohya's FLUX.1 layout (BFL names: double / single block "
                         f"attention, MLP and modulation Linears, img_in, txt_in, time_in, vector_in, guidance_in, "
                         f"final_layer)")
    return (f"{'single' if m['single'] else 'double'}_blocks_{m['i']}_{hit[0]}" if m else hit[0]), hit[1]


def to_kohya(mods: Modules) -> tuple[dict, dict]:
    """lora_unet_<BFL module>.lora_down.weight / lora_up.weight / alpha; fused modules as _fuse writes them. The
    final layer's scale goes into its weights (alpha = rank): diffusers' converter reads no alpha there."""
    single: dict[str, tuple] = {}
    fused: dict[str, dict[int, tuple]] = {}
    for module, lora in mods.items():
        name, member = bfl_name(module)
        if member is None:
            single[name] = lora
        else:
            fused.setdefault(name, {})[member] = lora
    sd = {}
    for name, (a, b, alpha) in single.items():
        if name.startswith("final_layer"):
            b, alpha = b * (alpha / a.shape[0]), float(a.shape[0])
        if name == "final_layer_adaLN_modulation_1":
            b = torch.cat(b.chunk(2)[::-1])  # diffusers' norm_out emits (scale, shift), BFL's (shift, scale)
        sd.update(_kohya_keys(name, a, b, alpha))
    for name, members in fused.items():
        sd.update(_kohya_keys(name, *_fuse(name, members)))
    return sd, {"format": "pt", "ss_network_module": "networks.lora_flux"}


def _kohya_keys(name: str, down, up, alpha: float) -> dict:
    return {f"lora_unet_{name}.lora_down.weight": down, f"lora_unet_{name}.lora_up.weight": up,
            f"lora_unet_{name}.alpha": torch.tensor(float(alpha))}


def _fuse(name: str, members: dict[int, tuple]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One LoRA on a fused BFL Linear (qkv: q, k, v rows; linear1: q, k, v, proj_mlp rows) from its members':
    down = cat(A_q, A_k, A_v[, A_mlp]) [n w, in], up = block-diagonal(B_q, B_k, B_v[, B_mlp]) [rows, n w], every
    block w = the largest member rank wide (zero-padded), and a member the LoRA did not train gets zero blocks. That
    is the layout diffusers' converter recognises as "sparse" (rank divisible by n, off-diagonal blocks zero) and
    splits back into the exact per-module A and B; ComfyUI applies up @ down to the fused weight, the same delta.
    alpha = scale * n w keeps kohya's scale alpha / rank-of-the-fused-module; members of different scales have
    theirs folded into B (alpha = rank)."""
    n = next(v for k, v in _FUSED.items() if name.endswith(k))
    any_a, any_b, _ = next(iter(members.values()))
    dim = any_a.shape[1]  # every member reads the block's hidden states
    qkv_rows = next((b.shape[0] for j, (_, b, _) in members.items() if j < 3), dim)
    # a single block's proj_mlp is 4 x dim wide in FLUX.1 (mlp_ratio 4, FluxSingleTransformerBlock)
    rows = [qkv_rows] * 3 + ([members[3][1].shape[0] if 3 in members else 4 * dim] if n == 4 else [])
    w = max(a.shape[0] for a, _, _ in members.values())
    scales = {alpha / a.shape[0] for a, _, alpha in members.values()}
    down = any_a.new_zeros(n * w, dim)
    up = any_b.new_zeros(sum(rows), n * w)
    for j, (a, b, alpha) in members.items():
        r, top = a.shape[0], sum(rows[:j])
        down[j * w:j * w + r] = a
        up[top:top + rows[j], j * w:j * w + r] = b if len(scales) == 1 else b * (alpha / r)
    if len(scales) == 1:
        a, _, alpha = next(iter(members.values()))
        return down, up, alpha * (n * w) / a.shape[0]
    return down, up, float(n * w)


WRITERS = {"comfyui": to_comfyui, "kohya": to_kohya, "diffusers": to_diffusers}  # = TrainConfig.lora_format


# ---------------------------------------------------------------- a whole transformer: diffusers -> BFL names

# diffusers module -> BFL module, as diffusers' convert_flux_transformer_checkpoint_to_diffusers maps them back
# (loaders/single_file_utils.py, 0.42); RMS norms: diffusers `.weight` <-> BFL `.scale`
MODEL_OUTSIDE = {"x_embedder": "img_in", "context_embedder": "txt_in",
                 "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
                 "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
                 "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
                 "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
                 "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
                 "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
                 "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1"}
MODEL_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
                "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
                "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
                "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
MODEL_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2", "attn.norm_q": "norm.query_norm",
                "attn.norm_k": "norm.key_norm"}
MODEL_FUSED = {False: {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),  # double blocks: rows q, k, v
                       "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")},
               True: {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}}  # single blocks


def to_bfl_model(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel state dict under BFL's names (fused qkv / linear1 concatenated along the rows, the
    final modulation's halves swapped back to (shift, scale)). Every key must map: an IP-Adapter's or a LoRA's
    tensors are refused, naming them."""
    out, used = {}, set()

    def put(bfl: str, dif: str, fuse: tuple[str, ...] = ()) -> None:
        for suffix in ("weight", "bias"):
            keys = [f"{dif}{m}.{suffix}" for m in fuse] if fuse else [f"{dif}.{suffix}"]
            if not all(k in sd for k in keys):
                continue
            t = torch.cat([sd[k] for k in keys]) if fuse else sd[keys[0]]
            if dif == "norm_out.linear":  # diffusers' AdaLayerNormContinuous emits (scale, shift), BFL's (shift, scale)
                t = torch.cat(t.chunk(2)[::-1])
            out[f"{bfl}.{'scale' if bfl.endswith('_norm') else suffix}"] = t
            used.update(keys)

    for dif, bfl in MODEL_OUTSIDE.items():
        put(bfl, dif)
    blocks = sorted({(m["single"] is not None, int(m["i"])) for k in sd if (m := _BLOCK.fullmatch(k))})
    for single, i in blocks:
        dif, bfl = f"{'single_' if single else ''}transformer_blocks.{i}.", f"{'single' if single else 'double'}_blocks.{i}."
        for d, b in (MODEL_SINGLE if single else MODEL_DOUBLE).items():
            put(bfl + b, dif + d)
        for b, members in MODEL_FUSED[single].items():
            put(bfl + b, dif, members)
    left = sorted(set(sd) - used)
    if left:
        raise ValueError(f"{len(left)} of {len(sd)} tensors have no BFL name (a plain FluxTransformer2DModel is "
                         f"expected; an IP-Adapter or LoRA inside it is not part of the model file): {_few(left)}")
    return out


def read_transformer(src) -> dict[str, torch.Tensor]:
    """Every tensor of a diffusers transformer folder (config.json + one or several *.safetensors), or of the
    transformer/ inside a train.mode='full' run folder."""
    from safetensors.torch import load_file

    src = Path(src)
    folder = src / "transformer" if (src / "transformer" / "config.json").is_file() else src
    files = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not files:
        raise ValueError(f"--format comfyui-model: {str(src)!r} is not a diffusers transformer folder (config.json and "
                         f"*.safetensors; train.mode='full' writes <out_dir>/transformer)")
    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def convert_model(src, dst) -> int:
    """A transformer folder -> one BFL-named safetensors file (atomically); returns the number of tensors."""
    sd = to_bfl_model(read_transformer(src))
    save_atomic(sd, Path(dst), {"format": "pt"})
    return len(sd)


# ---------------------------------------------------------------- files


def save_lora_as(transformer, path: Path, fmt: str) -> None:
    """train.py's final LoRA file in TrainConfig.lora_format (diffusers: lora.save_lora, the LoraConfig as saved)."""
    if fmt not in WRITERS:
        raise ValueError(f"train.lora_format: expected one of {' | '.join(WRITERS)}, got {fmt!r}")
    kind = adapters.transformer_kind(transformer)
    if kind != "lora":  # lokr / loha / dora: ComfyUI's keys (adapters.py); dora's diffusers file is save_lora's
        adapters.check_format(kind, fmt, "train.lora_format")
        if fmt == "comfyui":
            return save_atomic(adapters.comfyui_file(transformer), Path(path), {"format": "pt"})
    if fmt == "diffusers":
        return save_lora(transformer, path)
    sd, header = WRITERS[fmt](transformer_modules(transformer))
    save_atomic(sd, Path(path), header)


def convert_file(src, dst, fmt: str) -> Modules:
    """Read any LoRA file lora.read_lora reads, write it in `fmt` (atomically); returns its modules."""
    if fmt not in WRITERS:
        raise ValueError(f"--format: expected one of {' | '.join(WRITERS)}, got {fmt!r}")
    state_dict, metadata = read_lora(src)
    kind = adapters.file_kind(state_dict)
    if kind != "lora":
        return convert_lycoris(state_dict, src, dst, fmt, kind)
    mods = modules_of(state_dict, metadata, where=f"LoRA file {str(src)!r}")
    sd, header = WRITERS[fmt](mods)
    save_atomic(sd, Path(dst), header)
    return mods


def convert_lycoris(state_dict: dict, src, dst, fmt: str, kind: str) -> dict:
    """A lokr / loha file (`transformer.*` or SimpleTuner's `lycoris_*` keys, both read by ComfyUI) is already in the
    comfyui format: copied, keys checked; the other formats cannot hold it (adapters.REFUSED). DoRA: refused, since
    either direction needs the base model's weights (dora_scale = m ||W|| / ||W + s dW||): train.py writes the
    comfyui file, and every checkpoint's lora.safetensors is the diffusers one."""
    where = f"LoRA file {str(src)!r}"
    adapters.check_format(kind, fmt, where)
    if kind == "dora":
        raise ValueError(f"{where}: a DoRA file converts only with the base model's weights (ComfyUI's dora_scale "
                         f"is m * ||W|| / ||W + s dW||); the run's checkpoints/*/lora.safetensors is the diffusers "
                         f"file and its lora.safetensors (train.lora_format comfyui) the ComfyUI one")
    out = {}
    for k, v in state_dict.items():
        m = adapters.KEY.fullmatch(k)
        if m is None or not m["module"].startswith((f"{PREFIX}.", "lycoris_")):
            raise ValueError(f"{where}: key {k!r} is not '{PREFIX}.<diffusers module>.<suffix>' or "
                             f"'lycoris_<diffusers module with _>.<suffix>'")
        out[k] = v
    save_atomic(out, Path(dst), {"format": "pt"})
    return {adapters.KEY.fullmatch(k)["module"]: None for k in out}  # the modules, for main's count


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="convert.py", description=__doc__.splitlines()[0])
    ap.add_argument("src", metavar="IN", nargs="+",
                    help="a LoRA .safetensors (diffusers, comfyui, kohya, or a layout diffusers converts); "
                         "--format comfyui-model: a transformer folder; --merge: one or more adapter files; "
                         "--extract: the fine-tuned transformer folder (train.mode full's <out_dir>/transformer)")
    ap.add_argument("dst", metavar="OUT", help="the .safetensors to write (--merge: a folder; OUT/transformer/)")
    ap.add_argument("--format", choices=[*WRITERS, "comfyui-model"],
                    help="comfyui: diffusers keys + .alpha tensors (ComfyUI and diffusers); kohya: lora_unet_* on "
                         "BFL names (kohya, musubi, ComfyUI, diffusers); diffusers: keys + LoraConfig metadata; "
                         "comfyui-model: IN is a transformer folder (train.mode full), OUT one BFL-named model file. "
                         "--merge: diffusers (default: OUT/transformer/) or comfyui-model (OUT one BFL file); "
                         "--extract: the LoRA's format (default comfyui)")
    ap.add_argument("--merge", action="store_true", help="bake the adapters IN into --base at --strength")
    ap.add_argument("--extract", type=int, metavar="RANK", help="a LoRA of this rank from the fine-tune IN minus "
                                                                 "--base, by truncated SVD per Linear")
    ap.add_argument("--base", metavar="MODEL", help="--merge / --extract: the base model (a diffusers folder, its "
                                                    "transformer folder, or a Hub id); not quantized")
    ap.add_argument("--strength", type=float, nargs="+", default=[1.0], metavar="S",
                    help="--merge: one strength for every adapter, or one per adapter file (default 1.0)")
    ap.add_argument("--device", default="cpu", help="--merge / --extract: where the arithmetic runs (cpu, cuda:0)")
    args = ap.parse_args(argv)
    if args.merge or args.extract is not None:
        return merge_or_extract(ap, args)
    if args.format is None or len(args.src) != 1:
        ap.error("convert one file: IN OUT --format FORMAT (several IN only with --merge)")
    src = args.src[0]
    if args.format == "comfyui-model":
        print(f"wrote {args.dst}: {convert_model(src, args.dst)} tensors under BFL names")
        return Path(args.dst)
    mods = convert_file(src, args.dst, args.format)
    print(f"wrote {args.dst}: {len(mods)} modules in the {args.format} format")
    outside = sorted(m for m in mods if m in OUTSIDE_BLOCKS)
    if args.format == "kohya" and outside:
        print(f"note: diffusers 0.42's kohya reader drops LoRAs outside the blocks ({', '.join(outside)}); "
              f"for diffusers use the comfyui or diffusers format")
    return Path(args.dst)


def merge_or_extract(ap, args) -> Path:
    """--merge: OUT/transformer/ (or, with --format comfyui-model, one BFL file); --extract: a LoRA file (merge.py)."""
    if args.merge and args.extract is not None:
        ap.error("--merge and --extract: one at a time")
    if not args.base:
        ap.error(f"--{'merge' if args.merge else 'extract'} needs --base MODEL (the model the adapter was trained on)")
    if args.merge:
        if args.format not in (None, "diffusers", "comfyui-model"):
            ap.error(f"--merge writes a model: --format diffusers (a transformer/ folder) or comfyui-model, not "
                     f"{args.format}")
        strengths = args.strength * len(args.src) if len(args.strength) == 1 else args.strength
        transformer = merge_adapters(args.base, args.src, strengths, args.device)
        if args.format == "comfyui-model":
            sd = to_bfl_model({k: v.cpu() for k, v in transformer.state_dict().items()})
            save_atomic(sd, Path(args.dst), {"format": "pt"})
            print(f"wrote {args.dst}: {args.base} with {len(args.src)} adapter(s) merged, {len(sd)} tensors under BFL "
                  f"names")
            return Path(args.dst)
        save_transformer_folder(transformer, Path(args.dst) / "transformer")
        print(f"wrote {Path(args.dst) / 'transformer'}: {args.base} with {len(args.src)} adapter(s) merged at "
              f"strength {', '.join(map(str, strengths))} ({transformer.dtype})")
        return Path(args.dst) / "transformer"
    if len(args.src) != 1 or args.format == "comfyui-model":
        ap.error("--extract: one fine-tuned transformer folder IN, and a LoRA --format (comfyui, kohya, diffusers)")
    mods, energy, biases = extract_lora(args.src[0], args.base, args.extract, args.device)
    fmt = args.format or "comfyui"
    sd, header = WRITERS[fmt](mods)
    save_atomic(sd, Path(args.dst), header)
    print(f"wrote {args.dst}: rank {args.extract} LoRA of {len(mods)} Linears in the {fmt} format; energy retained "
          f"(sum of kept / all squared singular values of the delta) per layer kind:")
    for kind, (n, frac) in energy.items():
        print(f"  {kind:<48} {n:>4} layers  {100 * frac:7.3f} %")
    if biases:
        print(f"note: {len(biases)} Linears' biases changed in the fine-tune (e.g. {biases[0]}); a LoRA holds no bias, "
              f"so the extracted LoRA leaves them at the base's")
    return Path(args.dst)


def cli(argv: list[str] | None = None) -> Path:
    try:
        return main(argv)
    except ValueError as e:  # not a LoRA, unknown module, bad shapes: the message, not a traceback
        print(f"convert.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    quiet.install()
    cli()
