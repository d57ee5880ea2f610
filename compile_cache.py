"""torch.compile's work kept across processes, so compiling is a once-per-machine cost.

torch.compiler's portable cache artifacts ("mega-cache": inductor's FX graphs, AOT autograd's joint graphs, the
generated Triton kernels and their autotuning) are saved after the first compiled call into one file per compiled
setting, and loaded before the first compiled call of a later process, which then skips code generation (dynamo still
traces; that is the seconds a warm start costs). The file is named by a hash of what the compiled code depends on (torch /
triton versions, the GPU, and the caller's description of the model, dtypes, backends and shapes). Torch keys each
artifact by its own graph hash as well, so a file loaded for a setting it does not fit only misses; it is never wrong.

A cache, not state: a missing, unreadable or stale file is a warning and a cold compile, never an error. Files are
written atomically (a temp file renamed into place) and never overwritten.
"""

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from atomic import temp_beside


def cache_file(folder: str, what: dict) -> Path | None:
    """folder / <hash>.bin for the compiled setting `what` (JSON-able) on this machine; None when folder is ""."""
    if not folder:
        return None
    import triton  # compile only runs on CUDA, where triton is installed

    device = torch.cuda.get_device_properties(torch.cuda.current_device()) if torch.cuda.is_available() else None
    key = dict(what, torch=torch.__version__, triton=triton.__version__,
               gpu=[device.name, device.major, device.minor] if device else None)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Path(folder).expanduser() / f"{digest}.bin"


def is_compiled(transformer) -> bool:
    """Whether compile_repeated_blocks compiled the transformer's blocks (nn.Module.compile marks each one)."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in transformer.modules())


def describe(transformer, **extra) -> dict:
    """What a compiled transformer block depends on: its config, the kinds and dtypes of its modules (fp8 / 4-bit
    Linears, attention processors, LoRA layers and their ranks), whether it checkpoints, plus the caller's `extra`
    (shapes, train or sample)."""
    kinds = sorted({f"{type(m).__name__}:{p.dtype}" for m in transformer.modules() for p in m.parameters(recurse=False)}
                   | {type(m).__name__ for m in transformer.modules()})
    processors = sorted({type(m.processor).__name__ for m in transformer.modules() if hasattr(m, "processor")})
    lora = {name: [c.r, sorted(c.target_modules)] for name, c in getattr(transformer, "peft_config", {}).items()}
    return dict(extra, config=dict(transformer.config), kinds=kinds, processors=processors, lora=lora,
                checkpointing=bool(getattr(transformer, "gradient_checkpointing", False)))


def load(path: Path | None) -> bool:
    """Load the artifacts saved in `path` into this process (before the first compiled call). True if loaded."""
    if path is None or not path.is_file():
        return False
    try:
        # None: torch logged why (a corrupt file fails its checksum) and loaded nothing
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
        why = "torch loaded no artifacts from it" if info is None else ""
    except Exception as e:  # any failure only costs a cold compile  # noqa: BLE001
        why = f"{type(e).__name__}: {e}"
    if why:
        warnings.warn(f"compile cache {path}: not loaded ({why}); compiling from scratch", stacklevel=2)
    return not why


def save(path: Path | None) -> bool:
    """Write what this process compiled to `path` unless it exists (after the first compiled call). True if written."""
    if path is None or path.exists():
        return False
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is None:
        return False
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_beside(path)
        with os.fdopen(fd, "wb") as f:
            f.write(artifacts[0])
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"compile cache {path}: not written ({e})", stacklevel=2)
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        return False
    return True
