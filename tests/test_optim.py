"""optim.py: every train.optimizer resumes exactly through train.py's checkpoints, its state survives the checkpoint
files bit for bit (bitsandbytes' nested 8-bit state included), schedule-free's eval weights, unknown names refused."""

import dataclasses
import json
import subprocess
import sys
from typing import get_args

import pytest
import torch
from safetensors.torch import load_file

import optim
from config import TrainConfig
from test_train import ROOT, run, tiny_cfg

LORA_OPTIMIZERS = [n for n in get_args(TrainConfig.__dataclass_fields__["optimizer"].type) if n != "torchao_adamw8bit"]
# what each expects (optim.OPTIMIZERS): schedule-free needs the constant schedule, Prodigy an lr near 1
SETTINGS = {"schedulefree_adamw": dict(scheduler="constant", lr=1e-3), "prodigy": dict(lr=1.0),
            "lion8bit": dict(lr=1e-3)}


def test_the_table_names_every_lora_optimizer():
    assert set(optim.OPTIMIZERS) == set(LORA_OPTIMIZERS)


@pytest.mark.parametrize("name", LORA_OPTIMIZERS)
def test_state_bytes_per_parameter_as_the_table_says(name):
    """README's "Optimizers" column: the state each optimizer holds after a step on a 256 x 256 fp32 weight, in bytes
    per parameter, within 0.1 of optim.OPTIMIZERS' number (8-bit absmax / qmap and Adafactor's factors are ~0.03)."""
    p = torch.nn.Parameter(torch.randn(256, 256))  # Prodigy keeps p0 as a scalar for an all-zero start (lora_B)
    opt = optim.make_optimizer([p], TrainConfig(optimizer=name, scheduler="constant"))
    p.grad = torch.randn(256, 256)
    opt.step()
    state = [v for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.numel() > 1]
    per_param = sum(v.numel() * v.element_size() for v in state) / p.numel()
    assert per_param == pytest.approx(optim.OPTIMIZERS[name][2], abs=0.1), (name, per_param)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # content-keyed: every run below encodes the toy dataset once


@pytest.mark.parametrize("name", [n for n in LORA_OPTIMIZERS if n != "adamw"])  # adamw: test_train.py
def test_resume_is_exact(tmp_path, shared_cache, name):
    """4 steps with a checkpoint at 2, and a second run resumed from that checkpoint up to 4: the same LoRA, bit for
    bit (schedule-free: both runs save its eval weights at step 2 and go back to training the same way)."""
    def cfg(out, **kw):
        c = tiny_cfg(tmp_path, steps=4, optimizer=name, **SETTINGS.get(name, {}), **kw)
        return dataclasses.replace(c, out_dir=str(tmp_path / out),
                                   data=dataclasses.replace(c.data, cache_dir=str(shared_cache)))

    straight = run(cfg("straight", save_every=2))
    first = json.loads((tmp_path / "straight" / "checkpoints" / "latest.json").read_text())
    ckpts = {json.loads((d / "state.json").read_text())["step"]: d
             for d in (tmp_path / "straight" / "checkpoints").glob("lora-*")}
    assert first["step"] == 4 and set(ckpts) == {2, 4}
    resumed = run(dataclasses.replace(cfg("resumed"), resume=str(ckpts[2])))
    assert [r["step"] for r in resumed["history"]] == [3, 4]
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in straight["history"][2:]]
    a, b = load_file(straight["lora"]), load_file(resumed["lora"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    moved = load_file(ckpts[2] / "lora.safetensors")
    assert any(not torch.equal(a[k], moved[k]) for k in moved)  # steps 3 and 4 changed the LoRA


@pytest.mark.parametrize("name", LORA_OPTIMIZERS)
def test_state_survives_the_checkpoint_files(tmp_path, name):
    """optimizer.state_dict() -> flat_state -> safetensors + JSON (as lora.save_checkpoint writes them) -> unflat_state
    -> a fresh optimizer: two more steps give bit-equal weights. 64 x 64 weights: above bitsandbytes' min_8bit_size
    (4096), so its 8-bit state (nested under __bnb_optimizer_quant_state__, qmaps shared between parameters) is what
    travels; the tiny model's LoRA tensors are below it."""
    from safetensors.torch import save_file

    tc = TrainConfig(optimizer=name, **{k: v for k, v in SETTINGS.get(name, {}).items() if k != "scheduler"})
    g = torch.Generator().manual_seed(0)
    grads = [[torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)] for _ in range(4)]

    def step(params, opt, i):
        for p, gr in zip(params, grads[i]):
            p.grad = gr.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def fresh():
        params = [torch.nn.Parameter(torch.randn(64, 64, generator=torch.Generator().manual_seed(i))) for i in (1, 2)]
        return params, optim.make_optimizer(params, tc)

    pa, oa = fresh()
    for i in range(4):
        step(pa, oa, i)
    pb, ob = fresh()
    for i in range(2):
        step(pb, ob, i)
    with optim.eval_weights(ob):  # what train.py does around a checkpoint
        sd = ob.state_dict()
        tensors, scalars = optim.flat_state(sd["state"])
        save_file(tensors, tmp_path / "opt.safetensors")
        (tmp_path / "state.json").write_text(json.dumps({"scalars": scalars, "param_groups": sd["param_groups"]},
                                                        default=float))
        weights = [p.detach().clone() for p in pb]
    if name.endswith("8bit"):
        assert any("__bnb_optimizer_quant_state__" in k for k in tensors)
    pc, oc = fresh()
    with torch.no_grad():
        for p, w in zip(pc, weights):
            p.copy_(w)
    saved = json.loads((tmp_path / "state.json").read_text())
    oc.load_state_dict({"state": optim.unflat_state(load_file(tmp_path / "opt.safetensors"), saved["scalars"]),
                        "param_groups": saved["param_groups"]})
    if optim.is_schedulefree(oc):
        oc.train()
        ob.train()
    for i in (2, 3):
        step(pc, oc, i)
        step(pb, ob, i)
    assert all(torch.equal(x, y) for x, y in zip(pb, pc))
    assert not all(torch.equal(x, y) for x, y in zip(pc, weights))


def test_schedulefree_eval_weights_are_the_average():
    """Inside eval_weights the parameters hold schedule-free's x (not the gradient point y) and come back after; other
    optimizers are untouched."""
    tc = TrainConfig(optimizer="schedulefree_adamw", scheduler="constant", lr=1e-2)
    p = torch.nn.Parameter(torch.zeros(8))
    opt = optim.make_optimizer([p], tc)
    for _ in range(3):
        p.grad = torch.ones(8)
        opt.step()
    y = p.detach().clone()
    with optim.eval_weights(opt):
        x = p.detach().clone()
        assert not opt.param_groups[0]["train_mode"]
    assert opt.param_groups[0]["train_mode"] and not torch.equal(x, y)
    torch.testing.assert_close(p.detach(), y)  # y -> x -> y: equal to rounding
    q = torch.nn.Parameter(torch.ones(3))
    adam = optim.make_optimizer([q], TrainConfig())
    with optim.eval_weights(adam):
        assert torch.equal(q.detach(), torch.ones(3))


def test_unknown_optimizer_lists_the_choices_on_one_line(tmp_path):
    """train.py as a user runs it: the error names every choice on the line that says what was expected, before any
    config file runs or model loads."""
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.py"),
                        "--train.optimizer", "adamw9bit"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    line = next(ln for ln in r.stderr.splitlines() if "adamw9bit" in ln)
    assert "train.optimizer" in line and "expected one of" in line
    assert all(f" {n} " in f" {line.replace('|', ' ').replace(',', ' ')} " for n in LORA_OPTIMIZERS), line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kw, match", [
    (dict(optimizer="schedulefree_adamw"), "train.scheduler: schedule-free AdamW replaces the decay schedule"),
    (dict(optimizer="schedulefree_adamw", scheduler="constant", ema_decay=0.99), "already an average"),
    (dict(optimizer="prodigy", mode="full", grad_clip=0.0), "train.optimizer: train.mode='full' .* got 'prodigy'"),
])
def test_combinations_refused_before_work(kw, match):
    from config import Config, DataConfig, validate

    with pytest.raises(ValueError, match=match):
        validate(Config(data=DataConfig(path=str(ROOT)), train=TrainConfig(**kw)))
