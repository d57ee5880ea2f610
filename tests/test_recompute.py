"""recompute.py (train.memory_budget): the plan's mix of levels, the policies' choices, and the same loss and LoRA
gradients at every budget as without recompute and with full recompute (CPU, fp32: to rounding; eager, and traced by
torch.compile's AOT autograd with the "aot_eager" backend, where the partitioner applies the policies as inductor's
does on the GPU; the GPU test compiles with inductor)."""

import dataclasses
from collections import Counter

import pytest
import torch

import fixtures
import quant as quant_module
import recompute
import train
from config import Config, DataConfig, ModelConfig, TrainConfig, validate

DIMS = dict(fixtures.MINI_DIMS, num_layers=2, num_single_layers=3)  # 5 blocks: budgets between levels mix them
TC = TrainConfig(gradient_checkpointing=True, compile=False, attention_backend="default", batch_size=2)
BUDGETS = (0.0, 0.2, 0.5, 0.8)  # full; narrow + attention; gemms + narrow; keep + gemms


def test_plan_mixes_two_neighbouring_levels_to_the_budget():
    for n in (5, 57):
        assert recompute.plan(n, 0.0) == ["full"] * n
        assert recompute.plan(n, 1.0) == ["keep"] * n
        for budget in (0.05, 0.15, 0.3, 0.5, 0.6, 0.9):
            levels = recompute.plan(n, budget)
            used = sorted(set(levels), key=recompute.LEVELS.index)
            assert len(used) <= 2 and (len(used) == 1 or recompute.LEVELS.index(used[1]) ==
                                       recompute.LEVELS.index(used[0]) + 1), (budget, used)
            mean = sum(recompute.SHARE[x] for x in levels) / n
            assert abs(mean - budget) <= 0.5 / n + 1e-9, (n, budget, mean)  # rounded to whole blocks
    # the upper level spread over the double and the single blocks alike, not bunched at one end
    levels = recompute.plan(57, (recompute.SHARE["keep"] + recompute.SHARE["gemms"]) / 2)
    assert 8 <= levels[:19].count("keep") <= 11 and 17 <= levels[19:].count("keep") <= 21, Counter(levels)
    with pytest.raises(ValueError, match="train.memory_budget"):
        recompute.plan(57, 1.5)


def test_policies_keep_attention_and_the_level_s_gemms():
    aten, save = torch.ops.aten, torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE
    x, down, up, lora_b = torch.empty(8, 32), torch.empty(32, 16), torch.empty(32, 128), torch.empty(16, 32)
    kept = {level: [recompute.policy(level, 16)(None, aten.mm.default, a, w) == save
                    for a, w in ((x, down), (x, up), (torch.empty(8, 16), lora_b))]
            for level in recompute.KEEPS}
    # (a narrowing GEMM, an up-projection, the LoRA's B: K = rank 16, always recomputed)
    assert kept == {"gemms": [True, True, False], "narrow": [True, False, False], "attention": [False, False, False]}
    assert recompute.policy("gemms", 16)(None, aten.addmm.default, torch.empty(128), x, up) == save
    assert recompute.policy("narrow", 16)(None, aten.addmm.default, torch.empty(128), x, up) != save
    for level in recompute.KEEPS:
        assert recompute.policy(level, 16)(None, aten.gelu.default, x) != save
        assert recompute.policy(level, 16)(None, aten._scaled_dot_product_cudnn_attention.default, x) == save


def loss_and_grads(tc: TrainConfig, compile_backend: str | None = None, steps: int = 1, quant: str = ""):
    """train.py's loss terms and the LoRA gradients of one batch on a seeded tiny model (lora_B drawn off zero so
    every LoRA tensor has a gradient; `quant`: its block Linears quantized as at load); `steps` calls, the last one's
    result (compiled: the first traces)."""
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = fixtures.full_size_transformer(cpu, torch.float32, **DIMS)
    if quant:
        quant_module.quantize_transformer(model, quant)
    params, _ = train.prepare_transformer(model, tc, cpu)
    if compile_backend:
        model.compile_repeated_blocks(backend=compile_backend)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    entries, empty = fixtures.random_entries(2, 32, 8, DIMS), fixtures.random_empty(8, DIMS)
    shapes = [tuple(entries[0]["image_latents"].shape) * 2] * 2
    (b, _, _), = train.micro_batches(entries, shapes, empty, tc, 0, 0, 1, cpu, torch.float32)
    model._attn_calls = 0  # attention module calls of the last step: forward, then the backward's recomputes

    def count(*_):
        model._attn_calls += 1
    for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
        block.attn.register_forward_hook(count)
    with torch.enable_grad():
        for _ in range(steps):
            model._attn_calls = 0
            loss = sum(train.batch_terms(model, b, tc, params).values())
            grads = torch.autograd.grad(loss, params)
    return model, loss.detach(), grads


def assert_same(got, ref):
    (_, loss, grads), (_, ref_loss, ref_grads) = got, ref
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert all(r.norm() > 0 for r in ref_grads)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_every_budget_gives_the_loss_and_gradients_of_no_recompute(monkeypatch):
    calls, policy = Counter(), recompute.policy

    def spy_policy(level, rank):
        def spy(ctx, op, *args, **kwargs):
            choice = policy(level, rank)(ctx, op, *args, **kwargs)
            calls[level, ctx.is_recompute, choice.name] += 1
            return choice
        return spy
    monkeypatch.setattr(recompute, "policy", spy_policy)
    ref = loss_and_grads(dataclasses.replace(TC, gradient_checkpointing=False))
    for budget in BUDGETS:
        got = loss_and_grads(dataclasses.replace(TC, memory_budget=budget))
        # budget 0: diffusers' own checkpointing of every block, as before the budget existed
        assert getattr(got[0], "_recompute_levels", None) == (Counter(recompute.plan(5, budget)) if budget else None)
        assert_same(got, ref)
        # every block but the "keep" ones ran its forward again in the backward
        assert got[0]._attn_calls == 5 + sum(x != "keep" for x in recompute.plan(5, budget)), budget
    # every selective policy chose: some outputs kept, others left to the recompute
    for name in recompute.KEEPS:
        assert calls[name, False, "MUST_SAVE"] > 0 and calls[name, False, "PREFER_RECOMPUTE"] > 0, calls


@pytest.mark.parametrize("quant", ["fp8", "nf4"])
def test_quantized_budget_equals_no_recompute(quant):
    """The fp8 Linears (_scaled_mm inside an autograd.Function) and the 4-bit ones (the dequant op, then mm) under
    the narrow and attention policies: the gradients of no recompute."""
    ref = loss_and_grads(dataclasses.replace(TC, gradient_checkpointing=False), quant=quant)
    got = loss_and_grads(dataclasses.replace(TC, memory_budget=0.2), quant=quant)
    assert set(got[0]._recompute_levels) == {"narrow", "attention"}
    assert_same(got, ref)


def test_compiled_budget_equals_no_recompute():
    """The selective checkpoint inside the compiled block (dynamo traces it, AOT autograd's partitioner applies the
    policy): a mix of narrow and attention blocks gives the uncompiled, unrecomputed gradients."""
    ref = loss_and_grads(dataclasses.replace(TC, gradient_checkpointing=False))
    got = loss_and_grads(dataclasses.replace(TC, memory_budget=0.2), compile_backend="aot_eager", steps=2)
    assert set(got[0]._recompute_levels) == {"narrow", "attention"}
    assert_same(got, ref)


def test_budget_config_rules():
    cfg = Config(data=DataConfig(path="d"), model=ModelConfig(path="m"))
    validate(dataclasses.replace(cfg, train=TrainConfig(gradient_checkpointing=True, memory_budget=0.5)))
    for train_cfg, model_cfg, words in (
            (TrainConfig(memory_budget=0.5), cfg.model, "needs train.gradient_checkpointing True"),
            (TrainConfig(gradient_checkpointing=True, memory_budget=0.5), ModelConfig(path="m", offload=True),
             "model.offload"),
            (TrainConfig(gradient_checkpointing=True, memory_budget=1.5), cfg.model, "train.memory_budget")):
        with pytest.raises(ValueError, match=words):
            validate(dataclasses.replace(cfg, train=train_cfg, model=model_cfg))


@pytest.mark.gpu
def test_compiled_budgets_gpu():
    """Inductor on CUDA, bf16, the tiny dims: every budget's LoRA gradients within bf16 rounding of no recompute."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda")
    entries, empty = fixtures.random_entries(1, 128, 16, DIMS), fixtures.random_empty(16, DIMS)
    shapes = [tuple(entries[0]["image_latents"].shape) * 2]

    def grads(tc):
        torch.manual_seed(0)
        model = fixtures.full_size_transformer(device, **DIMS)
        params, _ = train.prepare_transformer(model, tc, device)
        g = torch.Generator(device=device).manual_seed(1)
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=g, device=device, dtype=p.dtype) * 0.05)
        (b, _, _), = train.micro_batches(entries, shapes, empty, tc, 0, 0, 1, device, torch.bfloat16)
        with torch.enable_grad():
            for _ in range(2):
                out = torch.autograd.grad(sum(train.batch_terms(model, b, tc, params).values()), params)
        torch._dynamo.reset()
        return [x.float() for x in out]

    tc = dataclasses.replace(TC, compile=True, attention_backend="auto", batch_size=1)
    ref = grads(dataclasses.replace(tc, gradient_checkpointing=False))
    for budget in (*BUDGETS, 0.05):
        for a, r in zip(grads(dataclasses.replace(tc, memory_budget=budget)), ref):
            assert ((a - r).norm() / r.norm()).item() < 0.02, budget
