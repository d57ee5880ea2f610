"""kontext_kernels/attention.py: cuDNN attention through explicit aten calls, and the per-model attention choice.

- CPU: the diffusers backend wrapper refuses what it does not implement, by name; resolve_attention's "auto" choice;
  set_attention pins the backend in one model's processors only (two models keep their own choices, diffusers'
  process-wide active backend and registry entries untouched), and diffusers' dispatcher reaches our function.
- GPU (-m gpu): forward and q/k/v gradients vs PyTorch's math backend in fp32 (attention_ref, the reference), at
  shapes whose sequence length is not a multiple of the cuDNN tile, and a diffusers Flux LoRA step through our path
  equals the flash backend's within bf16 tolerance.
"""

import pytest
import torch

import fixtures
from config import TrainConfig
from kontext_kernels.attention import (CudnnFluxAttnProcessor, attention_of, attention_ref, cudnn_attention,
                               resolve_attention, set_attention)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_processor_refuses_a_mask():
    with pytest.raises(NotImplementedError, match="mask"):
        CudnnFluxAttnProcessor()(None, torch.zeros(1, 4, 8), attention_mask=torch.ones(1, 4, dtype=torch.bool))


def test_auto_attention_choice(monkeypatch):
    assert resolve_attention("auto", CPU, torch.float32) == "default"
    assert resolve_attention("flash", CPU, torch.float32) == "flash"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert resolve_attention("auto", CUDA, torch.bfloat16) == "cudnn"  # ours, never PyTorch's cudnn path
    assert resolve_attention("auto", CUDA, torch.float32) == "efficient"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    assert resolve_attention("auto", CUDA, torch.bfloat16) == "efficient"
    with pytest.raises(ValueError, match="cudnn_torch"):
        resolve_attention("cuddn", CPU, torch.float32)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        set_attention(fixtures.full_size_transformer("cpu", **fixtures.MINI_DIMS), "cudnn", CPU, torch.bfloat16)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.ones(1), guidance=torch.ones(1),
                img_ids=torch.randn(16, 3, generator=g), txt_ids=torch.zeros(8, 3))


def test_choice_lives_on_the_model(monkeypatch):
    """Two models in one process keep their own attention; nothing process-wide changes (diffusers' registry, enum
    and active backend); the cuDNN model reaches our function, the other never does."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    active, entries = _AttentionBackendRegistry._active_backend, dict(_AttentionBackendRegistry._backends)
    names = set(AttentionBackendName.__members__)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    ours = fixtures.full_size_transformer("cpu", torch.float32, **fixtures.MINI_DIMS)
    other = fixtures.full_size_transformer("cpu", torch.float32, **fixtures.MINI_DIMS)
    assert set_attention(ours, "auto", CUDA, torch.bfloat16) == "cudnn"  # as on a GPU
    assert set_attention(other, "math", CPU, torch.float32) == "math"
    assert attention_of(ours) == {"kontext_cudnn"} and attention_of(other) == {"_native_math"}
    assert _AttentionBackendRegistry._active_backend == active and set(AttentionBackendName.__members__) == names
    assert dict(_AttentionBackendRegistry._backends) == entries

    calls = []
    monkeypatch.setattr("kontext_kernels.attention.cudnn_attention", lambda q, k, v, scale=None: calls.append(q.shape) or q)
    ours(**inputs())
    n_attn = len(ours.transformer_blocks) + len(ours.single_transformer_blocks)
    assert len(calls) == n_attn and calls[0] == (1, 24, 2, 16)  # [B, S_text + S_img, H, D]
    other(**inputs())
    assert len(calls) == n_attn  # the other model never reaches our function
    assert set_attention(ours, "math", CPU, torch.float32) == "math" and attention_of(ours) == {"_native_math"}


def test_our_processor_equals_diffusers_processor(monkeypatch):
    """CudnnFluxAttnProcessor is FluxAttnProcessor with the attention call swapped: with its kernel replaced by the
    math reference, the whole transformer (double and single blocks, RoPE, text concat) equals diffusers' processor
    on the math backend, exactly."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr("kontext_kernels.attention.cudnn_attention", attention_ref)
    torch.manual_seed(0)
    ours = fixtures.full_size_transformer("cpu", torch.float32,
                                          **dict(fixtures.MINI_DIMS, num_layers=2, num_single_layers=2))
    want = (set_attention(ours, "math", CPU, torch.float32), ours(**inputs(1))[0])[1]
    set_attention(ours, "cudnn", CUDA, torch.bfloat16)
    got = ours(**inputs(1))[0]
    assert attention_of(ours) == {"kontext_cudnn"} and torch.equal(got, want)


def test_train_logs_and_saves_the_choice():
    assert "attention_backend" in TrainConfig.__dataclass_fields__


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.gpu
@torch.enable_grad()  # conftest runs tests under no_grad
@pytest.mark.parametrize("shape", [(1, 300, 3, 64), (2, 1088, 4, 128), (1, 4608, 24, 128)])
def test_cudnn_attention_matches_math_gpu(shape):
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = [torch.randn(*shape, device="cuda", generator=g) for _ in range(3)]
    grad = torch.randn(*shape, device="cuda", generator=g)

    def run(fn, dtype):
        t = [x.detach().to(dtype).requires_grad_() for x in qkv]  # fresh leaves for each run
        out = fn(*t)
        out.backward(grad.to(dtype))
        return [out.detach()] + [x.grad for x in t]

    want = run(attention_ref, torch.float32)
    got = run(cudnn_attention, torch.bfloat16)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        assert rel(a, b) < 2e-2, (name, rel(a, b))


@pytest.mark.gpu
def test_cudnn_attention_returns_its_op_output_gpu():
    """CudnnAttention's forward returns the aten op's own output, no view or no-op of it: the aliasing that torch
    2.11's dynamo mis-wires in a compiled autograd.Function (pytorch#180642; tests_util.forward_aliases)."""
    from kontext_kernels.attention import CudnnAttention
    from tests_util import forward_aliases

    q, k, v = (torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, calls = forward_aliases(CudnnAttention, q, k, v, None)
    assert calls == 1 and out.shape == q.shape and not any(out is t for t in (q, k, v))


def narrow_flux_step(backend: str, head_dim: int, compile_: bool = False, steps: tuple = (0,)):
    """Narrow Flux (2 heads of head_dim; full depth is not needed for the numerics), seeded, with a LoRA drawn off
    zero (every gradient path non-trivial), through train.py's prepare_transformer and batches on CUDA with attention
    `backend`: (loss, LoRA grads, attention_of(model)) of the last of `steps` (earlier ones: other batches first)."""
    import dataclasses

    import objective
    import train

    dims = dict(fixtures.MINI_DIMS, attention_head_dim=head_dim, num_attention_heads=2, joint_attention_dim=64,
                axes_dims_rope=(head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16))
    entries, empty = fixtures.random_entries(1, 256, 64, dims), fixtures.random_empty(64, dims)
    torch.manual_seed(0)  # the same weights for every backend
    model = fixtures.full_size_transformer("cuda", **dims)
    tc = TrainConfig(attention_backend=backend, compile=compile_)
    params, chosen = train.prepare_transformer(model, tc, CUDA)
    assert chosen == backend
    torch.manual_seed(0)
    for p in params:
        torch.nn.init.normal_(p, std=0.02)
    for step in steps:
        (b, _, _), = train.micro_batches(entries, [()], empty, dataclasses.replace(tc, seed=0), step, 0, 1, CUDA,
                                         torch.bfloat16)
        for p in params:
            p.grad = None
        loss = objective.flow_matching_loss(model, b["x0"], b["noise"], b["t"], b["control"], b["prompt_embeds"],
                                            b["pooled_prompt_embeds"], b["img_ids"], b["text_ids"], 1.0)
        loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in params]), attention_of(model)


@pytest.mark.gpu
@torch.enable_grad()
def test_flux_train_step_cudnn_equals_flash_gpu():
    """Loss and LoRA grads of narrow_flux_step through our cuDNN path vs flash."""
    (l1, g1, _), (l2, g2, _) = (narrow_flux_step(backend, 64) for backend in ("flash", "cudnn"))
    assert rel(l2, l1) < 1e-2 and rel(g2, g1) < 5e-2, (rel(l2, l1), rel(g2, g1))
