"""Helpers shared by tests (not a test module)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree


def edit_with_pipe(pipe, seed=0):
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    return torch.from_numpy(pipe(image=img, prompt="make the square red", height=48, width=64, max_area=48 * 64,
                                 num_inference_steps=4, guidance_scale=1.0, max_sequence_length=32,
                                 _auto_resize=False, output_type="np",
                                 generator=torch.Generator().manual_seed(seed)).images)


def run_interpret_tests(test_file: str) -> subprocess.CompletedProcess:
    """Run test_file's `interpret` tests in a child process with TRITON_INTERPRET=1 (Triton reads it when it is
    imported, so it cannot be switched on inside this process)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k",
                           "interpret"], cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True,
                          text=True, timeout=600)


class _Ctx:
    """What our autograd.Function forwards use of autograd's ctx."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def forward_aliases(function, *args) -> tuple[torch.Tensor, int]:
    """`function.forward` run as a plain call (a stand-in ctx, no autograd) under a TorchFunctionMode: (its output,
    how many of the tensors that torch calls inside it returned share the output's storage). 1 is the GEMM's own
    output alone; more is the pattern by which torch 2.11's dynamo mis-wires a compiled autograd.Function
    (pytorch#180642): the output is also another call's result (a no-op `.to` or `.contiguous()` hands back its
    input, the same TensorImpl) or a view of an intermediate (dynamo's calls, not ATen's internals: a 3-D F.linear
    is one call)."""
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen.extend(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
            return out

    with torch.no_grad(), Record():
        y = function.forward(_Ctx(), *args)
    ptr = y.untyped_storage().data_ptr()
    return y, sum(t.untyped_storage().data_ptr() == ptr for t in seen)


def write_pair(root, stem, size=(48, 64), caption="make the square red", seed=0, mask=False):
    """A folder-layout pair: images/<stem>.png, control/<stem>.png (random pixels), the caption, optionally a mask."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "control").mkdir(parents=True, exist_ok=True)
    for sub in ("images", "control"):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / sub / f"{stem}.png")
    (root / "images" / f"{stem}.txt").write_text(caption)
    if mask:
        m = np.zeros(size, np.uint8)
        m[: size[0] // 2] = 255
        Image.fromarray(m).save(root / "images" / f"{stem}_mask.png")
