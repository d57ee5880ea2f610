"""ema.py and train.ema_decay: the average is torch's EMA, train.py saves it beside the result, validates with it,
keeps it in checkpoints (exact resume); full mode is refused with the memory it would take."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from config import Config, DataConfig, TrainConfig, flux_full_parameters, validate
from ema import EMA
from test_train import ROOT, run, tiny_cfg


def test_average_is_torchs_ema_and_swapping_restores_exactly():
    """With ema_start_step 1: the same numbers as torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn (it
    copies on its first update, then lerps), bit for bit; `swapped` puts them in and takes them out exactly."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = torch.nn.Linear(16, 8)
    ref = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    ema = EMA(list(model.parameters()), 0.9, start_step=1)
    g = torch.Generator().manual_seed(0)
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        ema.update(step)
        ref.update_parameters(model)
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, ref.module.parameters()))
    trained = [p.detach().clone() for p in model.parameters()]
    with ema.swapped():
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow))
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))
    assert not all(torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow))
    assert ema.bytes() == 4 * sum(p.numel() for p in model.parameters())


def test_train_saves_validates_and_resumes_the_ema(tmp_path):
    """4 steps, a checkpoint every step, EMA from step 3 (decay 0.75): lora.ema.safetensors holds lerp(w3, w4, 0.25)
    of the checkpoints' weights, in lora.safetensors' format; log.jsonl has raw and EMA held-out losses (and they
    differ); a run resumed from the step-2 checkpoint writes the same EMA file bit for bit."""
    kw = dict(steps=4, save_every=1, keep_checkpoints=0, ema_decay=0.75, ema_start_step=3, validate_every=4)
    cfg = tiny_cfg(tmp_path / "a", **kw)
    out = run(cfg)
    ema_file = out["lora"].with_name("lora.ema.safetensors")
    raw, avg = load_file(out["lora"]), load_file(ema_file)
    assert raw.keys() == avg.keys() and any(k.endswith(".alpha") for k in avg)  # the comfyui format, as the result
    ckpts = {json.loads((d / "state.json").read_text())["step"]: d
             for d in (tmp_path / "a" / "run" / "checkpoints").glob("lora-*")}
    w3, w4 = (load_file(ckpts[s] / "lora.safetensors") for s in (3, 4))
    assert all(torch.equal(w4[k], raw[k]) for k in w4)
    for k in w3:
        torch.testing.assert_close(avg[k], torch.lerp(w3[k], w4[k], 0.25), rtol=0, atol=1e-7)
    assert any(not torch.equal(avg[k], raw[k]) for k in w4)
    logs = [json.loads(ln) for ln in (tmp_path / "a" / "run" / "log.jsonl").read_text().splitlines()]
    val = [r for r in logs if "held_out_loss" in r]
    assert [r["step"] for r in val] == [0, 4] and all("held_out_loss_ema" in r for r in val)
    assert val[-1]["held_out_loss"] != val[-1]["held_out_loss_ema"]
    assert (tmp_path / "a" / "run" / "validation" / "step-000004.png").is_file()
    assert (ckpts[2] / "ema.safetensors").is_file()
    kw["validate_every"] = -1  # validation leaves the weights and the EMA as they were (swapped back exactly)
    resumed = dataclasses.replace(tiny_cfg(tmp_path / "b", **kw), resume=str(ckpts[2]),
                                  data=dataclasses.replace(cfg.data))  # the same cache
    run(resumed)
    again = load_file(tmp_path / "b" / "run" / "lora.ema.safetensors")
    assert all(torch.equal(again[k], avg[k]) for k in avg)


def test_full_mode_refused_with_its_memory():
    """The refusal names the fp32 copy's size, and flux_full_parameters counts what full.trained_linears trains on
    FLUX.1 Kontext's transformer (built on the meta device: no memory)."""
    import fixtures
    import full

    model = fixtures.full_size_transformer("meta")
    for which in ("all", "attention"):
        n = sum(p.numel() for _, m in full.trained_linears(model, which) for p in m.parameters(recurse=False))
        assert flux_full_parameters(which) == n, which
    cfg = Config(data=DataConfig(path=str(ROOT)), train=TrainConfig(mode="full", grad_clip=0.0, ema_decay=0.999))
    gb = 4 * flux_full_parameters("all") / 1e9
    with pytest.raises(ValueError, match=rf"train.ema_decay: .* {gb:.1f} GB"):
        validate(cfg)
    assert 45 < gb < 50
