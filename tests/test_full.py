"""full.py (train.mode="full"): the tiny model learns the toy edit, the saved transformer/ folder samples equal to the
trained model (and through sample.py's config), checkpoints resume exactly, grad_accum, the torchao 8-bit AdamW with
bf16 stochastic rounding, the refusals, FSDP2 over 2 gloo processes == one process."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fixtures
import full
import train
from config import TrainConfig
from test_train import ROOT, edit_errors, run, tiny_cfg

# configs/tiny.py in full mode, as test_learns_the_toy_edit_from_the_control runs it for the LoRA: 300 steps at
# lr 3e-3 (the LoRA takes 1500 at 1e-2); no clipping (refused in full mode)
FULL = dict(mode="full", grad_clip=0.0)
LEARN = dict(FULL, steps=300, lr=3e-3, validate_every=0)


def full_cfg(tmp_path, **kw):
    return tiny_cfg(tmp_path, **{**FULL, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = full_cfg(tmp_path_factory.mktemp("full"), **LEARN)
    out = run(cfg)
    return cfg, out


def fresh_pairs(n=8):
    from tiny import ensure_toy_dataset

    fresh = ensure_toy_dataset(n=n, seed=1)
    return [(fresh / "control" / f"{i:03d}.png", fresh / "images" / f"{i:03d}.png") for i in range(n)]


def test_full_mode_learns_the_toy_edit_from_the_control(trained, pipe):
    """The LoRA test's criteria (tests/test_train.py) for the fully fine-tuned tiny model on fresh pairs: its edit
    with each pair's own control beats copying the control by 2x and another pair's control by 4x."""
    cfg, out = trained
    assert out["output"] == Path(cfg.out_dir) / "transformer" and not out["lora"].exists()
    assert (Path(cfg.out_dir) / "validation" / "step-000300.png").is_file()
    e = edit_errors(pipe, fresh_pairs(), transformer=out["transformer"].eval())
    print(e)
    assert e["own_control"] < 0.5 * e["copy_control"], e
    assert e["own_control"] < 0.5 * e["no_lora"], e
    assert e["own_control"] < 0.25 * e["rolled_controls"], e
    assert e["loss_own"] < 0.5 * e["loss_rolled"], e
    trainable = {n for n, p in out["transformer"].named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in trainable)
    assert not any("norm_q" in n or "norm_k" in n for n in trainable)  # RMS norms stay frozen


def test_saved_folder_samples_equal_to_the_trained_model(trained, components, tmp_path):
    """<out_dir>/transformer is a diffusers folder (config.json + safetensors): FluxTransformer2DModel.from_pretrained
    reads it, and sample() with it equals (torch.equal) sample() with the in-memory model; sample.py reads it through
    the config's model.transformer.path and writes the same image."""
    from diffusers import FluxTransformer2DModel
    from PIL import Image

    import sample

    cfg, out = trained
    folder = out["output"]
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    loaded = FluxTransformer2DModel.from_pretrained(folder, dtype=torch.float32).eval()
    mem = out["transformer"].eval()
    sd_a, sd_b = mem.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    control = Image.open(fresh_pairs(1)[0][0]).convert("RGB")
    kw = dict(prompt="make the square red", num_inference_steps=4, guidance_scale=1.0, max_sequence_length=32,
              output_type="latent", progress=False)
    outs = [sample.sample(dataclasses.replace(components, transformer=t), control,
                          generator=torch.Generator().manual_seed(0), **kw).latents for t in (mem, loaded)]
    assert torch.equal(*outs)

    conf = tmp_path / "cfg.py"  # configs/tiny.py with model.transformer.path set to the run's result
    conf.write_text(f"import dataclasses, runpy\nbase = runpy.run_path({str(ROOT / 'configs' / 'tiny.py')!r})"
                    f"['config']\nconfig = dataclasses.replace(base, model=dataclasses.replace(base.model, transformer="
                    f"dataclasses.replace(base.model.transformer, path={str(folder)!r})))\n")
    png = sample.main(sample.parse_args(["--config", str(conf), "--image", str(fresh_pairs(1)[0][0]), "--prompt",
                                         "make the square red", "--out", str(tmp_path / "a.png")]))
    ref = sample.sample(dataclasses.replace(components, transformer=mem), control, "make the square red",
                        generator=torch.Generator().manual_seed(cfg.sample.seed),
                        num_inference_steps=cfg.sample.num_inference_steps, guidance_scale=cfg.sample.guidance_scale,
                        max_sequence_length=cfg.sample.max_sequence_length, progress=False).images[0]
    assert list(Image.open(png).getdata()) == list(ref.getdata())


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "torchao_adamw8bit"])
def test_checkpoints_resume_exactly(tmp_path, optimizer):
    """2 steps, then resume to 4 == 4 straight (weights bit-equal), with each optimizer's state (torch's, bitsandbytes'
    8-bit codes, torchao's OptimState8bit); checkpoints are full-<content hash> folders holding the trained tensors
    and the optimizer state, latest.json names the newest, and a LoRA run refuses them."""
    straight = run(full_cfg(tmp_path / "s", steps=4, caption_dropout=0.3, optimizer=optimizer))
    run(full_cfg(tmp_path / "r", steps=2, caption_dropout=0.3, optimizer=optimizer))
    ckpts = tmp_path / "r" / "run" / "checkpoints"
    (c,) = ckpts.glob("full-*")
    st = json.loads((c / "state.json").read_text())
    assert st["step"] == 2 and st["files"] == ["weights-0-of-1.safetensors", "optimizer-0-of-1.safetensors"]
    opt = load_file(c / "optimizer-0-of-1.safetensors")
    assert any(k.endswith((".exp_avg_sq", ".state2", ".exp_avg_sq.codes")) for k in opt), sorted(opt)[:8]
    assert len(load_file(c / "weights-0-of-1.safetensors")) > 10
    resumed = run(dataclasses.replace(full_cfg(tmp_path / "r", steps=4, caption_dropout=0.3, optimizer=optimizer),
                                      resume="latest"))
    a, b = straight["transformer"].state_dict(), resumed["transformer"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in straight["history"][2:]]
    assert json.loads((ckpts / "latest.json").read_text())["step"] == 4
    lora = dataclasses.replace(tiny_cfg(tmp_path / "r", steps=6), resume=str(c))
    with pytest.raises(ValueError, match="trained with train.mode = 'full', the config says 'lora'"):
        run(lora)  # refused before the model loads (lora.resume_problems); load_checkpoint refuses it too


def test_grad_accum_keeps_a_buffer(components):
    """grad_accum 2 in full mode (the hooks step on the last micro-batch, after the gradients accumulated in .grad)
    == train_step's usual accumulate-then-step with torch's AdamW over the same micro-batches."""
    import copy


    tc = TrainConfig(mode="full", grad_clip=0.0, grad_accum=2, batch_size=2, lr=1e-3)
    entries, empty = fixtures.random_entries(4, 32, 8, fixtures.MINI_DIMS), fixtures.random_empty(8, fixtures.MINI_DIMS)
    shapes = [tuple(e["image_latents"].shape) * 2 for e in entries]
    cpu = torch.device("cpu")
    a, b = copy.deepcopy(components.transformer), copy.deepcopy(components.transformer)
    pa, pb = full.prepare_full(a, tc, cpu), full.prepare_full(b, tc, cpu)
    opt_a, opt_b = train.make_optimizer(pa, tc), torch.optim.AdamW(pb, lr=tc.lr, betas=tc.betas,
                                                                   weight_decay=tc.weight_decay)
    with torch.enable_grad():
        for step in range(2):
            for model, params, opt, mode in ((a, pa, opt_a, "full"), (b, pb, opt_b, "lora")):
                c = dataclasses.replace(tc, mode=mode)
                batches = train.micro_batches(entries, shapes, empty, c, step, 0, 1, cpu, torch.float32)
                train.train_step(model, params, opt, batches, c)
    assert sum(not torch.equal(p, q) for p, q in zip(pa, components.transformer.parameters()) if p.shape == q.shape)
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_torchao_adamw8bit_stochastic_rounding_and_resume():
    """torchao_adamw8bit on a bf16 Linear (one of >= 4096 values: 8-bit moments; its bias: plain ones), stepped in the
    backward: 8-bit state; updates far below bf16's resolution survive on average (stochastic rounding) where
    round-to-nearest (torch AdamW on the same bf16 weights) loses them all; the state round-trips through the
    checkpoint layout and 2 + 2 steps == 4."""
    from torchao.optim.subclass_8bit import OptimState8bit

    def model():
        torch.manual_seed(0)
        m = torch.nn.Linear(64, 128).to(torch.bfloat16)
        with torch.no_grad():
            m.weight.fill_(1.0)  # bf16 spacing 2^-7 at 1.0: an update of lr=1e-4 is 1/78 of it
        return m

    def steps(m, opt, n, start=0):
        for _ in range(start, start + n):  # a constant gradient: each Adam update is -lr exactly (m / sqrt(v) = 1)
            with torch.enable_grad():
                (m.weight.float().sum() + m.bias.float().sum()).backward()
            opt.grad_norm()

    tc = TrainConfig(mode="full", optimizer="torchao_adamw8bit", lr=1e-4, weight_decay=0.0, grad_clip=0.0)
    m = model()
    opt = full.InBackwardOptimizer(list(m.parameters()), tc)
    steps(m, opt, 4)
    assert isinstance(opt.steppers[m.weight].state["exp_avg"], OptimState8bit)
    assert type(opt.steppers[m.bias].state["exp_avg"]) is torch.Tensor
    drift = 1.0 - m.weight.float().mean()
    assert 3.5e-4 < drift < 4.5e-4, drift  # 4 updates of -1e-4, unbiased on average (bf16's step below 1 is 2^-8)
    rtn = model()
    opt_rtn = full.InBackwardOptimizer(list(rtn.parameters()), dataclasses.replace(tc, optimizer="adamw"))
    steps(rtn, opt_rtn, 4)
    assert torch.all(rtn.weight == 1.0)  # round to nearest: every update lost

    half = model()
    opt_half = full.InBackwardOptimizer(list(half.parameters()), tc)
    steps(half, opt_half, 2)
    saved = {n: full._flat_state(opt_half.steppers[p].state, n) for n, p in half.named_parameters()}
    weights = {n: p.detach().clone() for n, p in half.named_parameters()}
    again = model()
    opt_again = full.InBackwardOptimizer(list(again.parameters()), tc)
    with torch.no_grad():
        for n, p in again.named_parameters():
            p.copy_(weights[n])
            opt_again.steppers[p].state = full._unflat_state(*saved[n], n, p)
    opt_again.steps = opt_half.steps
    steps(again, opt_again, 2, start=2)
    assert torch.equal(again.weight, m.weight) and torch.equal(again.bias, m.bias)


def test_nan_loss_stops_before_the_update(tmp_path):
    """The update happens inside the backward, so a non-finite loss is caught before it: the run stops naming the
    step, the samples and the last good checkpoint (whose weights are finite)."""
    from safetensors.torch import load_file as read

    cfg = full_cfg(tmp_path, steps=4, lr=1e38, save_every=1)
    with pytest.raises(FloatingPointError, match=r"at step \d+ .*on samples \[.*\]; last good checkpoint: .*full-"):
        run(cfg)
    latest = json.loads((Path(cfg.out_dir) / "checkpoints" / "latest.json").read_text())
    w = read(Path(cfg.out_dir) / "checkpoints" / latest["path"] / "weights-0-of-1.safetensors")
    assert latest["step"] >= 1 and w and all(torch.isfinite(t).all() for t in w.values())


@pytest.mark.parametrize("flags, field", [
    (["--model.quant", "fp8"], "model.quant"),
    (["--model.offload", "--train.gradient-checkpointing"], "model.offload"),
    (["--train.lora-format", "kohya"], "train.lora_format"),
    (["--train.grad-clip", "1.0"], "train.grad_clip"),
    (["--train.region-token"], "train.region_token"),
])
def test_bad_full_configs_are_refused_before_loading(flags, field, tmp_path):
    """Full mode with a quantized base, offload, a LoRA file format, gradient clipping or a region token: one
    ValueError naming the field, from the config alone (model.path points nowhere: nothing was loaded)."""
    from config import cli

    with pytest.raises(ValueError, match=rf"{field}: .*train.mode='full'"):
        cli(["--config", str(ROOT / "configs" / "tiny.py"), "--train.mode", "full", "--train.grad-clip", "0", *flags,
             "--model.path", str(tmp_path / "no-model")])
    with pytest.raises(ValueError, match="train.optimizer: 'torchao_adamw8bit' is for train.mode='full'"):
        cli(["--config", str(ROOT / "configs" / "tiny.py"), "--train.optimizer", "torchao_adamw8bit"])


@pytest.mark.slow
def test_fsdp_two_processes_equal_one(tmp_path):
    """torchrun with 2 gloo processes (FSDP2: each block and the root sharded, gradient checkpointing on) x batch 2 ==
    one process x batch 4 over the same global batches, 3 steps; then resume from the sharded checkpoint to 4.
    Tolerance: elementwise 1e-4 relative + 1e-5 absolute, the whole model 1e-6 relative: the reduce-scatter sums in
    another order than one process's batch, and Adam's m / sqrt(v) amplifies last-bit differences of near-zero
    gradients (1 of 65536 values of one weight 4.3e-6 apart, the rest within 2e-6)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    common = [str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.py"), "--train.mode", "full",
              "--train.grad-clip", "0", "--train.lr", "1e-3", "--train.gradient-checkpointing",
              "--train.validate-every", "-1", "--data.cache-dir", str(tmp_path / "cache")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561"]
    subprocess.run([sys.executable, *common, "--train.steps", "4", "--train.batch-size", "4", "--out-dir",
                    str(tmp_path / "one")], check=True, env=env, capture_output=True)
    for steps, more in (("3", []), ("4", ["--resume", "latest"])):
        r = subprocess.run([*torchrun, *common, "--train.steps", steps, "--train.batch-size", "2", *more,
                            "--out-dir", str(tmp_path / "two")], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "FSDP2 over 2 processes" in r.stdout
    for c in (tmp_path / "two" / "checkpoints").glob("full-*"):
        assert json.loads((c / "state.json").read_text())["world"] == 2 and (c / "weights-1-of-2.safetensors").is_file()
    a = load_file(next((tmp_path / "one" / "transformer").glob("*.safetensors")))
    b = load_file(next((tmp_path / "two" / "transformer").glob("*.safetensors")))
    assert a.keys() == b.keys()
    # per element, to the step size: AdamW divides each gradient element by its own running RMS, so a near-zero
    # gradient summed in another order (gloo's all-reduce vs one process) can move its weight by a fraction of lr
    # (seen: one element of 16384 off by 2.3e-5 at lr 1e-3, on this machine at this code's parent 9757755 too);
    # the whole model must still agree to 1e-6 of its norm (below)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a) ** 0.5
    assert num <= 1e-6 * sum(float(a[k].double().norm() ** 2) for k in a) ** 0.5, num
    base = load_file(next((Path(tiny_cfg(tmp_path).model.path) / "transformer").glob("*.safetensors")))
    assert sum(not torch.equal(a[k], base[k]) for k in a) > 10  # it trained


# ---------------------------------------------------------------- GPU: the shipped full-mode step


@pytest.mark.gpu
@pytest.mark.parametrize("compile_", [True, False], ids=["compile", "eager"])
def test_full_step_gpu(compile_):
    """3 steps of train.py's full-mode step with configs/full_bf16.py's TrainConfig (torchao 8-bit AdamW compiled
    inside the backward, bf16 stochastic rounding, checkpointing, attention "auto") on a reduced-depth, full-width FLUX
    transformer (2 double + 4 single blocks) at the 1024^2 Kontext token count: finite losses, every trained tensor
    moved, 8-bit moments for the large ones, and the peak memory within the README's per-parameter model (weights 2
    + moments ~2.03 bytes per parameter, plus activations and one block's transients)."""
    from config import load_config
    from torchao.optim.subclass_8bit import OptimState8bit

    device = torch.device("cuda")
    model = fixtures.full_size_transformer(device, num_layers=2, num_single_layers=4)
    tc = dataclasses.replace(load_config(ROOT / "configs" / "full_bf16.py").train, compile=compile_, lr=1e-4)
    try:
        torch.cuda.reset_peak_memory_stats()
        params, attention = train.prepare_transformer(model, tc, device)
        opt = train.make_optimizer(params, tc)
        entries, empty = fixtures.random_entries(1, 1024, 512), fixtures.random_empty(512)
        shapes = [tuple(entries[0]["image_latents"].shape) * 2]
        before = [p.detach().clone() for p in params]
        with torch.enable_grad():
            for step in range(3):
                batches = train.micro_batches(entries, shapes, empty, tc, step, 0, 1, device, torch.bfloat16)
                loss, grad_norm, n = train.train_step(model, params, opt, batches, tc)
                assert n == 1 and loss == loss and grad_norm > 0, (step, loss, grad_norm)
        torch.cuda.synchronize()
        moved = [not torch.equal(a, p) for a, p in zip(before, params)]
        assert all(moved), f"{moved.count(False)} of {len(moved)} trained tensors never changed"
        big = max(params, key=lambda p: p.numel())
        assert isinstance(opt.steppers[big].state["exp_avg"], OptimState8bit)
        del before
        n_all = sum(p.numel() for p in model.parameters())
        model_gib = (2 * n_all + 2.04 * sum(p.numel() for p in params)) / 2 ** 30
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
        print(f"peak {peak:.1f} GiB, weights + optimizer {model_gib:.1f} GiB")
        assert peak < model_gib + 2 * 2.5 + 8, (peak, model_gib)  # + the clone of `before` + activations
    finally:
        del model
        torch._dynamo.reset()
        torch.cuda.empty_cache()
