"""Attention for Flux training: cuDNN through explicit aten calls, and the per-model choice of backend.

Why our own cuDNN call: cuDNN SDPA is ~1.7x PyTorch's flash backend at the Kontext shape (DESIGN.md §4), but a Flux
LoRA backward through `F.scaled_dot_product_attention` on cuDNN crashed (illegal memory access): on the H100 image
without checkpointing, on the H200 image with checkpointing + compile (BENCHMARKS.md). That path hands cuDNN a
gradient whose strides differ from the output's and lets the op re-layout it inside; diffusers' own context-parallel
cuDNN path notes that the aten ops give wrong results unless every operand is contiguous. Here every tensor that
reaches the kernels is contiguous [B, H, S, D] (lse [B, H, S, 1]) and the backward is one explicit aten call; it ran
in every configuration on both GPUs.

The choice lives on the model: `set_attention(model, name, device)` writes the backend into each of *this* model's
attention processors (what diffusers' `set_attention_backend` does per module, minus its process-wide
`set_active_backend`), so two models in one process keep their own choices and the pin holds inside compiled blocks
and checkpoint recomputes. Our cuDNN path is a diffusers backend registered under its own name ("kontext_cudnn"),
added once beside diffusers' entries; no diffusers entry is ever replaced.
"""

import torch


def _forward(q, k, v, scale):
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, False, False, scale=scale)
    return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)


class CudnnAttention(torch.autograd.Function):
    """Attention over [B, H, S, D] tensors (no mask, no dropout) on cuDNN, forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse, (cum_q, cum_k, max_q, max_k, seed, offset) = _forward(q, k, v, scale)
        ctx.scale, ctx.max_qk = scale, (max_q, max_k)
        ctx.save_for_backward(q, k, v, out, lse, cum_q, cum_k, seed, offset)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cum_q, cum_k, seed, offset = ctx.saved_tensors
        max_q, max_k = ctx.max_qk
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad_out.contiguous(), q, k, v, out, logsumexp=lse, philox_seed=seed, philox_offset=offset,
            attn_bias=None, cum_seq_q=cum_q, cum_seq_k=cum_k, max_q=max_q, max_k=max_k, dropout_p=0.0,
            is_causal=False, scale=ctx.scale)
        return dq, dk, dv, None


def cudnn_attention(q, k, v, scale=None):
    """q, k, v: [B, S, H, D] (diffusers' layout) -> [B, S, H, D]."""
    out = CudnnAttention.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
    return out.transpose(1, 2)


def attention_ref(q, k, v, scale=None):
    """The pure-torch twin of cudnn_attention (same layout): PyTorch's math SDPA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                               v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def diffusers_backend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      enable_gqa=False, return_lse=False, _parallel_config=None):
    """cudnn_attention with diffusers' backend signature (attention_dispatch.dispatch_attention_fn)."""
    if attn_mask is not None or dropout_p or is_causal or enable_gqa or return_lse or _parallel_config:
        raise NotImplementedError("kernels.attention: cuDNN path without mask, dropout, GQA, lse or context "
                                  "parallelism only (Flux uses none of them)")
    return cudnn_attention(query, key, value, scale)


# ---------------------------------------------------------------- the choice, per model

OURS = "kontext_cudnn"  # our backend's name in diffusers' registry
BACKENDS = {"cudnn": OURS, "cudnn_torch": "_native_cudnn", "flash": "_native_flash",
            "efficient": "_native_efficient", "math": "_native_math", "default": "native"}


def _backend_name(value: str):
    """diffusers' AttentionBackendName member for `value`; ours is added to the enum and the registry on first use
    (diffusers keys its registry by enum members, so a backend of our own needs a member of our own)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    if value == OURS and OURS not in AttentionBackendName._value2member_map_:
        member = str.__new__(AttentionBackendName, OURS)
        member._name_, member._value_ = OURS.upper(), OURS
        AttentionBackendName._member_map_[member._name_] = member
        AttentionBackendName._value2member_map_[OURS] = member
        AttentionBackendName._member_names_.append(member._name_)
        _AttentionBackendRegistry.register(member)(diffusers_backend)
    return AttentionBackendName(value)


def cudnn_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """cuDNN attention needs a CUDA GPU of compute capability >= 8.0 and half-precision q/k/v."""
    return (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability(device) >= (8, 0))


def resolve_attention(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """"auto" -> our cuDNN path on a GPU that can run it ("cudnn": it ran on the H100 and the H200 with and without
    checkpointing and compile, in bf16, fp8 and 4-bit models; PyTorch's own cuDNN path crashed on each in one of those
    configurations, so "auto" never picks it); on CUDA otherwise (fp32 attention, pre-Ampere) the memory-efficient
    kernel, which takes fp32; on the CPU PyTorch's default SDPA."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"attention_backend: {name!r}; expected auto or one of {sorted(BACKENDS)}")
    if name != "auto":
        return name
    if device.type != "cuda":
        return "default"
    return "cudnn" if cudnn_usable(device, dtype) else "efficient"


def set_attention(model: torch.nn.Module, name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Pin the attention backend in every attention processor of `model` (and nowhere else); return the name chosen.
    `dtype` is the dtype attention runs in (the hidden states'). Pinned inside the model, the choice holds in
    compiled blocks and when gradient checkpointing recomputes a block: an outer `sdpa_kernel` context does neither,
    and a recompute under another backend fails torch.utils.checkpoint's metadata check (logsumexp shapes differ)."""
    name = resolve_attention(name, device, dtype)
    if name in ("cudnn", "cudnn_torch") and not cudnn_usable(device, dtype):
        raise ValueError(f"attention_backend {name!r} needs a CUDA GPU (sm >= 8.0) and bf16/fp16 attention; got "
                         f"{device} with {dtype}")
    backend = _backend_name(BACKENDS[name])
    processors = [m.processor for m in model.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")]
    if not processors:
        raise ValueError(f"set_attention: {type(model).__name__} has no diffusers attention processors to pin")
    for p in processors:
        p._attention_backend = backend
    return name


def attention_of(model: torch.nn.Module) -> set[str]:
    """The backend names pinned in the model's attention processors (None: diffusers' process-wide default)."""
    return {getattr(getattr(m.processor, "_attention_backend", None), "value", None)
            for m in model.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")}
