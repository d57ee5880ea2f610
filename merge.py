"""Adapters baked into the base, and a LoRA pulled out of a full fine-tune: the bodies of `convert.py --merge` and
`convert.py --extract` (convert.py writes the files).

- merge: the base transformer loaded in fp32, each adapter file loaded through lora.load_lora (diffusers'
  load_lora_adapter, so every kind load_lora reads: LoRA in any layout it converts, and what peft loads beside it) at
  its strength, then fused exactly as diffusers' `fuse_lora` + `unload_lora` do (peft's layer.merge per Linear) and
  cast back to the base's stored dtype. Memory: the whole transformer in fp32 (FLUX.1: 48 GB) on `device`.
- extract: per Linear whose weight differs between the fine-tune and the base, the truncated SVD of the delta
  (torch.linalg.svd, fp32): delta ~= B @ A with B = U_r diag(S_r) [out, r], A = V_r^T [r, in], alpha = r (scale 1).
  By Eckart-Young its squared error is the sum of the discarded squared singular values; "retained energy" is
  sum(S_r^2) / sum(S^2). Tensors are read one at a time from the safetensors files (no model is built), so memory is
  one Linear's. A LoRA holds no bias: changed biases are counted and reported, not extracted.

Quantized checkpoints (fp8, bitsandbytes 4-bit) are refused: their stored codes are not the weights a delta is taken
from or added to.
"""

import re
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

import quant
from config import ModelConfig, Part
from load import _is_local, _resolve, hub_snapshot, load_transformer
from lora import load_lora

__all__ = ["transformer_folder", "stored_dtype", "merge_adapters", "save_transformer_folder", "extract_lora",
           "layer_kind"]


def transformer_folder(path: str, what: str) -> Path:
    """The diffusers transformer folder of `path` (a model folder with transformer/, a transformer folder such as
    train.mode full's <out_dir>/transformer, or a Hub id, from its cache); a quantized one is refused."""
    cfg = ModelConfig(path=str(path))
    root, sub = _resolve(cfg, cfg.transformer, "transformer")
    if not _is_local(root):
        root = str(hub_snapshot(root, sub, "transformer"))
    folder = Path(root) / sub if sub else Path(root)
    if quant.is_quantized_checkpoint(folder):
        raise ValueError(f"{what} {str(path)!r}: {folder} is a quantized checkpoint (fp8 or bitsandbytes 4-bit): its "
                         f"stored codes are not the weights; use the bf16 / fp32 transformer it was made from")
    return folder


def _tensor_files(folder: Path) -> dict[str, tuple[Path, list]]:
    """Tensor name -> (the safetensors file holding it, its shape), sharded or not, from the headers alone."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: (f, v["shape"]) for k, v in quant.safetensors_header(f).items() if k != "__metadata__"})
    if not out:
        raise ValueError(f"{str(folder)!r} holds no *.safetensors weights")
    return out


def stored_dtype(folder: Path) -> torch.dtype:
    """The dtype most of the folder's tensors are stored in (what a merged model is written back in)."""
    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    count: dict = defaultdict(int)
    for f in sorted(folder.glob("*.safetensors")):
        for k, v in quant.safetensors_header(f).items():
            if k != "__metadata__" and v["dtype"] in names:
                count[names[v["dtype"]]] += 1
    return max(count, key=count.get) if count else torch.float32


# ---------------------------------------------------------------- merge


def merge_adapters(base: str, files: list, strengths: list[float], device: str = "cpu"):
    """The base transformer with the adapters in `files` fused in at `strengths` (one per file), as a plain
    FluxTransformer2DModel in the base's stored dtype. Files are checked (by load_lora) in order, before fusing."""
    if len(strengths) != len(files):
        raise ValueError(f"--strength: give one value for all {len(files)} adapter files or one per file, got "
                         f"{len(strengths)}")
    for f in files:
        if not Path(f).is_file():
            raise ValueError(f"adapter file {str(f)!r} does not exist")
    folder = transformer_folder(base, "--base")
    transformer = load_transformer(ModelConfig(path=str(folder), transformer=Part(dtype="fp32", device=device)))
    names = [f"merge_{i}" for i in range(len(files))]
    for name, f, s in zip(names, files, strengths):
        load_lora(transformer, f, adapter_name=name, scale=s)
    # diffusers' PeftAdapterMixin.fuse_lora (peft's merge per tuner layer, safe: a non-finite result raises) and
    # unload_lora (each tuner layer replaced by its base layer, which now holds the merged weight)
    transformer.fuse_lora(adapter_names=names, safe_fusing=True)
    transformer.unload_lora()
    return transformer.to(stored_dtype(folder))


def save_transformer_folder(transformer, folder: Path) -> None:
    """FluxTransformer2DModel.save_pretrained (config.json, safetensors sharded past 5 GB) under a temp name beside
    `folder`, then renamed over it (full.save_transformer's rule for one process)."""
    import os
    import shutil

    folder = Path(folder)
    tmp, old = folder.with_name(f".tmp-{folder.name}-{os.getpid()}"), folder.with_name(f".old-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    transformer.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- extract

_INDEX = re.compile(r"\.\d+\.")


def layer_kind(module: str) -> str:
    """A module's kind across blocks: 'transformer_blocks.*.attn.to_q' for 'transformer_blocks.3.attn.to_q'."""
    return _INDEX.sub(".*.", module, count=1)


def extract_lora(tuned: str, base: str, rank: int, device: str = "cpu", progress: bool = True):
    """(modules {diffusers module: (lora_A [r, in], lora_B [out, r], alpha = r)}, energy {kind: (layers, retained
    energy fraction)}, changed biases) of the delta tuned - base, per Linear, at rank min(rank, out, in)."""
    from safetensors import safe_open

    if rank < 1:
        raise ValueError(f"--extract: expected a rank >= 1, got {rank}")
    a_files, b_files = _tensor_files(transformer_folder(tuned, "the fine-tune")), \
        _tensor_files(transformer_folder(base, "--base"))
    missing = sorted(set(a_files) ^ set(b_files)) or sorted(k for k in a_files if a_files[k][1] != b_files[k][1])
    if missing:
        raise ValueError(f"the fine-tune and --base hold different tensors or shapes (e.g. {missing[:3]}): is --base the model "
                         f"the fine-tune started from?")

    def read(files, key):
        with safe_open(str(files[key][0]), "pt", device=device) as f:
            return f.get_tensor(key).float()

    weights = [k for k, (_, shape) in sorted(a_files.items()) if k.endswith(".weight") and len(shape) == 2]
    modules, kept, total, count, biases = {}, defaultdict(float), defaultdict(float), defaultdict(int), []
    for key in tqdm(weights, desc="extract", unit="layer", disable=not progress):
        module = key.removesuffix(".weight")
        bias = f"{module}.bias"
        if bias in a_files and not torch.equal(read(a_files, bias), read(b_files, bias)):
            biases.append(module)
        delta = read(a_files, key) - read(b_files, key)
        if not delta.any():
            continue
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.numel())
        modules[module] = ((vh[:r]).contiguous().cpu(), (u[:, :r] * s[:r]).contiguous().cpu(), float(r))
        kind = layer_kind(module)
        sq = s.double() ** 2
        kept[kind] += float(sq[:r].sum())
        total[kind] += float(sq.sum())
        count[kind] += 1
    if not modules:
        raise ValueError(f"the fine-tune {str(tuned)!r} and --base {str(base)!r} have the same Linear weights: "
                         f"nothing to extract")
    energy = {k: (count[k], kept[k] / total[k]) for k in sorted(count)}
    return modules, energy, biases

