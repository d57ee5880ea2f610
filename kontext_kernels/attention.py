"""Attention for Flux training: cuDNN through explicit aten calls, and the per-model choice of backend.

Why our own cuDNN call: cuDNN SDPA is ~1.7x PyTorch's flash backend at the Kontext shape (DESIGN.md §4), but a Flux
LoRA backward through `F.scaled_dot_product_attention` on cuDNN crashed (illegal memory access): on the H100 image
without checkpointing, on the H200 image with checkpointing + compile (BENCHMARKS.md). That path hands cuDNN a
gradient whose strides differ from the output's and lets the op re-layout it inside; diffusers' own context-parallel
cuDNN path notes that the aten ops give wrong results unless every operand is contiguous. Here every tensor that
reaches the kernels is contiguous [B, H, S, D] (lse [B, H, S, 1]) and the backward is one explicit aten call; it ran
in every configuration on both GPUs.

"cudnn_fp8" is the same processor with the attention call in fp8 on cuDNN's graph API (kontext_kernels/attention_fp8.py,
Hopper, `pip install nvidia-cudnn-frontend`): e4m3 q/k/v/P/O/dO/dS, gradients and output back in bf16.

The choice lives on the model: `set_attention(model, name, device, dtype)` sets the processor of each of *this*
model's attention modules: our CudnnFluxAttnProcessor for "cudnn" (CudnnFp8FluxAttnProcessor for "cudnn_fp8", one per
module: it holds that module's delayed gradient scales), else diffusers' FluxAttnProcessor pinned to one of
diffusers' own backends; an IP-Adapter's processors (they hold its weights) are kept and pinned too. Two models in
one process keep their own choices, the choice holds inside compiled blocks and checkpoint recomputes, and nothing
process-wide (diffusers' backend registry, its active backend) is touched.
"""

import torch

from kontext_kernels.attention_fp8 import Fp8Scales, check_fp8_attention, cudnn_fp8_attention


def _forward(q, k, v, scale):
    out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, False, False, scale=scale)
    return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)


class CudnnAttention(torch.autograd.Function):
    """Attention over [B, H, S, D] tensors (no mask, no dropout) on cuDNN, forward and backward. Forward returns the
    op's own output, no view or no-op `.to` of it (torch 2.11's dynamo mis-wires those: kontext_kernels/int4.py)."""

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


class CudnnFluxAttnProcessor:
    """diffusers' FluxAttnProcessor.__call__ with its attention call, dispatch_attention_fn, replaced by
    cudnn_attention; the projections, q/k norms, text-image concat, RoPE and output split are diffusers' own code
    paths called the same way (tests/test_attention.py checks the result equals FluxAttnProcessor's). A processor
    of our own, set on this model's attention modules, is how the choice stays per model: diffusers' backend
    registry is keyed by its own enum and shared by every model in the process, so we never add to it."""

    _attention_backend = None  # diffusers' set_attention_backend writes here; this processor ignores it
    _parallel_config = None
    name = "kontext_cudnn"

    def __init__(self):
        # the model exists, so diffusers is imported already: no start-up cost here, none at this file's import
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections, apply_rotary_emb

        self._qkv, self._rope = _get_qkv_projections, apply_rotary_emb

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise NotImplementedError("kontext_kernels.attention: the cuDNN path takes no attention mask (Flux uses none)")
        q, k, v, eq, ek, ev = self._qkv(attn, hidden_states, encoder_hidden_states)
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.added_kv_proj_dim is not None:  # double-stream block: text tokens first, as diffusers
            eq, ek, ev = (x.unflatten(-1, (-1, attn.head_dim)) for x in (eq, ek, ev))
            q = torch.cat([attn.norm_added_q(eq), q], dim=1)
            k = torch.cat([attn.norm_added_k(ek), k], dim=1)
            v = torch.cat([ev, v], dim=1)
        if image_rotary_emb is not None:
            q, k = self._rope(q, image_rotary_emb, sequence_dim=1), self._rope(k, image_rotary_emb, sequence_dim=1)
        out = self._attend(q, k, v).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        text, out = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]],
                                         dim=1)
        return attn.to_out[1](attn.to_out[0](out.contiguous())), attn.to_add_out(text.contiguous())

    def _attend(self, q, k, v):
        return cudnn_attention(q, k, v)


class CudnnFp8FluxAttnProcessor(CudnnFluxAttnProcessor):
    """CudnnFluxAttnProcessor with its attention in fp8: cudnn_fp8_attention (kontext_kernels/attention_fp8.py,
    cuDNN's fp8 graphs, Hopper). Each instance, one per attention module, holds that module's delayed gradient
    scales."""

    name = "kontext_cudnn_fp8"

    def __init__(self):
        super().__init__()
        self.scales = Fp8Scales()

    def _attend(self, q, k, v):
        return cudnn_fp8_attention(q, k, v, self.scales)


# ---------------------------------------------------------------- the choice, per model

# our names -> diffusers' backend names; "cudnn" and "cudnn_fp8" are our processors instead (CudnnFluxAttnProcessor,
# CudnnFp8FluxAttnProcessor)
BACKENDS = {"cudnn": CudnnFluxAttnProcessor.name, "cudnn_fp8": CudnnFp8FluxAttnProcessor.name,
            "cudnn_torch": "_native_cudnn", "flash": "_native_flash",
            "efficient": "_native_efficient", "math": "_native_math", "default": "native"}
# diffusers' backend for an IP-Adapter processor (FluxIPAdapterAttnProcessor) under our "cudnn": that processor is
# diffusers' code, which only dispatches to diffusers' backends. PyTorch's flash, not its cuDNN SDPA: flash ran in
# every configuration on the H200, PyTorch's cuDNN path crashed (the module docstring). "cudnn" and "cudnn_fp8" are
# only chosen on CUDA with bf16/fp16 attention, which flash takes.
IP_CUDNN_BACKEND = "_native_flash"


def cudnn_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """cuDNN attention needs a CUDA GPU of compute capability >= 8.0 and half-precision q/k/v."""
    return (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability(device) >= (8, 0))


def resolve_attention(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """"auto" -> our cuDNN path (bf16; never the fp8 one, whose accuracy is a choice to make) on a GPU that can run it ("cudnn": it ran on the H100 and the H200 with and without
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
    """Set the attention path in every attention module of `model` (and nowhere else); return the name chosen.
    "cudnn" / "cudnn_fp8": our processors; any other: diffusers' FluxAttnProcessor with that backend written into it
    (what diffusers' set_attention_backend does per module, minus its process-wide set_active_backend). An IP-Adapter's
    FluxIPAdapterAttnProcessor (double blocks, load.add_ip_adapter) is kept, it holds the adapter's to_k_ip / to_v_ip
    and scale, with the backend written into it (IP_CUDNN_BACKEND for "cudnn" / "cudnn_fp8"). `dtype` is the
    dtype attention runs in (the hidden states'). Held inside the model, the choice holds in compiled blocks and when
    gradient checkpointing recomputes a block: an outer `sdpa_kernel` context does neither, and a recompute under
    another backend fails torch.utils.checkpoint's metadata check (logsumexp shapes differ)."""
    from diffusers.models.attention_dispatch import AttentionBackendName
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor

    name = resolve_attention(name, device, dtype)
    if name in ("cudnn", "cudnn_torch") and not cudnn_usable(device, dtype):
        raise ValueError(f"attention_backend {name!r} needs a CUDA GPU (sm >= 8.0) and bf16/fp16 attention; got "
                         f"{device} with {dtype}")
    if name == "cudnn_fp8":
        check_fp8_attention(device, dtype)  # Hopper, the cudnn module, cuDNN >= 9.14: fail here, not in the first step
    modules = [m for m in model.modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]
    other = {type(m.processor).__name__ for m in modules} - {"FluxAttnProcessor", "CudnnFluxAttnProcessor",
                                                             "CudnnFp8FluxAttnProcessor", "FluxIPAdapterAttnProcessor"}
    if not modules or other:
        raise ValueError(f"set_attention: {type(model).__name__} needs Flux attention modules with diffusers' "
                         f"FluxAttnProcessor or FluxIPAdapterAttnProcessor; found {sorted(other) or 'none'}")
    for m in modules:
        if isinstance(m.processor, FluxIPAdapterAttnProcessor):
            backend = IP_CUDNN_BACKEND if name in ("cudnn", "cudnn_fp8") else BACKENDS[name]
            m.processor._attention_backend = AttentionBackendName(backend)
        elif name == "cudnn":
            m.set_processor(CudnnFluxAttnProcessor())
        elif name == "cudnn_fp8":
            m.set_processor(CudnnFp8FluxAttnProcessor())
        else:
            p = FluxAttnProcessor()
            p._attention_backend = AttentionBackendName(BACKENDS[name])
            m.set_processor(p)
    return name


def attention_of(model: torch.nn.Module) -> set[str]:
    """The attention path of each attention module: our processor's name, or the diffusers backend pinned in it
    (None: diffusers' process-wide default). An IP-Adapter model under "cudnn": {"kontext_cudnn", IP_CUDNN_BACKEND}."""
    return {getattr(m.processor, "name", None) or getattr(m.processor._attention_backend, "value", None)
            for m in model.modules() if hasattr(m, "set_processor") and hasattr(m, "processor")}
