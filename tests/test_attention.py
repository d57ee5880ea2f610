"""kernels/attention.py: cuDNN attention through explicit aten calls.

- CPU: the diffusers backend wrapper refuses what it does not implement, by name; install_cudnn switches diffusers'
  "_native_cudnn" entry both ways; train.resolve_attention's "auto" choice.
- GPU (-m gpu): forward and q/k/v gradients vs PyTorch's math backend in fp32 (the reference), with and without
  recompute, at shapes whose sequence length is not a multiple of the cuDNN tile, and through a diffusers Flux
  transformer with train.set_attention("cudnn") (same loss and LoRA gradients as the flash backend, within bf16 tolerance).
"""

import pytest
import torch
import torch.nn.functional as F

from kernels.attention import _diffusers_backend, cudnn_attention


def test_backend_refuses_mask_and_dropout():
    q = torch.zeros(1, 4, 2, 8)
    backend = _diffusers_backend(recompute=False)
    with pytest.raises(NotImplementedError, match="mask"):
        backend(q, q, q, attn_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="dropout"):
        backend(q, q, q, dropout_p=0.1)


def test_auto_attention_choice():
    from train import resolve_attention

    assert resolve_attention("auto", checkpointed=True, compiled=True) == "cudnn_torch"
    assert resolve_attention("auto", checkpointed=True, compiled=False) == "cudnn"
    assert resolve_attention("auto", checkpointed=False, compiled=True) == "cudnn"
    assert resolve_attention("flash", checkpointed=True, compiled=True) == "flash"
    assert resolve_attention("auto", checkpointed=False, compiled=False, cudnn_ok=False) == "efficient"
    with pytest.raises(ValueError, match="cudnn_torch"):
        resolve_attention("cuddn", False, False)


def test_install_cudnn_switches_diffusers_backend():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    from kernels.attention import install_cudnn

    name = AttentionBackendName._NATIVE_CUDNN
    original = _AttentionBackendRegistry._backends[name]
    try:
        install_cudnn(guarded=True)
        assert _AttentionBackendRegistry._backends[name].__module__ == "kernels.attention"
        install_cudnn(guarded=False)
        assert _AttentionBackendRegistry._backends[name] is original
    finally:
        _AttentionBackendRegistry._backends[name] = original


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.gpu
@torch.enable_grad()  # conftest runs tests under no_grad
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("shape", [(1, 300, 3, 64), (2, 1088, 4, 128), (1, 4608, 24, 128)])
def test_cudnn_attention_matches_math_gpu(shape, recompute):
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = [torch.randn(*shape, device="cuda", generator=g) for _ in range(3)]
    grad = torch.randn(*shape, device="cuda", generator=g)

    def run(fn, dtype):
        t = [x.detach().to(dtype).requires_grad_() for x in qkv]  # fresh leaves for each run
        out = fn(*t)
        out.backward(grad.to(dtype))
        return [out.detach()] + [x.grad for x in t]

    def reference(q, k, v):  # [B, S, H, D] like diffusers
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)

    want = run(reference, torch.float32)
    got = run(lambda q, k, v: cudnn_attention(q, k, v, recompute=recompute), torch.bfloat16)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), name
        assert rel(a, b) < 2e-2, (name, rel(a, b))


@pytest.mark.gpu
@torch.enable_grad()
def test_flux_train_step_cudnn_equals_flash_gpu():
    """Tiny-width Flux (full depth is not needed for the numerics) with LoRA: loss and LoRA grads through our cuDNN
    path vs flash."""
    import bench
    from train import set_attention

    cfg = bench.BenchConfig(tiny=True)
    results = []
    for backend in ("flash", "cudnn"):
        torch.manual_seed(0)
        model = bench.build_transformer(cfg, "cuda")
        set_attention(model, backend, torch.device("cuda"))
        params = bench.add_lora(model)
        for p in params:  # lora_B starts at zero: give it values so every gradient path is non-trivial
            torch.nn.init.normal_(p, std=0.02)
        inp = bench.make_inputs(cfg, 256, "cuda")
        loss = F.mse_loss(bench.forward(model.train(), inp).float(), (inp["noise"] - inp["x0"]).float())
        loss.backward()
        results.append((loss.detach(), torch.cat([p.grad.flatten() for p in params])))
    (l1, g1), (l2, g2) = results
    assert rel(l2, l1) < 1e-2 and rel(g2, g1) < 5e-2, (rel(l2, l1), rel(g2, g1))
