"""kontext_kernels/pack.py: the fused (x - shift) * scale + pack and its inverse, against encode.pack_latents / unpack_latents.

The Triton kernel's fp32 instantiation runs under TRITON_INTERPRET=1 in a subprocess (test_pack_kernel_under_
interpreter); bf16 numerics need the GPU (marker `gpu`).
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from encode import encode_image, pack_latents, unpack_latents
from kontext_kernels import INTERPRET, triton
from kontext_kernels.pack import pack_latents_fused, pack_latents_fused_ref, unpack_latents_fused, unpack_latents_fused_ref

ROOT = Path(__file__).resolve().parents[1]
SHIFT, SCALE = 0.1159, 0.3611  # FLUX's VAE shift_factor / scaling_factor
SIZES = [(1, 4, 6), (2, 10, 8), (1, 34, 18)]  # (B, H, W) latent sizes; 9*17 = 153 tokens is not a multiple of 32
interpret_only = pytest.mark.skipif(not INTERPRET, reason="runs in test_pack_kernel_under_interpreter's subprocess")


def vae_mode(b, h, w, dtype=torch.float32, device="cpu", seed=0):
    """A [B, 16, H, W] view with the strides of DiagonalGaussianDistribution.mode() (a chunk of 32 channels)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 32, h, w, generator=g).to(device, dtype)[:, :16]


def unpack_like_cuda(packed, h, w):
    """unpack_latents(p) / SCALE + SHIFT as PyTorch's CUDA kernel computes it: x * fp32(1 / scale) for a scalar."""
    return unpack_latents(packed, h, w) * float(np.float32(1) / np.float32(SCALE)) + SHIFT


def test_refs_are_the_pipeline_math(tiny_cfg):
    from load import load_vae

    vae = load_vae(tiny_cfg)
    image = torch.rand(1, 3, 32, 48) * 2 - 1
    mode = vae.encode(image).latent_dist.mode()
    c = vae.config
    assert torch.equal(pack_latents_fused_ref(mode, c.shift_factor, c.scaling_factor),
                       pack_latents(encode_image(vae, image)))
    x = vae_mode(2, 10, 8)
    back = unpack_latents_fused_ref(pack_latents_fused_ref(x, SHIFT, SCALE), 10, 8, SHIFT, SCALE)
    torch.testing.assert_close(back, x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bhw", SIZES, ids=str)
def test_refs_equal_encode_pack_unpack(bhw):
    """kontext_kernels/pack.py writes the permutation out itself (kernels/ may not import encode.py): the same bits as
    encode.pack_latents / unpack_latents, for strided inputs and a channel count other than 16 too."""
    b, h, w = bhw
    for x in (vae_mode(*bhw), vae_mode(*bhw).transpose(2, 3).contiguous().transpose(2, 3),
              torch.randn(b, 3, h, w)):
        packed = pack_latents_fused_ref(x, SHIFT, SCALE)
        assert torch.equal(packed, pack_latents((x - SHIFT) * SCALE))
        assert torch.equal(unpack_latents_fused_ref(packed, h, w, SHIFT, SCALE),
                           unpack_latents(packed, h, w) / SCALE + SHIFT)


def test_cpu_without_interpreter_uses_the_reference():
    if INTERPRET:
        pytest.skip("the interpreter runs the kernel on CPU tensors")
    x = vae_mode(2, 10, 8)
    assert torch.equal(pack_latents_fused(x, SHIFT, SCALE), pack_latents_fused_ref(x, SHIFT, SCALE))
    with pytest.raises(ValueError, match="even H and W"):
        pack_latents_fused(torch.zeros(1, 16, 5, 8), SHIFT, SCALE)
    with pytest.raises(ValueError, match="is not"):
        unpack_latents_fused(torch.zeros(1, 20, 64), 10, 10, SHIFT, SCALE)


@pytest.mark.skipif(INTERPRET or triton is None, reason="driver: runs the interpret tests with TRITON_INTERPRET=1")
def test_pack_kernel_under_interpreter():
    from tests_util import run_interpret_tests

    r = run_interpret_tests(__file__)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]


@interpret_only
@pytest.mark.parametrize("bhw", SIZES, ids=str)
def test_interpret_pack_fp32_equals_ref(bhw):
    x = vae_mode(*bhw)
    column_major = x.transpose(2, 3).contiguous().transpose(2, 3)  # any strides, not only mode()'s
    assert x.is_contiguous() == (bhw[0] == 1) and not column_major.is_contiguous()
    for inp in (x, x.contiguous(), column_major):
        assert torch.equal(pack_latents_fused(inp, SHIFT, SCALE), pack_latents_fused_ref(inp, SHIFT, SCALE))


@interpret_only
@pytest.mark.parametrize("bhw", SIZES, ids=str)
def test_interpret_unpack_fp32_equals_ref(bhw):
    b, h, w = bhw
    packed = pack_latents_fused_ref(vae_mode(*bhw), SHIFT, SCALE)
    ours = unpack_latents_fused(packed, h, w, SHIFT, SCALE)
    assert ours.shape == (b, 16, h, w) and ours.is_contiguous()
    assert torch.equal(ours, unpack_like_cuda(packed, h, w))
    # PyTorch on the CPU divides instead: at most one rounding apart
    torch.testing.assert_close(ours, unpack_latents_fused_ref(packed, h, w, SHIFT, SCALE), rtol=2.4e-7, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_pack_unpack(dtype):
    for b, h, w in SIZES + [(1, 128, 128), (2, 96, 160)]:  # 1024^2 and 768x1280 images
        x = vae_mode(b, h, w, dtype, "cuda")
        ref = pack_latents_fused_ref(x, SHIFT, SCALE)
        ours = pack_latents_fused(x, SHIFT, SCALE)
        assert ours.dtype == dtype and not ours.isnan().any()
        back = unpack_latents_fused(ours, h, w, SHIFT, SCALE)
        back_ref = unpack_latents_fused_ref(ours, h, w, SHIFT, SCALE)
        if dtype == torch.float32:
            assert torch.equal(ours, ref)
            torch.testing.assert_close(back, back_ref, rtol=2.4e-7, atol=1e-7)
        else:  # the same op-by-op rounding; tolerance in case PyTorch rounds the python scalar to bf16 first
            torch.testing.assert_close(ours, ref, rtol=1e-2, atol=1e-3)
            torch.testing.assert_close(back, back_ref, rtol=1e-2, atol=1e-3)
