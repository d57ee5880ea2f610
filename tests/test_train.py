"""train.py: objective, cached == uncached, exact resume, DDP == one process, LoRA format, learning, errors."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adapters
import fixtures
import objective
import train
from config import cli, load_config
from lora import load_lora, unload_lora

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(tmp_path, **train_kw):
    cfg = load_config(ROOT / "configs" / "tiny.py")
    kw = dict(steps=6, save_every=0, validate_every=-1, log_every=1)
    kw.update(train_kw)
    return dataclasses.replace(cfg, out_dir=str(tmp_path / "run"), train=dataclasses.replace(cfg.train, **kw),
                               data=dataclasses.replace(cfg.data, cache_dir=str(tmp_path / "cache")))


def run(cfg):
    with torch.enable_grad():
        return train.main(cfg)


def test_timestep_sampling_and_schedule():
    cfg = train.TrainConfig(timestep_sampling="logit_normal", warmup_steps=2, steps=10)
    t = objective.sample_timesteps(10000, cfg, 4096, torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1 and abs(t.mean() - 0.5) < 0.02
    shifted = objective.sample_timesteps(10000, dataclasses.replace(cfg, resolution_shift=True), 4096,
                                         torch.Generator().manual_seed(0))
    assert shifted.mean() > t.mean() + 0.1  # large images: more weight near noise
    assert [round(train.lr_factor(s, cfg), 3) for s in (0, 1, 2, 10)] == [0.5, 1.0, 1.0, 0.0]


def test_cached_equals_uncached(tmp_path):
    a = run(tiny_cfg(tmp_path / "a", cached=True))["history"]
    b = run(tiny_cfg(tmp_path / "b", cached=False))["history"]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # same tensors in, same losses out
    assert a[0]["loss"] != a[1]["loss"]


def test_resume_is_exact(tmp_path):
    straight = run(tiny_cfg(tmp_path / "s", steps=6, caption_dropout=0.3))
    first = tiny_cfg(tmp_path / "r", steps=3, caption_dropout=0.3)
    run(first)
    ckpts = list((Path(first.out_dir) / "checkpoints").glob("lora-*"))
    assert len(ckpts) == 1 and json.loads((ckpts[0] / "state.json").read_text())["step"] == 3
    resumed = dataclasses.replace(tiny_cfg(tmp_path / "r", steps=6, caption_dropout=0.3), resume="latest")
    run(resumed)
    a, b = load_file(straight["lora"]), load_file(Path(resumed.out_dir) / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_named_by_content_and_pruned(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=8, save_every=2, keep_checkpoints=2)
    run(cfg)
    ckpts = sorted((Path(cfg.out_dir) / "checkpoints").glob("lora-*"))
    steps = sorted(json.loads((c / "state.json").read_text())["step"] for c in ckpts)
    assert steps == [6, 8]
    latest = json.loads((Path(cfg.out_dir) / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 8 and (Path(cfg.out_dir) / "checkpoints" / latest["path"]).is_dir()
    assert json.loads((ckpts[0] / "config.json").read_text())["train"]["steps"] == 8


def test_lora_loads_in_pipeline_and_changes_output(tmp_path, pipe):
    from tests_util import edit_with_pipe

    cfg = tiny_cfg(tmp_path, steps=20)
    lora = run(cfg)["lora"]
    sd = load_file(lora)
    # the default lora_format, comfyui: PEFT keys plus one `.alpha` tensor per module (convert.py)
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight", ".alpha")) for k in sd)
    assert any(k.endswith(".alpha") for k in sd)
    base = edit_with_pipe(pipe)
    pipe.load_lora_weights(str(lora))
    try:
        with_lora = edit_with_pipe(pipe)
    finally:
        pipe.unload_lora_weights()
    assert (with_lora - base).abs().max() > 1e-3
    assert torch.equal(edit_with_pipe(pipe), base)


def edit_errors(pipe, pairs, lora=None, steps: int = 8, transformer=None) -> dict:
    """Latent mean squared errors to the targets over fresh toy pairs (never trained on): the sampled edit with each
    pair's own control, the same with the controls rolled by one (another pair's control, own target and prompt),
    copying the control, and the sampled edit without the LoRA; plus train.py's flow-matching loss at t in {0.25,
    0.5, 0.75} with own vs rolled controls. `transformer` (train.mode full): the trained model in place of the
    pipeline's for those measurements, instead of the LoRA file."""
    from PIL import Image

    from encode import encode_image, latent_ids, pack_latents, preprocess_image

    controls = [Image.open(c).convert("RGB") for c, _ in pairs]
    targets = [pack_latents(encode_image(pipe.vae, preprocess_image(Image.open(t).convert("RGB")))) for _, t in pairs]
    embeds, pooled, text_ids = pipe.encode_prompt("make the square red", prompt_2=None, max_sequence_length=32)

    def sampled(images):
        return [pipe(image=im, prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=im.height, width=im.width,
                     max_area=im.height * im.width, num_inference_steps=steps, guidance_scale=1.0,
                     _auto_resize=False, output_type="latent", generator=torch.Generator().manual_seed(i)).images
                for i, im in enumerate(images)]

    def mse(outs):
        return float(torch.stack([((o - t) ** 2).mean() for o, t in zip(outs, targets)]).mean())

    rolled = controls[1:] + controls[:1]
    out = {"copy_control": mse([pack_latents(encode_image(pipe.vae, preprocess_image(c))) for c in controls])}
    out["no_lora"] = mse(sampled(controls))
    base = pipe.transformer
    ours = transformer is None and adapters.file_kind(load_file(lora)) != "lora"  # lokr / loha / dora: diffusers
    if transformer is not None:                                                    # does not load them for Flux
        pipe.transformer = transformer
    elif ours:
        load_lora(pipe.transformer, lora)
    else:
        pipe.load_lora_weights(str(lora))
    try:
        out["own_control"], out["rolled_controls"] = mse(sampled(controls)), mse(sampled(rolled))
        x0 = torch.cat(targets)
        control = torch.cat([pack_latents(encode_image(pipe.vae, preprocess_image(c))) for c in controls])
        n, side = x0.shape[0], controls[0].height // 8  # latent rows
        ids = torch.cat([latent_ids(side, side, 0.0), latent_ids(side, side, marker=1.0)])
        g = torch.Generator().manual_seed(0)
        for name, ctrl in (("loss_own", control), ("loss_rolled", control.roll(1, 0))):
            out[name] = sum(float(objective.flow_matching_loss(
                pipe.transformer, x0, torch.randn(x0.shape, generator=g), torch.full((n,), t), ctrl,
                embeds.expand(n, -1, -1), pooled.expand(n, -1), ids, text_ids, 1.0)) for t in (0.25, 0.5, 0.75)) / 3
    finally:
        if ours:
            unload_lora(pipe.transformer)
        elif transformer is None:
            pipe.unload_lora_weights()
        pipe.transformer = base
    return out


@pytest.mark.slow
def test_learns_the_toy_edit_from_the_control(tmp_path):
    """configs/tiny.py as shipped, then fresh toy pairs (another seed): the LoRA's edit is much closer to the target
    with each pair's own control than with another pair's (the control is used, and paired with the right target),
    closer than copying the control and than the copy-trained base without the LoRA; the held-out loss agrees."""
    from diffusers import FluxKontextPipeline

    from tiny import ensure_toy_dataset

    steps = load_config(ROOT / "configs" / "tiny.py").train.steps
    cfg = tiny_cfg(tmp_path, steps=steps, validate_every=0)
    run(cfg)
    assert (Path(cfg.out_dir) / "validation" / f"step-{steps:06d}.png").is_file()
    pipe = FluxKontextPipeline.from_pretrained(cfg.model.path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    fresh = ensure_toy_dataset(n=8, seed=1)
    pairs = [(fresh / "control" / f"{i:03d}.png", fresh / "images" / f"{i:03d}.png") for i in range(8)]
    e = edit_errors(pipe, pairs, Path(cfg.out_dir) / "lora.safetensors")
    print(e)
    assert e["own_control"] < 0.5 * e["copy_control"], e
    assert e["own_control"] < 0.5 * e["no_lora"], e
    assert e["own_control"] < 0.25 * e["rolled_controls"], e
    assert e["loss_own"] < 0.5 * e["loss_rolled"], e


@pytest.mark.slow
@pytest.mark.parametrize("kw, result", [(dict(ema_decay=0.99, ema_start_step=500), "lora.ema.safetensors"),
                                        (dict(optimizer="prodigy", lr=0.3), "lora.safetensors")],
                         ids=["ema", "prodigy"])
def test_learns_with_ema_or_prodigy(tmp_path, kw, result):
    """configs/tiny.py with an EMA (decay 0.99 from step 500; its lora.ema.safetensors is judged) or with Prodigy:
    test_learns_the_toy_edit_from_the_control's bounds on fresh toy pairs. Prodigy at lr 1.0 (its own step size)
    overshot on this toy (batch 4, 1500 steps: own-control error 1.19, copying 0.56); lr 0.3 scales its estimate."""
    from diffusers import FluxKontextPipeline

    from tiny import ensure_toy_dataset

    cfg = tiny_cfg(tmp_path, steps=load_config(ROOT / "configs" / "tiny.py").train.steps, **kw)
    run(cfg)
    pipe = FluxKontextPipeline.from_pretrained(cfg.model.path, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    fresh = ensure_toy_dataset(n=8, seed=1)
    pairs = [(fresh / "control" / f"{i:03d}.png", fresh / "images" / f"{i:03d}.png") for i in range(8)]
    e = edit_errors(pipe, pairs, Path(cfg.out_dir) / result)
    print(result, e)
    assert e["own_control"] < 0.5 * e["copy_control"], e
    assert e["own_control"] < 0.5 * e["no_lora"], e
    assert e["own_control"] < 0.25 * e["rolled_controls"], e
    assert e["loss_own"] < 0.5 * e["loss_rolled"], e


def test_nan_loss_stops_with_context(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=4, lr=1e38, grad_clip=0.0, save_every=1, optimizer="adamw")
    with pytest.raises(FloatingPointError, match=r"at step \d+ .*on samples \[.*\]; last good checkpoint: .*lora-"):
        run(cfg)


def test_config_typo_fails():
    with pytest.raises(SystemExit):
        cli(["--config", str(ROOT / "configs" / "tiny.py"), "--train.lrr", "1e-4"])
    with pytest.raises(ValueError, match="does not exist"):
        cli(["--config", "configs/nope.py"])


def test_bad_dataset_fails_before_loading(tmp_path):
    cfg = tiny_cfg(tmp_path)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(tmp_path / "missing")),
                              model=dataclasses.replace(cfg.model, path=str(tmp_path / "no-model")))
    with pytest.raises(ValueError, match="dataset .*missing.* does not exist"):
        run(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["tiny", "region_tiny"])
def test_ddp_two_processes_equal_one(tmp_path, config):
    """torchrun with 2 gloo processes x batch 2 == one process x batch 4 over the same global batches (region_tiny:
    the region token, in its own DDP, and the IP-Adapter embeddings too)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    common = [str(ROOT / "train.py"), "--config", str(ROOT / "configs" / f"{config}.py"), "--train.steps", "3",
              "--train.validate-every", "-1", "--data.cache-dir", str(tmp_path / "cache")]
    subprocess.run([sys.executable, *common, "--train.batch-size", "4", "--out-dir", str(tmp_path / "one")],
                   check=True, env=env, capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(29533 + len(config)), *common, "--train.batch-size", "2",
                        "--out-dir", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "lora.safetensors"), load_file(tmp_path / "two" / "lora.safetensors")
    if config == "region_tiny":
        ra, rb = (load_file(tmp_path / d / "lora.region.safetensors") for d in ("one", "two"))
        for k in ra:
            torch.testing.assert_close(ra[k], rb[k], rtol=1e-4, atol=5e-5)
    assert a.keys() == b.keys()
    # the two reduction orders differ in the last bits, and Adam's m / sqrt(v) magnifies that on near-zero
    # gradients (one of 1024 values 1.4e-5 apart with the copy-pretrained tiny model): elementwise to 5e-5,
    # the whole LoRA to 1e-4 relative
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=5e-5)
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a) ** 0.5
    assert num <= 1e-4 * sum(float(a[k].double().norm() ** 2) for k in a) ** 0.5
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)


@pytest.mark.parametrize("name", ["tiny", "bf16", "bf16_24gb", "fp8", "fp4", "krea_bf16", "region_depth", "region_tiny",
                                  "full_bf16"])
def test_every_config_file_loads(name):
    cfg = load_config(ROOT / "configs" / f"{name}.py")
    assert cfg.train.steps > 0 and cfg.model.path


def test_compile_choice():
    """Regional compile on CUDA for every transformer, 4-bit included; off only when asked, on the CPU, or with block
    offload. compile_choice reads the device's type only, so "cuda" is asked here without a GPU."""
    import quant
    from config import TrainConfig

    cuda = torch.device("cuda")
    for kind in ("nf4", "fp4", "fp8"):
        model = quant.quantize_transformer(fixtures.full_size_transformer("cpu", **fixtures.MINI_DIMS), kind)
        assert train.compile_choice(model, TrainConfig(), cuda) == "on", kind
    assert train.compile_choice(model, TrainConfig(compile=False), cuda) == "off"
    assert train.compile_choice(model, TrainConfig(), torch.device("cpu")) == "off (CPU)"
    model._block_offload = object()
    assert train.compile_choice(model, TrainConfig(), cuda).startswith("off (block offload")


# ---------------------------------------------------------------- GPU: the crash matrix of the shipped step


@pytest.mark.gpu
@pytest.mark.parametrize("compile_", [True, False], ids=["compile", "eager"])
@pytest.mark.parametrize("ckpt", [True, False], ids=["ckpt", "no-ckpt"])
@pytest.mark.parametrize("kind", ["bf16", "fp8", "fp8-backward", "nf4", "fp4"])
def test_crash_matrix_gpu(kind, ckpt, compile_):
    """3 steps of train.py's own step (prepare_transformer, micro_batches, train_step) with attention "auto" on a
    reduced-depth, full-width FLUX transformer (3072 wide, 24 heads of 128; 2 double + 4 single blocks: the cuDNN
    crash needed both block kinds) at the 1024^2 Kontext token count (4096 target + 4096 control + 512 text): a
    finite loss, a finite non-zero gradient norm, and every LoRA tensor moved (weight decay 0: only a gradient moves
    one). "fp8-backward": fp8 with the fp8 input gradient (configs/fp8.py).

    Compiled, first: each LoRA tensor's gradient of step 0 equals the same step run eager (set_stance
    "force_eager", the same modules) within 10% relative L2 error, with lora_B drawn off its zero init (then put
    back) so every tensor has a gradient. Per tensor, since the failure hid in a few: on torch 2.11 the 4-bit
    single blocks' q/k/v LoRA got exactly zero (pytorch#180642), a small share of the whole gradient's norm. 10%:
    bf16 keeps 8 significant bits and compile re-rounds the fused elementwise work of 6 blocks both ways (the fp8
    kinds then re-round activations, and gradients in e5m2, from slightly different inputs), so a correct compiled
    gradient is expected a few percent off eager (two correct attention paths, flash and cuDNN, differ by < 5% in
    tests/test_attention.py); a dropped gradient is 100% off, a halved one (pytorch#183604) 50%. The measured
    errors are printed (-s)."""
    import quant

    from config import TrainConfig

    device = torch.device("cuda")
    model = fixtures.full_size_transformer(device, num_layers=2, num_single_layers=4)
    if kind != "bf16":
        model = quant.quantize_transformer(model, kind.split("-")[0])
    tc = TrainConfig(gradient_checkpointing=ckpt, compile=compile_, attention_backend="auto", lr=1e-3,
                     weight_decay=0.0, fp8_backward=kind == "fp8-backward")
    try:
        params, attention = train.prepare_transformer(model, tc, device)
        assert attention == "cudnn"
        assert train.compile_choice(model, tc, device) == ("on" if compile_ else "off")
        entries, empty = fixtures.random_entries(1, 1024, 512), fixtures.random_empty(512)
        shapes = [tuple(entries[0]["image_latents"].shape) * 2]

        def batches(step):
            return train.micro_batches(entries, shapes, empty, tc, step, 0, 1, device, torch.bfloat16)

        if compile_:
            (b, _, _), = batches(0)
            errors = compiled_vs_eager_errors(model, params, b, tc)
            worst = sorted(errors.items(), key=lambda kv: -kv[1])
            print(f"\n{kind} ckpt={ckpt}: compiled vs eager LoRA gradients, worst relative errors {worst[:3]}")
            assert worst[0][1] < 0.1, worst[:8]
        optimizer = train.make_optimizer(params, tc)
        before = [p.detach().clone() for p in params]
        with torch.enable_grad():
            for step in range(3):
                loss, grad_norm, n = train.train_step(model, params, optimizer, batches(step), tc)
                assert n == 1
                assert np_finite(loss) and np_finite(grad_norm) and grad_norm > 0, (step, loss, grad_norm)
        torch.cuda.synchronize()
        moved = [not torch.equal(a, p) for a, p in zip(before, params)]
        assert all(moved), f"{moved.count(False)} of {len(moved)} LoRA tensors never changed"
    finally:
        del model
        torch._dynamo.reset()
        torch.cuda.empty_cache()


def compiled_vs_eager_errors(model, params, b, tc) -> dict[str, float]:
    """LoRA tensor name -> relative L2 error of its compiled gradient on batch `b` against the eager one (the same
    compiled model under set_stance("force_eager")). The LoRA is redrawn (std 0.02, lora_B off its zero init, so
    every tensor has a gradient) for the comparison and put back after it."""
    names = [n for n, p in model.named_parameters() if "lora_" in n]
    assert len(names) == len(params)
    init = [p.detach().clone() for p in params]
    g = torch.Generator(device=params[0].device).manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.02, generator=g)

    def grads():
        loss = sum(train.batch_terms(model, b, tc, params).values())
        return [x.float() for x in torch.autograd.grad(loss, params)]

    with torch.enable_grad():
        with torch.compiler.set_stance("force_eager"):
            eager = grads()
        compiled = grads()
    with torch.no_grad():
        for p, v in zip(params, init):
            p.copy_(v)
    assert all(e.norm() > 0 for e in eager), [n for n, e in zip(names, eager) if e.norm() == 0]
    return {n: ((c - e).norm() / e.norm()).item() for n, e, c in zip(names, eager, compiled)}


def np_finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def test_run_folder_rules_end_to_end(tmp_path, capsys):
    """A second run into a used out_dir stops before any model loads; --overwrite starts afresh (its log holds only
    its own steps); resume at or past train.steps trains nothing and says so."""
    cfg = tiny_cfg(tmp_path, steps=4, save_every=2)
    run(cfg)
    first_lora = (Path(cfg.out_dir) / "lora.safetensors").read_bytes()
    again = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=2))
    with pytest.raises(ValueError, match="holds an earlier run"):
        run(again)
    assert (Path(cfg.out_dir) / "lora.safetensors").read_bytes() == first_lora
    out = run(dataclasses.replace(again, overwrite=True))
    log = [json.loads(line) for line in (Path(cfg.out_dir) / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2] and len(out["history"]) == 2
    ckpts = list((Path(cfg.out_dir) / "checkpoints").glob("lora-*"))
    assert [json.loads((c / "state.json").read_text())["step"] for c in ckpts] == [2]
    capsys.readouterr()
    done = run(dataclasses.replace(again, resume="latest"))
    assert done["history"] == [] and "at step 2; train.steps is 2: nothing left to train" in capsys.readouterr().out


def test_user_errors_are_one_line_exit_2(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.py"),
                        "--out-dir", str(tmp_path / "run"), "--data.held-out", "100", "--train.steps", "2"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "train.py: error: data.held_out=100 leaves nothing to train on: the dataset has 24 samples" in r.stderr


def test_resume_without_checkpoint_fails_before_caching(tmp_path):
    cfg = dataclasses.replace(tiny_cfg(tmp_path), resume="latest")
    with pytest.raises(ValueError, match="no checkpoint saved yet"):
        run(cfg)
    assert not list((tmp_path / "cache").glob("*.safetensors"))  # nothing was encoded first


def test_batch_plan_and_real_batch_sizes(tmp_path):
    plan = train.batch_plan([(1,)] * 5 + [(2,)] * 3, 4)
    assert plan == ("batching: 2 shape bucket(s), 3 batches per epoch (1 x 4, 1 x 3, 1 x 1 samples); "
                    "batch_size 4 is not always filled")
    assert train.batch_plan([(1,)] * 8, 4).endswith("(2 x 4 samples)")
    out = run(tiny_cfg(tmp_path, steps=6))  # 22 training samples in batches of 4: one batch of 2 per epoch
    sizes = sorted({round(r["samples_per_s"] * r["s_per_step"]) for r in out["history"]})
    assert sizes == [2, 4], sizes


def test_repeat_resume_is_exact(tmp_path, capsys, monkeypatch):
    """data.repeat 2 over the toy set (22 training samples, batch 4): main batches the doubled list (44 = 11 x 4, no
    partial batch; the batches are global_batch's with repeat 2), and 2 steps + resume to 4 == 4 straight."""
    def cfg(where, steps, **kw):
        c = tiny_cfg(tmp_path / where, steps=steps)  # one content-keyed cache for the three runs: encoded once
        return dataclasses.replace(c, data=dataclasses.replace(c.data, repeat=2, cache_dir=str(tmp_path / "cache")),
                                   **kw)

    seen, global_batch = [], train.global_batch
    monkeypatch.setattr(train, "global_batch", lambda *a, **kw: seen.append(global_batch(*a, **kw)) or seen[-1])
    straight = run(cfg("s", 4))
    assert "11 batches per epoch (11 x 4 samples)" in capsys.readouterr().out
    shapes = [()] * 22  # one image size in the toy set
    assert seen == [global_batch(shapes, 4, 0, i, repeat=2) for i in range(4)]
    assert seen != [global_batch(shapes, 4, 0, i) for i in range(4)]
    run(cfg("r", 2))
    run(cfg("r", 4, resume="latest"))
    a, b = load_file(straight["lora"]), load_file(tmp_path / "r" / "run" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_check_flag_checks_the_dataset_only(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.py"),
                        "--check", "--out-dir", str(tmp_path / "run"), "--data.max-pixels", "1024"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "samples: 24; with control: 24" in r.stdout and "target 32x32, control 32x32" in r.stdout
    assert not (tmp_path / "run" / "log.jsonl").exists()  # nothing trained
