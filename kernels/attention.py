"""cuDNN attention for Flux training, called through its aten ops with every operand contiguous.

Why: cuDNN SDPA is ~1.7x PyTorch's flash backend at the Kontext shape (DESIGN.md §4), but a Flux backward through
`F.scaled_dot_product_attention` on cuDNN crashed on the H100 image (illegal memory access) without gradient
checkpointing. That path hands cuDNN a gradient whose strides differ from the output's and lets the op re-layout it
inside; diffusers' own context-parallel cuDNN path notes that the aten ops give wrong results unless every operand
is contiguous. Here every tensor that reaches the kernels is contiguous [B, H, S, D] (lse [B, H, S, 1]), and the
backward is one explicit aten call. `recompute=True` keeps only q, k, v and re-runs the forward in backward
(attention-only checkpointing: +1 forward, no saved output or lse).

`install_cudnn()` makes diffusers' "_native_cudnn" backend use this function, so `set_attention_backend` selects it
and it holds under torch.compile and checkpoint recompute like any diffusers backend. With full gradient
checkpointing and torch.compile, PyTorch's own path did not crash and was faster (bench: 1.040 vs 1.204 s per
1024^2 step), so train.set_attention uses it there (`install_cudnn(guarded=False)`).
"""

import torch


def _forward(q, k, v, scale):
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, False, False, scale=scale)
    return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)


class CudnnAttention(torch.autograd.Function):
    """Attention over [B, H, S, D] tensors (no mask, no dropout) on cuDNN, forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, scale, recompute):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse, rest = _forward(q, k, v, scale)
        ctx.scale, ctx.recompute = scale, recompute
        if recompute:
            ctx.save_for_backward(q, k, v)
        else:
            cum_q, cum_k, max_q, max_k, seed, offset = rest
            ctx.max_qk = (max_q, max_k)
            ctx.save_for_backward(q, k, v, out, lse, cum_q, cum_k, seed, offset)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.recompute:
            q, k, v = ctx.saved_tensors
            out, lse, (cum_q, cum_k, max_q, max_k, seed, offset) = _forward(q, k, v, ctx.scale)
        else:
            q, k, v, out, lse, cum_q, cum_k, seed, offset = ctx.saved_tensors
            max_q, max_k = ctx.max_qk
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad_out.contiguous(), q, k, v, out, logsumexp=lse, philox_seed=seed, philox_offset=offset,
            attn_bias=None, cum_seq_q=cum_q, cum_seq_k=cum_k, max_q=max_q, max_k=max_k, dropout_p=0.0,
            is_causal=False, scale=ctx.scale)
        return dq, dk, dv, None, None


def cudnn_attention(q, k, v, scale=None, recompute=False):
    """q, k, v: [B, S, H, D] (diffusers' layout) -> [B, S, H, D]."""
    out = CudnnAttention.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, recompute)
    return out.transpose(1, 2)


def _diffusers_backend(recompute: bool):
    def backend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                return_lse=False, _parallel_config=None):
        if attn_mask is not None or dropout_p or is_causal or enable_gqa or return_lse or _parallel_config:
            raise NotImplementedError("kernels.attention: cuDNN path without mask, dropout, GQA, lse or context "
                                      "parallelism only (Flux uses none of them)")
        return cudnn_attention(query, key, value, scale, recompute)

    return backend


_original: dict = {}


def install_cudnn(guarded: bool = True, recompute: bool = False) -> None:
    """Route diffusers' "_native_cudnn" attention backend (process-wide) through `cudnn_attention` (guarded=True),
    or back to diffusers' own function (F.scaled_dot_product_attention on cuDNN)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    name = AttentionBackendName._NATIVE_CUDNN
    _original.setdefault(name, _AttentionBackendRegistry._backends[name])
    _AttentionBackendRegistry._backends[name] = _diffusers_backend(recompute) if guarded else _original[name]
