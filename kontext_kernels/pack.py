"""Latent packing fused with the VAE shift / scale: one Triton pass instead of a subtract, a multiply and a copy.

pack:   [B, 16, H, W] (the VAE posterior's mode, unscaled) -> [B, (H/2)(W/2), 64] = pack_latents((x - shift) * scale)
unpack: [B, (h/2)(w/2), 64] -> [B, 16, h, w] = unpack_latents(packed) / scale + shift   (what the VAE decodes)
Token (i, j) holds the 2x2 patch at rows 2i.., cols 2j..; channel order c*4 + dy*2 + dx. The references below write
that permutation out here (kernels/ sits below encode.py and imports nothing above it); tests/test_pack.py checks it
equals encode.pack_latents / unpack_latents.

Rounding follows the reference op by op (encode_image computes `(mode - shift) * scale` in the VAE's dtype): each
step is computed in fp32 and rounded to the tensor's dtype, so bf16 rounds twice as the reference does. Division by
the scale is a multiplication by fp32(1 / scale), as PyTorch's CUDA kernel does for a scalar divisor (PyTorch on the
CPU divides, which can differ in the last bit).
"""

import numpy as np
import torch

from kontext_kernels import tl, triton, use_triton


def pack_latents_fused_ref(latents: torch.Tensor, shift: float, scale: float) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C] of (x - shift) * scale, in pure torch."""
    x = (latents - shift) * scale
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # [B, H/2, W/2, C, dy, dx]
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents_fused_ref(packed: torch.Tensor, height: int, width: int, shift: float, scale: float) -> torch.Tensor:
    """[B, (h/2)(w/2), 4C] -> [B, C, h, w] of unpack(packed) / scale + shift, in pure torch."""
    b, _, d = packed.shape
    x = packed.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # [B, C, H/2, dy, W/2, dx]
    return x.reshape(b, d // 4, height, width) / scale + shift


if triton is not None:

    @triton.jit
    def _pack_kernel(x_ptr, out_ptr, shift, scale, n_tokens, half_w, sb, sc, sh, sw,
                     BLOCK_T: tl.constexpr, UNPACK: tl.constexpr):
        # A [BLOCK_T tokens, 64 channels] tile of the packed tensor; x is the [B, 16, H, W] side (any strides).
        b = tl.program_id(1)
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        k = tl.arange(0, 64)
        c, dy, dx = k // 4, (k // 2) % 2, k % 2
        row = 2 * (t // half_w)[:, None] + dy[None, :]
        col = 2 * (t % half_w)[:, None] + dx[None, :]
        spatial = b * sb + c[None, :] * sc + row * sh + col * sw
        packed = b * n_tokens * 64 + t[:, None] * 64 + k[None, :]
        mask = (t < n_tokens)[:, None]
        if UNPACK:
            v = tl.load(x_ptr + packed, mask=mask, other=0.0)
            v = (v.to(tl.float32) * scale).to(v.dtype)  # scale here is 1 / scale
            v = (v.to(tl.float32) + shift).to(v.dtype)
            tl.store(out_ptr + spatial, v, mask=mask)
        else:
            v = tl.load(x_ptr + spatial, mask=mask, other=0.0)
            v = (v.to(tl.float32) - shift).to(v.dtype)
            v = (v.to(tl.float32) * scale).to(v.dtype)
            tl.store(out_ptr + packed, v, mask=mask)


def _launch(src, out, shift, scale, b, n_tokens, half_w, strides, unpack):
    block_t = 32
    _pack_kernel[(triton.cdiv(n_tokens, block_t), b)](src, out, shift, scale, n_tokens, half_w, *strides,
                                                      BLOCK_T=block_t, UNPACK=unpack, num_warps=4,
                                                      enable_fp_fusion=False)
    return out


def pack_latents_fused(latents: torch.Tensor, shift: float, scale: float) -> torch.Tensor:
    """[B, 16, H, W] (any strides, e.g. the VAE's mode() view) -> [B, (H/2)(W/2), 64] = pack((x - shift) * scale).
    CUDA tensors (or any under TRITON_INTERPRET=1) take the kernel; CPU tensors the reference."""
    b, c, h, w = latents.shape
    if c != 16 or h % 2 or w % 2:
        raise ValueError(f"pack_latents_fused: expected [B, 16, H, W] with even H and W, got {list(latents.shape)}")
    if not use_triton(latents):
        return pack_latents_fused_ref(latents, shift, scale)
    out = torch.empty(b, (h // 2) * (w // 2), 64, dtype=latents.dtype, device=latents.device)
    return _launch(latents, out, float(shift), float(scale), b, (h // 2) * (w // 2), w // 2, latents.stride(), False)


def unpack_latents_fused(packed: torch.Tensor, height: int, width: int, shift: float, scale: float) -> torch.Tensor:
    """[B, (h/2)(w/2), 64] -> [B, 16, h, w] = unpack(packed) / scale + shift; height, width are latent sizes."""
    b, n, d = packed.shape
    if d != 64 or height % 2 or width % 2 or n != (height // 2) * (width // 2):
        raise ValueError(f"unpack_latents_fused: {list(packed.shape)} is not [B, ({height}/2)({width}/2), 64]")
    if not use_triton(packed):
        return unpack_latents_fused_ref(packed, height, width, shift, scale)
    out = torch.empty(b, 16, height, width, dtype=packed.dtype, device=packed.device)
    inv_scale = float(np.float32(1.0) / np.float32(scale))  # PyTorch CUDA: x / s -> x * (1 / s), in fp32
    return _launch(packed.contiguous(), out, float(shift), inv_scale, b, n, width // 2, out.stride(), True)
