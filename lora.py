"""The LoRA contract: add a peft adapter for training, save it in the format FluxKontextPipeline.load_lora_weights
reads unchanged, read and check such a file, load / scale / unload adapters for sampling, and training checkpoints
(save, resume, prune).

The file format, written and parsed only here: safetensors with keys `transformer.<module>.lora_A.weight` /
`lora_B.weight` (diffusers' save_lora_weights layout) and the adapter's LoraConfig (r, lora_alpha, targets) as JSON
in the header under "lora_adapter_metadata". read_lora also takes the layouts diffusers converts (kohya, ComfyUI,
BFL names, PEFT keys with `.alpha` tensors); convert.py writes the comfyui and kohya ones. The other adapter kinds
(LoKr, LoHa, DoRA: train.adapter) live in adapters.py; add_lora, read_lora and load_lora hand them over to it.
"""

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import adapters
from cache import save_atomic
from config import Config, TrainConfig, to_json
from optim import flat_state, unflat_state
from region import load_region, save_region

PREFIX = "transformer"  # diffusers' LoRA key prefix for the transformer (FluxKontextPipeline.transformer_name)


# ---------------------------------------------------------------- training: add and save


def add_lora(transformer, cfg: TrainConfig):
    """The train.adapter kind (adapters.py: lora, lokr, loha, dora through peft); returns its parameters."""
    adapters.check_base(transformer, cfg.adapter)
    transformer.add_adapter(adapters.peft_config(cfg, transformer))
    params = [p for n, p in transformer.named_parameters() if adapters.is_trained(n)]
    if not params:
        raise ValueError(f"train.target_modules {list(cfg.target_modules)} matched no module of the transformer")
    for p in params:
        p.data = p.data.float()  # fp32 master LoRA weights; the frozen base keeps its own dtype
    return params


def lora_state_dict(transformer) -> dict:
    """diffusers-format LoRA: transformer.<module>.lora_A.weight / lora_B.weight (from the uncompiled module)."""
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(getattr(transformer, "_orig_mod", transformer))
    return {f"{PREFIX}.{k}": v.detach().float().cpu().contiguous() for k, v in sd.items()}


def save_lora(transformer, path: Path) -> None:
    """One safetensors file FluxKontextPipeline.load_lora_weights reads unchanged. The adapter's LoraConfig
    (rank, alpha, targets) goes into the metadata exactly as diffusers' save_lora_weights writes it
    ("transformer.<field>" keys under "lora_adapter_metadata")."""
    conf = getattr(transformer, "_orig_mod", transformer).peft_config["default"].to_dict()
    meta = {f"{PREFIX}.{k}": sorted(v) if isinstance(v, set) else v for k, v in conf.items()}
    save_atomic(lora_state_dict(transformer), Path(path),
                {"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True, default=str)})


def new_run_id() -> str:
    return hashlib.sha256(f"{os.getpid()}-{time.time_ns()}".encode()).hexdigest()[:12]


def save_checkpoint(out_dir: Path, transformer, optimizer, step: int, cfg: Config, keep: int, run: str,
                    region=None, ema=None) -> Path:
    """A folder named by the hash of its trained weights (the LoRA's and the region token's, and their EMA
    (ema.EMA) when one is kept: content, not step), written under a temp name and renamed; `latest.json` then points
    at it (also atomically). Old checkpoints of this run (`run`, kept across resumes) are pruned to `keep`; other
    runs' are never touched."""
    lora = lora_state_dict(transformer)
    own = {**lora, **({f"region.{k}": v.detach().float().cpu() for k, v in region.state_dict().items()}
                      if region is not None else {}), **(ema.state_dict() if ema is not None else {})}
    digest = hashlib.sha256(b"".join(own[k].numpy().tobytes() for k in sorted(own))).hexdigest()[:16]
    ckpts = out_dir / "checkpoints"
    final = ckpts / f"lora-{digest}"
    if not final.exists():
        tmp = ckpts / f".tmp-{digest}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_lora(transformer, tmp / "lora.safetensors")
        if region is not None:
            save_region(region, tmp / "region.safetensors")
        if ema is not None:
            save_atomic(ema.state_dict(), tmp / "ema.safetensors")
        opt = optimizer.state_dict()
        tensors, scalars = flat_state(opt["state"])  # bitsandbytes nests its 8-bit state one level deeper
        save_atomic(tensors, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "run": run, "param_groups": opt["param_groups"],
                                                    "scalars": scalars}, default=float))
        (tmp / "config.json").write_text(to_json(cfg))
        os.replace(tmp, final)
    _write_json_atomic(ckpts / "latest.json", {"step": step, "path": final.name, "run": run})
    _prune(ckpts, keep, run)
    return final


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _state(d: Path) -> dict | None:
    try:
        return json.loads((d / "state.json").read_text())
    except (OSError, ValueError):
        return None


def _checkpoint_dirs(ckpts: Path) -> list[Path]:
    """Checkpoint folders: lora-<hash> (LoRA mode) and full-<hash> (full.py)."""
    return sorted([*ckpts.glob("lora-*"), *ckpts.glob("full-*")])


def _prune(ckpts: Path, keep: int, run: str) -> None:
    found = [(st["step"], d) for d in _checkpoint_dirs(ckpts) if (st := _state(d)) and st.get("run") == run]
    for _, d in sorted(found)[:-keep] if keep > 0 else []:
        shutil.rmtree(d, ignore_errors=True)


def _unreadable(d: Path) -> str | None:
    """Why checkpoint folder d cannot be resumed from, or None if every file reads."""
    st = _state(d)
    if st is None or "step" not in st:
        return "state.json missing or unreadable"
    for f in st.get("files", ("lora.safetensors", "optimizer.safetensors")):  # full.py lists its shard files
        try:
            load_file(str(d / f))
        except (OSError, SafetensorError) as e:
            return f"{f}: {e}"
    return None


def resolve_resume(resume: str, out_dir: Path, log=print) -> Path | None:
    """The checkpoint folder to continue from. "latest": the one latest.json names, or, if that one does not read
    (a truncated write, a deleted folder), the newest intact one, said in the log."""
    if not resume:
        return None
    if resume != "latest":
        path = Path(resume)
        if not (path / "state.json").is_file():
            raise ValueError(f"--resume {resume}: expected a checkpoint folder with state.json and lora.safetensors")
        return path
    ckpts = out_dir / "checkpoints"
    named = []
    if (ckpts / "latest.json").is_file():
        try:
            named = [ckpts / json.loads((ckpts / "latest.json").read_text())["path"]]
        except (ValueError, KeyError):
            pass
    others = sorted((d for d in _checkpoint_dirs(ckpts) if d not in named and _state(d)),
                    key=lambda d: -_state(d).get("step", 0))
    skipped = []
    for d in named + others:
        why = _unreadable(d) if d.is_dir() else "missing"
        if why is None:
            if skipped:
                log(f"--resume latest: skipped {'; '.join(skipped)}; resuming from {d}")
            return d
        skipped.append(f"{d.name} ({why})")
    if not skipped:
        raise ValueError(f"--resume latest: no {ckpts / 'latest.json'} (no checkpoint saved yet in {out_dir})")
    raise ValueError(f"--resume latest: no readable checkpoint in {ckpts} (tried {'; '.join(skipped)})")


def _changed(ckpt: Path, cfg: Config) -> list[tuple[str, object, object]] | None:
    """(field, the checkpoint's config.json value, cfg's) for each field that differs (resume, overwrite aside), or
    None when the checkpoint has no readable config.json."""
    try:
        saved = json.loads((ckpt / "config.json").read_text())
    except (OSError, ValueError):
        return None
    now = json.loads(to_json(cfg))

    def leaves(d, pre=""):
        for k, v in d.items():
            yield from leaves(v, f"{pre}{k}.") if isinstance(v, dict) else [(f"{pre}{k}", v)]

    a, b = dict(leaves(saved)), dict(leaves(now))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in ("resume", "overwrite")]


def config_differences(ckpt: Path, cfg: Config) -> list[str]:
    """Fields whose value differs between the checkpoint's config.json and cfg (resume, overwrite aside)."""
    changed = _changed(ckpt, cfg)
    if changed is None:
        return ["(the checkpoint has no readable config.json)"]
    return [f"{k}: {old!r} -> {new!r}" for k, old, new in changed]


# Fields that fix the shapes and meaning of a checkpoint's trained tensors: a resume must keep them
SHAPING = ("train.mode", "train.adapter", "train.rank", "train.alpha", "train.target_modules", "train.lokr_factor",
           "train.lokr_decompose_both", "train.region_token", "train.region_grid", "train.full_modules")


def resume_problems(ckpt: Path, cfg: Config) -> list[str]:
    """The SHAPING fields on which cfg and the checkpoint's config.json differ, worded for the user; checked before
    any model loads (the tensors themselves are checked again against the model when they load)."""
    return [f"--resume {ckpt}: the checkpoint was trained with {k} = {old!r}, the config says {new!r}; resume with "
            f"the checkpoint's value (or start afresh with --overwrite / another --out-dir)"
            for k, old, new in _changed(ckpt, cfg) or [] if k in SHAPING]


def load_checkpoint(path: Path, transformer, optimizer, region=None, ema=None, log=print) -> tuple[int, str]:
    """Restore LoRA weights (and the region token's, and `ema`'s average), and the optimizer state; return (the step
    to continue from, the run id to keep). A checkpoint without an EMA starts `ema` from the restored weights (said in
    the log)."""
    if (_state(Path(path)) or {}).get("mode") == "full":
        raise ValueError(f"{path}: a full fine-tune checkpoint (train.mode='full'); a LoRA run resumes only lora-*")
    lora = load_file(str(path / "lora.safetensors"))
    own = {f"{PREFIX}.{n}": p for n, p in _lora_named_params(transformer)}
    missing = set(own) ^ set(lora)
    if missing:
        raise ValueError(f"{path}: LoRA keys differ from the model's (e.g. {sorted(missing)[:3]}): "
                         f"was it trained with other target_modules or rank?")
    shapes = [(k, tuple(lora[k].shape), tuple(p.shape)) for k, p in own.items() if lora[k].shape != p.shape]
    if shapes:
        k, saved, want = shapes[0]
        raise ValueError(f"{path}: {len(shapes)} LoRA tensors differ in shape from the model's, e.g. {k}: saved "
                         f"{saved}, model {want}: was it trained with another train.rank?")
    has_region = (path / "region.safetensors").is_file()
    if (region is not None) != has_region:
        raise ValueError(f"{path}: the checkpoint {'has' if has_region else 'has no'} region token but the config "
                         f"{'does not train one' if has_region else 'trains one'} (train.region_token)")
    saved_region = load_region(path / "region.safetensors") if has_region else None
    if saved_region is not None and saved_region.grid != region.grid:
        raise ValueError(f"{path}: region token grid {saved_region.grid}, the config's train.region_grid is "
                         f"{region.grid}")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(lora[k])
        if saved_region is not None:
            region.load_state_dict(saved_region.state_dict())
    if ema is not None and (path / "ema.safetensors").is_file():
        ema.load_state_dict(load_file(str(path / "ema.safetensors")), f"{path / 'ema.safetensors'}")
    elif ema is not None:
        ema.shadow = [p.detach().float().clone() for p in ema.params]
        log(f"{path} holds no EMA (trained with train.ema_decay 0): the EMA starts from its weights")
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict({"state": unflat_state(tensors, state["scalars"]), "param_groups": state["param_groups"]})
    return int(state["step"]), state.get("run") or new_run_id()


def _lora_named_params(transformer):
    """LoRA parameters under the names get_peft_model_state_dict uses (adapter name dropped)."""
    base = getattr(transformer, "_orig_mod", transformer)
    return [(adapters.state_key(n), p) for n, p in base.named_parameters() if adapters.adapter_of(n) == "default"]


# ---------------------------------------------------------------- sampling: read, check, load, scale, unload


_LORA_KEY = re.compile(rf"{PREFIX}\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
_FORMAT = ("keys 'transformer.<module>.lora_A.weight' / 'lora_B.weight', as FluxKontextPipeline.save_lora_weights "
           "writes")


def read_lora(path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state_dict, adapter metadata or None) of a LoRA safetensors file. The metadata (r, lora_alpha, targets) is
    the JSON that save_lora_weights stores in the header under 'lora_adapter_metadata'.

    Files in other layouts (kohya / sd-scripts / musubi `lora_unet_*`, ComfyUI `diffusion_model.*`, BFL names,
    xlabs, fal; PEFT keys with `.alpha` tensors) go through diffusers' own converter,
    FluxKontextPipeline.lora_state_dict, as load_lora_weights does (_foreign_lora)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"LoRA file {str(path)!r} does not exist")
    try:
        state_dict = load_file(path)
        with safe_open(path, "pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"LoRA file {str(path)!r} is not a readable safetensors file: {e}") from None
    bad = [k for k, v in state_dict.items()
           if (not torch.isfinite(v).all() if v.is_floating_point() else not k.endswith("alpha"))]
    if bad:  # a diverged run's file samples to black (NaN) or noise: refuse it here, before any model loads
        raise ValueError(f"LoRA file {str(path)!r}: {len(bad)} of {len(state_dict)} tensors are not finite floating "
                         f"point (NaN / inf, or an integer dtype): {_few(bad)}; it came from a run that diverged, "
                         f"or it is not a LoRA")
    raw = header.get("lora_adapter_metadata")
    try:
        metadata = json.loads(raw) if raw else None
    except json.JSONDecodeError as e:
        raise ValueError(f"LoRA file {str(path)!r}: its 'lora_adapter_metadata' is not valid JSON: {e}") from None
    if adapters.file_kind(state_dict) != "lora":  # lokr / loha / dora: adapters.py reads them (load_lora)
        return state_dict, metadata
    if state_dict and not all(_LORA_KEY.fullmatch(k) for k in state_dict):
        return _foreign_lora(state_dict, metadata, path)
    return state_dict, metadata


_SHAPES = "diffusers' kohya converter assumes FLUX.1's full size (linear1 split 3072/3072/3072/12288)"
_ALPHA_KEY = re.compile(rf"{PREFIX}\.(?P<module>.+)\.alpha")


def _foreign_lora(state_dict: dict, metadata: dict | None, path: Path) -> tuple[dict, dict | None]:
    """A LoRA in another layout, converted by FluxKontextPipeline.lora_state_dict (kohya-style formats come back
    with alpha / rank folded into the weights, PEFT keys with their `.alpha` tensors as network_alphas). Network
    alphas become the LoraConfig that diffusers' load_lora_adapter would build from them (get_peft_kwargs), so
    the result loads with load_lora_adapter(metadata=...) exactly as load_lora_weights loads the file."""
    from diffusers import FluxKontextPipeline
    from diffusers.utils.peft_utils import get_peft_kwargs

    where = f"LoRA file {str(path)!r}"
    alphas = [k for k in state_dict if _ALPHA_KEY.fullmatch(k)]
    if alphas and metadata is not None:  # load_lora_adapter refuses the pair too ("Both network_alphas and ...")
        raise ValueError(f"{where} holds both '.alpha' tensors ({_few(alphas)}) and 'lora_adapter_metadata': "
                         f"diffusers refuses such a file; keep one of the two")
    try:
        converted, network_alphas = FluxKontextPipeline.lora_state_dict(dict(state_dict), return_alphas=True)
    except (AssertionError, ValueError, KeyError, NotImplementedError, IndexError) as e:
        odd = [k for k in state_dict if not _LORA_KEY.fullmatch(k)]
        raise ValueError(f"{where}: {len(odd)} of {len(state_dict)} keys are not in the supported format "
                         f"({_FORMAT}) and diffusers' FluxKontextPipeline.lora_state_dict does not convert them "
                         f"({type(e).__name__}: {str(e) or _SHAPES}): {_few(odd)}") from None
    text = [k for k in converted if k.startswith("text_encoder")]
    if text:
        raise ValueError(f"{where} holds {len(text)} text-encoder LoRA tensors ({_few(text)}); only transformer "
                         f"LoRAs are supported")
    # diffusers' kohya converter names the modules outside the blocks (img_in -> x_embedder, final_layer ->
    # proj_out, ...) without the 'transformer.' prefix, so load_lora_weights silently drops them (diffusers
    # 0.42.1); they are transformer modules, so they keep it here
    converted = {k if k.startswith(f"{PREFIX}.") else f"{PREFIX}.{k}": v for k, v in converted.items()}
    if not network_alphas:
        return converted, None
    bare = {k.removeprefix(f"{PREFIX}."): v for k, v in converted.items()}
    ranks = {f"^{k}": v.shape[1] for k, v in bare.items() if "lora_B" in k and v.ndim > 1}  # as load_lora_adapter
    alphas = {k.removeprefix(f"{PREFIX}."): float(v) for k, v in network_alphas.items()}
    conf = get_peft_kwargs(ranks, network_alpha_dict=alphas, peft_state_dict=bare)
    return converted, {f"{PREFIX}.{k}": v for k, v in conf.items()}


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(repr(k) for k in keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def check_lora_keys(transformer, state_dict: dict[str, torch.Tensor], path) -> None:
    """Raise a ValueError naming the file unless every key is 'transformer.<module>.lora_A|B.weight' for a Linear of
    this transformer, with both halves present and shapes lora_A [r, in_features], lora_B [out_features, r].
    (peft would only warn about unmatched keys and leave those layers without the LoRA.)"""
    from peft.tuners.tuners_utils import BaseTunerLayer

    where = f"LoRA file {str(path)!r}"
    if not state_dict:
        raise ValueError(f"{where} holds no tensors")
    unsupported = [k for k in state_dict if not _LORA_KEY.fullmatch(k)]
    if unsupported:
        raise ValueError(f"{where}: {len(unsupported)} of {len(state_dict)} keys are not in the supported format "
                         f"({_FORMAT}, or a layout that FluxKontextPipeline.lora_state_dict converts to it): "
                         f"{_few(unsupported)}")
    modules = dict(transformer.named_modules())
    halves: dict[str, dict[str, torch.Tensor]] = {}
    unmatched = []
    for key, tensor in state_dict.items():
        m = _LORA_KEY.fullmatch(key)
        module = modules.get(m["module"])
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if not isinstance(base, torch.nn.Linear):
            unmatched.append(key)
        else:
            halves.setdefault(m["module"], {})[m["ab"]] = tensor
    if unmatched:
        raise ValueError(f"{where}: {len(unmatched)} of {len(state_dict)} keys match no Linear module of the "
                         f"transformer: {_few(unmatched)}; expected e.g. "
                         f"'transformer.transformer_blocks.0.attn.to_q.lora_A.weight' (is it a LoRA for another "
                         f"model?)")
    for name, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{where}: {name!r} has lora_{''.join(ab)} but not lora_{'B' if 'A' in ab else 'A'}")
        base = modules[name].get_base_layer() if isinstance(modules[name], BaseTunerLayer) else modules[name]
        a, b = ab["A"].shape, ab["B"].shape
        if len(a) != 2 or len(b) != 2 or a[1] != base.in_features or b[0] != base.out_features or a[0] != b[1]:
            raise ValueError(f"{where}: {name!r} has lora_A {tuple(a)} and lora_B {tuple(b)}; expected [r, "
                             f"{base.in_features}] and [{base.out_features}, r] for this transformer")


def _lora_layers(transformer):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]


def _active_adapters(transformer) -> list[str]:
    layers = _lora_layers(transformer)
    return list(layers[0].active_adapters) if layers else []


def check_file(transformer, state_dict: dict[str, torch.Tensor], path) -> None:
    """Every key and shape of a read adapter file (any kind) against `transformer`, which may be the meta-device
    skeleton of its config.json (load.transformer_skeleton): sample.py checks its --lora files before any weights load."""
    if adapters.file_kind(state_dict) == "lora":
        check_lora_keys(transformer, state_dict, path)
    else:
        adapters.read_modules(transformer, state_dict, f"LoRA file {str(path)!r}")


def load_lora(transformer, path, adapter_name: str = "default", scale: float = 1.0) -> None:
    """Load a LoRA file (FluxKontextPipeline.save_lora_weights format) into the transformer as `adapter_name` with
    diffusers' load_lora_adapter, as FluxKontextPipeline.load_lora_weights does, and make it active at `scale`.
    LoKr / LoHa / DoRA files (adapters.py's, ComfyUI's keys) are added by adapters.load_into; `scale` is peft's
    (set_scale: the delta times scale; for DoRA inside the weight decomposition, as diffusers' set_adapters).

    LoRAs stack: adapters already active stay active at their scales (the pipeline instead leaves only the newest
    one active). Keys are checked against the transformer before anything is loaded."""
    state_dict, metadata = read_lora(path)
    kind = adapters.file_kind(state_dict)
    if kind == "lora":
        check_lora_keys(transformer, state_dict, path)
    loaded = list(getattr(transformer, "peft_config", {}))
    if adapter_name in loaded:
        raise ValueError(f"LoRA file {str(path)!r}: adapter name {adapter_name!r} is already loaded ({loaded}); "
                         f"pick another name or unload_lora it first")
    active = _active_adapters(transformer)
    # peft draws a random init for the new layers before the file's weights replace it: inside fork_rng, so the
    # caller's generators (a notebook's) come back as they were
    cuda = sorted({p.device.index or 0 for p in transformer.parameters() if p.is_cuda})
    if kind != "lora":  # lokr / loha / dora, which diffusers 0.42 does not load for Flux (or not in ComfyUI's form)
        adapters.load_into(transformer, state_dict, metadata, path, adapter_name)
    else:
        with torch.random.fork_rng(devices=cuda):
            transformer.load_lora_adapter(state_dict, prefix=PREFIX, adapter_name=adapter_name, metadata=metadata)
    transformer.set_adapter(active + [adapter_name])  # diffusers: activation only, scales untouched
    for layer in _lora_layers(transformer):
        layer.set_scale(adapter_name, scale)  # what diffusers' set_adapters does per layer, for this adapter alone


def set_lora_scales(transformer, scales: dict[str, float]) -> None:
    """Activate exactly the named adapters, each at its scale (diffusers' set_adapters); others stay loaded, off."""
    loaded = list(getattr(transformer, "peft_config", {}))
    unknown = [n for n in scales if n not in loaded]
    if unknown:
        raise ValueError(f"set_lora_scales: no adapter named {unknown}; loaded: {loaded}")
    transformer.set_adapters(list(scales), list(scales.values()))


def unload_lora(transformer, adapter_name: str | None = None) -> None:
    """Remove one adapter (delete_adapters; the others keep their active state and scales) or, with None, all of
    them, restoring the transformer's original modules (diffusers' unload_lora). Unloading nothing is a no-op."""
    loaded = list(getattr(transformer, "peft_config", {}))
    if adapter_name is not None and adapter_name not in loaded:
        raise ValueError(f"unload_lora: no adapter named {adapter_name!r}; loaded: {loaded}")
    if adapter_name is None or loaded == [adapter_name]:
        if loaded:
            transformer.unload_lora()
        return
    still_active = [a for a in _active_adapters(transformer) if a != adapter_name]
    transformer.delete_adapters(adapter_name)
    transformer.set_adapter(still_active)  # peft would activate the first remaining adapter instead


# ---------------------------------------------------------------- CLI
