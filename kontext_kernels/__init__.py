"""Triton kernels, each beside a pure-torch reference of the same signature (used on CPU and by the tests).

The Triton import guard, written once for every kernel file: `triton` / `tl` are None where Triton is not installed
(macOS, some CPU installs), and then everything runs the pure-torch references. `use_triton(t)` is the one test a
kernel wrapper makes before launching.
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

# TRITON_INTERPRET=1 (read by Triton when it is imported, so set it before the first import) runs the kernels on CPU
# tensors: correct for fp32, wrong for bf16 / fp16 / fp8 (DESIGN.md §4), so CI tests only fp32 instantiations that way.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(t: torch.Tensor) -> bool:
    """Whether a kernel runs on `t`: Triton is installed and `t` is on CUDA, or the interpreter is on (CPU tensors)."""
    return triton is not None and (t.is_cuda or INTERPRET)
