"""The adapter kinds, all through peft: LoRA (lora.py's contract), DoRA (LoraConfig(use_dora=True)), and the
LyCORIS kinds LoKr (LoKrConfig) and LoHa (LoHaConfig). Here: the peft config per kind, which parameters train, the
result file ComfyUI reads for each kind, and loading such files (ours, SimpleTuner's `lycoris_*`) back into a
transformer, since diffusers 0.42's load_lora_weights loads no LoKr / LoHa for Flux.

The files (safetensors, keys `transformer.<diffusers module>.<suffix>`, which ComfyUI's comfy/lora.py
model_lora_keys_unet maps onto BFL weights, q / k / v / proj_mlp onto slices of the fused qkv / linear1):
- lokr: `.lokr_w1` | `.lokr_w1_a` + `.lokr_w1_b`, `.lokr_w2` | `.lokr_w2_a` + `.lokr_w2_b` (peft's tensors as
  trained) and `.alpha` where a factor is factorised. ComfyUI's delta is kron(w1, w2) * alpha / rank when a factor is
  factorised, kron(w1, w2) when both are full matrices (alpha ignored). peft scales by alpha / r always; training
  follows LyCORIS and ComfyUI instead: a Linear whose factors are both full trains at scale 1 (alpha_pattern: alpha =
  r), so the file holds the trained tensors unchanged and every tool reads the same delta.
- loha: `.hada_w1_a/_b`, `.hada_w2_a/_b`, `.alpha`: (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r, as peft trains it.
- dora: `.lora_A.weight`, `.lora_B.weight`, `.alpha`, `.dora_scale` [out, 1]. peft's DoRA weight is
  m / ||W + s dW||_row * (W + s dW) (s = alpha / r); ComfyUI's (comfy/weight_adapter/base.py weight_decompose, a
  dora_scale as long as the output axis) is dora_scale / (||W||_row + eps) * (W + s dW) with W the *base* weight, eps
  float32's. So dora_scale = m * (||W|| + eps) / ||W + s dW||: exact for these base weights at strength 1.0 only
  (ComfyUI applies strength outside the decomposition, and another base, e.g. an fp8 copy, has other norms).

`.alpha` and `.dora_scale` are float64 so that reading the file back gives peft exactly the trained numbers (ComfyUI
reads alpha with .item() and casts dora_scale to float32 itself).
"""

import re

import torch
from torch import nn

from config import TrainConfig
from kontext_kernels.fp8 import FP8Linear
from kontext_kernels.int4 import Linear4bit

KINDS = ("lora", "lokr", "loha", "dora")
PREFIX = "transformer"  # = lora.PREFIX, diffusers' transformer_name
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
DORA = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "dora_scale")
# a file's key: <module spelling>.<suffix>
KEY = re.compile(rf"(?P<module>.+)\.(?P<suffix>{'|'.join(map(re.escape, (*LOKR, *LOHA, *DORA, 'alpha')))})")
EPS = torch.finfo(torch.float32).eps  # ComfyUI's weight_decompose: finfo(weight.dtype).eps, its patch weights fp32


# ---------------------------------------------------------------- training: the peft config, the parameters


def peft_config(tc: TrainConfig, transformer):
    """The PeftConfig of train.adapter (rank, alpha, targets from the TrainConfig)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    targets = list(tc.target_modules)
    if tc.adapter in ("lora", "dora"):
        init = True if tc.lora_init == "default" else tc.lora_init
        return LoraConfig(r=tc.rank, lora_alpha=tc.alpha, target_modules=targets, init_lora_weights=init,
                          use_dora=tc.adapter == "dora")
    if tc.adapter == "loha":
        return LoHaConfig(r=tc.rank, alpha=tc.alpha, target_modules=targets)
    conf = LoKrConfig(r=tc.rank, alpha=tc.alpha, target_modules=targets, decompose_factor=tc.lokr_factor,
                      decompose_both=tc.lokr_decompose_both)
    # LyCORIS / ComfyUI scale a LoKr whose two factors are full matrices by 1, not alpha / r (module docstring)
    conf.alpha_pattern = {f"^{re.escape(n)}": float(tc.rank) for n in _targeted(conf, transformer)
                          if _lokr_full(n, transformer, tc)}
    return conf


def _targeted(conf, transformer) -> list[str]:
    from peft.tuners.tuners_utils import check_target_module_exists

    return [n for n, m in transformer.named_modules() if isinstance(m, nn.Linear) and n
            and check_target_module_exists(conf, n)]


def _lokr_full(name: str, transformer, tc: TrainConfig) -> bool:
    """Whether peft's LoKr (lokr/layer.py update_layer) makes both factors of this Linear full matrices."""
    from peft.tuners.lokr.layer import factorization

    m = transformer.get_submodule(name)
    (a, b), (c, d) = factorization(m.out_features, tc.lokr_factor), factorization(m.in_features, tc.lokr_factor)
    use_w1 = not (tc.lokr_decompose_both and tc.rank < max(a, c) / 2)
    use_w2 = not (tc.rank < max(b, d) / 2)
    return use_w1 and use_w2


def check_base(transformer, adapter: str) -> None:
    """DoRA normalises by the base weight, which peft reads as `module.weight` (dequantize_module_weight knows bnb /
    HQQ / torchao, not our layers): on FP8Linear it would read the e4m3 codes without their scales, on Linear4bit the
    zero-byte stand-in. Refused before training (config.validate refuses model.quant; this catches a quantized
    checkpoint on disk)."""
    if adapter != "dora":
        return
    quantized = [n for n, m in transformer.named_modules() if isinstance(m, (FP8Linear, Linear4bit))]
    if quantized:
        raise ValueError(f"train.adapter='dora' on a quantized transformer ({len(quantized)} fp8 / 4-bit Linears, "
                         f"e.g. {quantized[0]!r}): peft's DoRA reads the base weight to normalise and cannot "
                         f"dequantize these layers; use lora, lokr or loha on a quantized base, or a bf16 base")


def is_trained(param_name: str) -> bool:
    """Is this named parameter (peft's naming) an adapter weight?"""
    return adapter_of(param_name) is not None


# peft's parameter names: <module>.<layer name>.<adapter>[.weight], e.g. `attn.to_q.lokr_w1.default`,
# `attn.to_q.lora_A.default.weight`, `attn.to_q.lora_magnitude_vector.default.weight`
_PARAM = re.compile(r"(?P<module>.+)\.(?P<layer>(?:lora|lokr|hada)_\w+)\.(?P<adapter>[^.]+)(?P<weight>\.weight)?")


def adapter_of(param_name: str) -> str | None:
    """The adapter a peft parameter belongs to (None: not an adapter parameter)."""
    m = _PARAM.fullmatch(param_name)
    return m["adapter"] if m else None


def state_key(param_name: str) -> str:
    """The key get_peft_model_state_dict gives a parameter: the adapter name dropped, and DoRA's
    `lora_magnitude_vector.<name>.weight` shortened to `lora_magnitude_vector`."""
    m = _PARAM.fullmatch(param_name)
    if m is None:
        raise ValueError(f"{param_name!r} is not a peft adapter parameter")
    weight = "" if m["layer"] == "lora_magnitude_vector" else m["weight"] or ""
    return f"{m['module']}.{m['layer']}{weight}"


def kind_of(conf) -> str:
    """The kind of a PeftConfig."""
    peft_type = str(getattr(conf.peft_type, "value", conf.peft_type))
    if peft_type == "LORA":
        return "dora" if conf.use_dora else "lora"
    return {"LOKR": "lokr", "LOHA": "loha"}.get(peft_type, peft_type)


def transformer_kind(transformer, adapter_name: str = "default") -> str:
    return kind_of(getattr(transformer, "_orig_mod", transformer).peft_config[adapter_name])


def file_kind(state_dict: dict) -> str:
    """lokr | loha | dora (a LyCORIS or DoRA file, loaded here) | lora (lora.py's path)."""
    suffixes = {m["suffix"] for k in state_dict if (m := KEY.fullmatch(k))}
    if suffixes & set(LOKR):
        return "lokr"
    if suffixes & set(LOHA):
        return "loha"
    return "dora" if suffixes & {"lora_magnitude_vector", "dora_scale"} else "lora"


# ---------------------------------------------------------------- the result file ComfyUI reads


def _layers(transformer, adapter_name: str = "default"):
    """(module name, peft layer) for every Linear carrying the adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = getattr(transformer, "_orig_mod", transformer)
    return [(n, m) for n, m in base.named_modules() if isinstance(m, BaseTunerLayer)
            and adapter_name in _owned(m)]


def _owned(layer) -> set:
    return set(getattr(layer, "_available_adapters", None) or getattr(layer, "lora_A", {}))


def _base_weight(layer) -> torch.Tensor:
    base = layer.get_base_layer()
    if isinstance(base, (FP8Linear, Linear4bit)):
        raise ValueError(f"DoRA on a quantized Linear ({type(base).__name__}): its file needs the dense base weight")
    return base.weight.detach()


def dora_scale(magnitude, weight, lora_a, lora_b, scaling: float) -> torch.Tensor:
    """ComfyUI's dora_scale [out, 1] float64 for peft's magnitude (module docstring), from the base weight."""
    w = weight.double()
    adapted = (w + scaling * (lora_b.double() @ lora_a.double())).norm(dim=1)
    return (magnitude.double() * (w.norm(dim=1) + EPS) / adapted).reshape(-1, 1)


def magnitude_of(scale, weight, lora_a, lora_b, scaling: float) -> torch.Tensor:
    """dora_scale's inverse: peft's lora_magnitude_vector [out] (float32) for these base weights."""
    w = weight.double()
    adapted = (w + scaling * (lora_b.double() @ lora_a.double())).norm(dim=1)
    return (scale.double().reshape(-1) * adapted / (w.norm(dim=1) + EPS)).float()


def comfyui_file(transformer, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The trained lokr / loha / dora adapter as the keys ComfyUI reads (module docstring), float32 weights."""
    kind = transformer_kind(transformer, adapter_name)
    out = {}
    for name, layer in _layers(transformer, adapter_name):
        key = f"{PREFIX}.{name}"
        if kind in ("lokr", "loha"):
            for suffix in LOKR if kind == "lokr" else LOHA:
                if adapter_name in getattr(layer, suffix):
                    out[f"{key}.{suffix}"] = getattr(layer, suffix)[adapter_name].detach().float().cpu().contiguous()
            if kind == "lokr" and f"{key}.lokr_w1" in out and f"{key}.lokr_w2" in out:
                if layer.scaling[adapter_name] != 1.0:  # ComfyUI reads scale 1 for two full factors
                    raise ValueError(f"{name}: a LoKr with two full factors at scale {layer.scaling[adapter_name]}; "
                                     f"ComfyUI applies 1 (train it through adapters.peft_config)")
                continue
            out[f"{key}.alpha"] = torch.tensor(float(layer.alpha[adapter_name]), dtype=torch.float64)
        else:
            a, b = layer.lora_A[adapter_name].weight.detach(), layer.lora_B[adapter_name].weight.detach()
            m = layer.lora_magnitude_vector[adapter_name].weight.detach()
            out[f"{key}.lora_A.weight"] = a.float().cpu().contiguous()
            out[f"{key}.lora_B.weight"] = b.float().cpu().contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(layer.lora_alpha[adapter_name]), dtype=torch.float64)
            out[f"{key}.dora_scale"] = dora_scale(m, _base_weight(layer), a, b, layer.scaling[adapter_name]).cpu()
    return out


REFUSED = {  # (kind, format) -> why that file cannot hold it
    ("lokr", "kohya"): "kohya's lora_unet_* layout names BFL's fused qkv / linear1, and a Kronecker product of "
                       "q, k and v does not fuse into one",
    ("loha", "kohya"): "kohya's lora_unet_* layout names BFL's fused qkv / linear1, and a Hadamard product of q, k "
                       "and v does not fuse into one",
    ("lokr", "diffusers"): "diffusers 0.42's load_lora_weights does not load LoKr for Flux (its docs: unsupported); "
                           "the comfyui file loads in ComfyUI and in lora.load_lora / sample.py",
    ("loha", "diffusers"): "diffusers 0.42's load_lora_weights does not load LoHa for Flux (its docs: unsupported); "
                           "the comfyui file loads in ComfyUI and in lora.load_lora / sample.py",
    ("dora", "kohya"): "a DoRA's dora_scale is per output row of each diffusers Linear; kohya's fused BFL layout is "
                       "not written for it here (comfyui or diffusers)",
}


def check_format(kind: str, fmt: str, where: str) -> None:
    if (kind, fmt) in REFUSED:
        raise ValueError(f"{where}: a {kind} adapter cannot be written in the {fmt} format: {REFUSED[kind, fmt]}")


# ---------------------------------------------------------------- loading a lokr / loha / dora file


def _module_names(transformer) -> dict[str, str]:
    """Every accepted spelling of a Linear's name -> its diffusers name: `transformer.<name>` and SimpleTuner's
    `lycoris_<name with _>` (both in ComfyUI's key map)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for n, m in transformer.named_modules():
        if not n or ".base_layer" in n or _is_adapter_module(n):  # (an adapter already loaded wraps the Linear)
            continue
        if isinstance(m.get_base_layer() if isinstance(m, BaseTunerLayer) else m, nn.Linear):
            out[f"{PREFIX}.{n}"] = n
            out[f"lycoris_{n.replace('.', '_')}"] = n
    return out


def _is_adapter_module(name: str) -> bool:
    return any(f".{t}" in name for t in ("lora_A", "lora_B", "lora_embedding", "lora_magnitude_vector"))


def _base_linear(transformer, name: str):
    from peft.tuners.tuners_utils import BaseTunerLayer

    m = transformer.get_submodule(name)
    return m.get_base_layer() if isinstance(m, BaseTunerLayer) else m


def read_modules(transformer, state_dict: dict, where: str) -> tuple[str, dict[str, dict[str, torch.Tensor]]]:
    """(kind, {diffusers module: {suffix: tensor}}) of a lokr / loha / dora file, every key checked against the
    transformer's Linears before anything is loaded."""
    kind = file_kind(state_dict)
    names = _module_names(transformer)
    mods: dict[str, dict[str, torch.Tensor]] = {}
    odd = []
    for k, v in state_dict.items():
        m = KEY.fullmatch(k)
        if m is None or m["module"] not in names:
            odd.append(k)
        else:
            mods.setdefault(names[m["module"]], {})[m["suffix"]] = v
    if odd:
        bfl = any(k.startswith(("lora_unet_", "diffusion_model.")) for k in odd)
        raise ValueError(f"{where}: {len(odd)} of {len(state_dict)} keys of this {kind} file match no Linear of the "
                         f"transformer: {_few(odd)}; expected 'transformer.<diffusers module>.<suffix>' or "
                         f"'lycoris_<diffusers module with _>.<suffix>'"
                         + ("; LyCORIS files on BFL names (lora_unet_* / diffusion_model.*, fused qkv) are not "
                            "read here" if bfl else ""))
    need = {"lokr": None, "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
            "dora": ("lora_A.weight", "lora_B.weight")}[kind]
    for name, parts in mods.items():
        base = _base_linear(transformer, name)
        if kind == "lokr":
            missing = [s for s in ("lokr_w1", "lokr_w2") if s not in parts
                       and not {f"{s}_a", f"{s}_b"} <= set(parts)]
        else:
            missing = [s for s in need if s not in parts]
        if kind == "dora" and not {"lora_magnitude_vector", "dora_scale"} & set(parts):
            missing.append("dora_scale")
        if missing:
            raise ValueError(f"{where}: {name!r} lacks {', '.join(missing)} (a {kind} file)")
        if {"lokr_t2", "hada_t1", "hada_t2"} & set(parts):
            raise ValueError(f"{where}: {name!r} has a Tucker core (lokr_t2 / hada_t1): a convolution adapter, not "
                             f"for a Linear")
        got = tuple(_delta_shape(kind, parts))
        if got != (base.out_features, base.in_features):
            raise ValueError(f"{where}: {name!r}: the {kind} factors give a [{got[0]}, {got[1]}] delta; this "
                             f"transformer's Linear is [{base.out_features}, {base.in_features}]")
    if not mods:
        raise ValueError(f"{where} holds no adapter tensors")
    return kind, mods


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(repr(k) for k in keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def _factor(parts: dict, which: str) -> torch.Tensor:
    return parts[which] if which in parts else parts[f"{which}_a"] @ parts[f"{which}_b"]


def _delta_shape(kind: str, parts: dict) -> list[int]:
    if kind == "lokr":
        w1, w2 = _factor(parts, "lokr_w1"), _factor(parts, "lokr_w2")
        return [w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]]
    if kind == "loha":
        return [parts["hada_w1_a"].shape[0], parts["hada_w1_b"].shape[1]]
    return [parts["lora_B.weight"].shape[0], parts["lora_A.weight"].shape[1]]


def _rank(kind: str, parts: dict) -> int | None:
    """The rank peft must be given to build these shapes (None: a LoKr of two full factors, any rank >= half w2)."""
    if kind == "lokr":
        return next((parts[f"{w}_b"].shape[0] for w in ("lokr_w2", "lokr_w1") if f"{w}_b" in parts), None)
    return parts["hada_w1_b" if kind == "loha" else "lora_A.weight"].shape[0]


def _config_for(kind: str, mods: dict, metadata: dict | None, where: str, transformer):
    """The PeftConfig that builds exactly these modules' shapes and scales: ranks and alphas per module
    (rank_pattern / alpha_pattern), targets exactly these Linears. A missing `.alpha` means scale 1, ComfyUI's rule."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig
    from peft.tuners.lokr.layer import factorization

    meta = {k.removeprefix(f"{PREFIX}."): v for k, v in (metadata or {}).items() if k.startswith(f"{PREFIX}.")}
    ranks, alphas = {}, {}
    for name, parts in mods.items():
        r = _rank(kind, parts)
        if r is None:  # both LoKr factors full: a rank at which peft keeps w2 full, scale 1
            w2 = parts["lokr_w2"]
            r = max(w2.shape)
        ranks[name] = r
        alpha = parts.get("alpha")
        if kind == "lokr" and _rank(kind, parts) is None:
            alphas[name] = float(r)  # ComfyUI ignores alpha for two full factors
        elif alpha is not None:
            alphas[name] = float(alpha.double().item())
        elif kind == "dora" and meta:
            alphas[name] = None  # from the metadata's lora_alpha / alpha_pattern below
        else:
            alphas[name] = float(r)
    target = "^(?:" + "|".join(re.escape(n) for n in mods) + ")$"  # exactly these (peft: re.fullmatch on a str)
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    rank_pattern = {f"^{re.escape(n)}": r for n, r in ranks.items() if r != r0}
    if kind == "dora":
        if meta and not any("alpha" in p for p in mods.values()):
            conf = LoraConfig(**meta)
            conf.target_modules = target
            return conf
        a0 = alphas[next(iter(mods))]
        return LoraConfig(r=r0, lora_alpha=a0, target_modules=target, use_dora=True, rank_pattern=rank_pattern,
                          alpha_pattern={f"^{re.escape(n)}": a for n, a in alphas.items() if a != a0})
    a0 = alphas[next(iter(mods))]
    alpha_pattern = {f"^{re.escape(n)}": a for n, a in alphas.items() if a != a0}
    if kind == "loha":
        return LoHaConfig(r=r0, alpha=a0, target_modules=target, rank_pattern=rank_pattern,
                          alpha_pattern=alpha_pattern)
    # LoKr: one decompose_factor must give every module's factor shapes (peft's factorization), decompose_both
    # when a w1 is factorised
    both = any("lokr_w1_a" in p for p in mods.values())
    shapes = {n: (tuple(_factor(p, "lokr_w1").shape), tuple(_factor(p, "lokr_w2").shape)) for n, p in mods.items()}
    candidates = [-1] + sorted({s[0][0] for s in shapes.values()} | {s[0][1] for s in shapes.values()})
    for f in candidates:
        ok = True
        for n, ((a, c), (b, d)) in shapes.items():
            base = _base_linear(transformer, n)
            if factorization(base.out_features, f) != (a, b) or factorization(base.in_features, f) != (c, d):
                ok = False
                break
        if ok:
            return LoKrConfig(r=r0, alpha=a0, target_modules=target, decompose_factor=f, decompose_both=both,
                              rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    raise ValueError(f"{where}: no single LoKr decompose_factor gives this file's factor shapes (e.g. "
                     f"{next(iter(shapes.items()))}); peft's LoKr builds one factorisation rule per adapter")


def load_into(transformer, state_dict: dict, metadata: dict | None, path, adapter_name: str) -> str:
    """Add a lokr / loha / dora file to the transformer as `adapter_name` (diffusers' add_adapter with the config
    _config_for builds, then the file's tensors copied in, every key and shape checked); returns its kind.
    Activation and scale: the caller (lora.load_lora)."""
    where = f"LoRA file {str(path)!r}"
    kind, mods = read_modules(transformer, state_dict, where)
    conf = _config_for(kind, mods, metadata, where, transformer)
    cuda = sorted({p.device.index or 0 for p in transformer.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=cuda):  # peft's random init, replaced below: the caller's generators kept
        transformer.add_adapter(conf, adapter_name=adapter_name)
    try:
        sd = {}
        for name, parts in mods.items():
            layer = transformer.get_submodule(name)
            for suffix, t in parts.items():
                if suffix in ("alpha", "dora_scale"):
                    continue
                sd[f"{name}.{suffix}"] = t
            if kind == "dora" and "lora_magnitude_vector" not in parts:
                sd[f"{name}.lora_magnitude_vector"] = magnitude_of(
                    parts["dora_scale"], _base_weight(layer), parts["lora_A.weight"], parts["lora_B.weight"],
                    layer.scaling[adapter_name])
        own = {state_key(n): p for n, p in transformer.named_parameters() if adapter_of(n) == adapter_name}
        wrong = [(k, tuple(sd[k].shape), tuple(p.shape)) for k, p in own.items() if k in sd and sd[k].shape != p.shape]
        if set(own) != set(sd) or wrong:
            raise ValueError(f"{where}: peft built other {kind} tensors than the file holds (missing "
                             f"{_few(sorted(set(own) - set(sd)))}, extra {_few(sorted(set(sd) - set(own)))}, "
                             f"shapes {wrong[:2]})")
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(sd[k])  # what peft's set_peft_model_state_dict does, with the exact key / shape check
    except Exception:
        transformer.delete_adapters(adapter_name)
        raise
    return kind
