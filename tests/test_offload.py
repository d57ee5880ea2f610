"""offload.py (block offload for training and sampling) and the VAE tiling / activation offload options: a step
with offload equals one without (CPU: to fp32 rounding; GPU: within bf16), fetch order forward then recompute,
weights back in host memory after each block, and the config rules.

Why not torch.equal on the CPU: the streamed weights are fresh copies at other addresses, and the CPU GEMMs' results
depend on alignment in the last bit (merely cloning every parameter of the unoffloaded model moves the sampled
latents by ~5e-7), so the bound is fp32 rounding: 1e-5 relative."""

import dataclasses

import pytest
import torch

import fixtures
import train
from config import Config, DataConfig, ModelConfig, TrainConfig, validate
from conftest import tiny_config
from load import load_transformer, load_vae
from offload import flux_blocks

DIMS = dict(fixtures.MINI_DIMS, num_layers=2, num_single_layers=3)


def model_and_batches(device, dtype, tc, res=64, steps=2):
    torch.manual_seed(0)
    model = fixtures.full_size_transformer(device, dtype, **DIMS)
    entries, empty = fixtures.random_entries(2, res, 8, DIMS), fixtures.random_empty(8, DIMS)
    shapes = [tuple(entries[0]["image_latents"].shape) * 2] * 2
    batches = [train.micro_batches(entries, shapes, empty, tc, s, 0, 1, device, dtype) for s in range(steps)]
    return model, batches


def train_steps(device, dtype, tc, offload, res=64):
    model, steps = model_and_batches(device, dtype, tc, res)
    params, _ = train.prepare_transformer(model, tc, device, offload)
    optimizer = train.make_optimizer(params, tc)
    with torch.enable_grad():
        losses = [train.train_step(model, params, optimizer, b, tc)[0] for b in steps]
    return model, losses, [p.detach().cpu().clone() for p in params]


TC = TrainConfig(gradient_checkpointing=True, compile=False, lr=1e-2, batch_size=2, attention_backend="default")


def test_train_step_equals_unoffloaded():
    cpu = torch.device("cpu")
    ref, ref_losses, ref_params = train_steps(cpu, torch.float32, TC, None)
    model, losses, params = train_steps(cpu, torch.float32, TC, 1)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=0)
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(p, torch.zeros_like(p)) for p in params)  # the LoRA B moved off zero
    off = model._block_offload
    n = len(flux_blocks(model))
    # block 0 stays resident; with full checkpointing each step fetches 1..n-1, then n-1..1 for the recompute
    per_step = list(range(1, n)) + list(range(n - 1, 0, -1))
    assert off.order == per_step * 2
    # after the step every streamed frozen tensor is the host copy again (the recompute stops before a block's
    # forward hook, so the block whose recompute ran last keeps its copy until the next block runs)
    assert off.active == {1}
    off._restore(1)
    for i, entries in off.host.items():
        for m, name, is_param, host in entries:
            t = (m._parameters if is_param else m._buffers)[name]
            assert t.data_ptr() == host.data_ptr(), (i, name)
    assert not off.pending or set(off.pending) <= set(off.host)


def test_sampling_with_offload_equals_without(tiny_path):
    from sample import prepare_transformer, sample
    from config import SampleConfig
    from load import load_components
    from PIL import Image

    cfg = tiny_config(tiny_path)
    sc = SampleConfig(num_inference_steps=3, attention_backend="default")
    image = Image.new("RGB", (64, 48), (200, 30, 40))
    c = load_components(cfg)
    prepare_transformer(c.transformer, sc, torch.device("cpu"))
    ref = sample(c, image, "make it blue", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                 output_type="latent").latents
    c.transformer = load_transformer(dataclasses.replace(cfg, offload=True))
    prepare_transformer(c.transformer, sc, torch.device("cpu"), 0)
    out = sample(c, image, "make it blue", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                 output_type="latent").latents
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    n = len(flux_blocks(c.transformer))
    assert c.transformer._block_offload.order == list(range(n)) * 3  # forward order, every step


def test_offload_needs_checkpointing_and_resident_in_range():
    cfg = Config(model=ModelConfig(offload=True), data=DataConfig(path="x"),
                 train=TrainConfig(gradient_checkpointing=False))
    with pytest.raises(ValueError, match="model.offload: training with block offload needs "
                                         "train.gradient_checkpointing True"):
        validate(cfg)
    with pytest.raises(ValueError, match=r"model.resident_blocks: expected an integer, each in|model.resident_blocks"):
        validate(dataclasses.replace(cfg, model=ModelConfig(offload=True, resident_blocks=60),
                                     train=TrainConfig(gradient_checkpointing=True)))
    validate(dataclasses.replace(cfg, train=TrainConfig(gradient_checkpointing=True)))


def test_activation_offload_same_step():
    cpu = torch.device("cpu")
    _, ref_losses, ref_params = train_steps(cpu, torch.float32, TC, None)
    _, losses, params = train_steps(cpu, torch.float32, dataclasses.replace(TC, activation_offload=True), None)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=0)
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_vae_tiling(tiny_path):
    """diffusers' tiled encode/decode, switched on by model.vae_tile: it must actually tile a larger image (the
    result differs from untiled: tiles are blended) and leave an image no larger than one tile untouched."""
    from encode import decode_latents, encode_image

    cfg = tiny_config(tiny_path)
    plain, tiled = load_vae(cfg), load_vae(dataclasses.replace(cfg, vae_tile=64))
    assert tiled.use_tiling and tiled.tile_sample_min_size == 64 and not plain.use_tiling
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a, b = encode_image(plain, x), encode_image(tiled, x)
    assert a.shape == b.shape and not torch.equal(a, b)
    err = ((a - b).norm() / a.norm()).item()
    assert err < 1.0, err  # a random tiny VAE: the error says nothing about the real one's (BENCHMARKS.md)
    assert torch.equal(encode_image(plain, x[..., :64, :64]), encode_image(tiled, x[..., :64, :64]))
    za, zb = decode_latents(plain, a), decode_latents(tiled, a)
    assert za.shape == zb.shape and not torch.equal(za, zb)


def resident_vs_offloaded(device, res: int):
    """Two train.py steps of a wider miniature (head dim 64) with every block resident, then with every block
    streamed: (losses, LoRA parameters, peak bytes on CUDA) of each."""
    dims = dict(DIMS, attention_head_dim=64, num_attention_heads=8, joint_attention_dim=512,
                axes_dims_rope=(16, 24, 24))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tc = dataclasses.replace(TC, attention_backend="auto" if device.type == "cuda" else "default", batch_size=1)
    out = []
    for offload in (None, 0):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        model = fixtures.full_size_transformer(device, dtype, **dims)
        entries, empty = fixtures.random_entries(1, res, 64, dims), fixtures.random_empty(64, dims)
        shapes = [tuple(entries[0]["image_latents"].shape) * 2]
        params, _ = train.prepare_transformer(model, tc, device, offload)
        optimizer = train.make_optimizer(params, tc)
        with torch.enable_grad():
            losses = [train.train_step(model, params, optimizer,
                                       train.micro_batches(entries, shapes, empty, tc, s, 0, 1, device, dtype),
                                       tc)[0] for s in range(2)]
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
        out.append((losses, [p.detach().float().cpu() for p in params], peak))
        del model, optimizer, params
    return out


def test_resident_vs_offloaded_cpu():
    # the GPU test's own code on the CPU (its first H200 run failed on a shape bug in the test before any offload)
    (l0, p0, _), (l1, p1, _) = resident_vs_offloaded(torch.device("cpu"), 32)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=0)
    for a, b in zip(p1, p0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_offload_train_step_gpu():
    """On CUDA: the offloaded step matches the resident one (bf16, the same kernels on copies of the weights), and
    the peak memory fell by all the streamed weights but two blocks' (the one running and the one prefetched)."""
    (l0, p0, peak0), (l1, p1, peak1) = resident_vs_offloaded(torch.device("cuda"), 256)
    dims = dict(DIMS, attention_head_dim=64, num_attention_heads=8, joint_attention_dim=512, axes_dims_rope=(16, 24, 24))
    model = fixtures.full_size_transformer("meta", torch.bfloat16, **dims)
    blocks = [sum(p.numel() * p.element_size() for p in b.parameters())
              for b in [*model.transformer_blocks, *model.single_transformer_blocks]]
    assert all(abs(a - b) <= 1e-2 * abs(a) for a, b in zip(l0, l1)), (l0, l1)
    # Whole tensors, not elements: Adam's first steps move each parameter by about lr * sign(gradient), so an
    # element whose gradient is near zero flips by 2 * lr when bf16 attention's backward sums in another order (its
    # first H200 run: 39 of 8192 elements of one tensor off by <= 0.0058 at lr 1e-2; the losses agreed). A wrong
    # block's weights would move every tensor, and the losses.
    for a, b in zip(p1, p0):
        assert (a - b).norm() <= 5e-2 * b.norm(), ((a - b).norm(), b.norm())
    # this miniature's activations outweigh its weights, so the saving is no fraction of the peak; its second H200
    # run saved 22.41 MiB of the 58.59 - 2 x 18.0 = 22.59 expected (allocator rounding, the LoRA's own tensors)
    assert peak0 - peak1 >= sum(blocks) - 2 * max(blocks) - 2 ** 20, (peak0, peak1, blocks)


def test_t5_fp8_weight_only(tiny_path):
    """model.t5_quant="fp8": the encoder blocks' Linears become weight-only FP8Linear (wo kept, as transformers keeps
    it in fp32), the prompt embeddings stay close to the dense T5's, and the cache key changes with the option."""
    from kontext_kernels.fp8 import FP8Linear
    from encode import get_t5_prompt_embeds
    from load import load_t5, load_t5_tokenizer, model_identity
    from torch import nn

    cfg = tiny_config(tiny_path)
    fp8 = dataclasses.replace(cfg, t5_quant="fp8")
    dense, q, tok = load_t5(cfg), load_t5(fp8), load_t5_tokenizer(cfg)
    names = {n for n, m in q.named_modules() if isinstance(m, FP8Linear)}
    assert names and all(q.get_submodule(n).weight_only for n in names)
    assert not any(n.endswith(".wo") for n in names)
    assert all(type(m) is nn.Linear for n, m in q.named_modules() if n.endswith(".wo"))
    prompts = ["make the square red", "a photo of a cat"]
    a, b = get_t5_prompt_embeds(dense, tok, prompts, max_sequence_length=32), \
        get_t5_prompt_embeds(q, tok, prompts, max_sequence_length=32)
    err = ((a - b).norm() / a.norm()).item()
    assert 0 < err < 5e-2, err  # e4m3 rounds each weight by ~2.6% RMS; measured on the tiny T5: see BENCHMARKS.md
    assert model_identity(fp8, fp8.t5, "t5") != model_identity(cfg, cfg.t5, "t5")
    assert model_identity(dataclasses.replace(cfg, vae_tile=512), cfg.vae, "vae") != \
        model_identity(cfg, cfg.vae, "vae")
