"""train.py's dual masked loss (issue #12, first slice): each term by hand, the weights, the all-ones / all-zeros
limits, the refusal of unaligned controls, and a short masked training run with its terms logged."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import objective
import train
from config import load_config
from tiny import write_toy_dataset

ROOT = Path(__file__).resolve().parents[1]


class Fixed(torch.nn.Module):
    """A 'transformer' that predicts a given velocity for the first N tokens."""

    def __init__(self, pred):
        super().__init__()
        self.pred = pred

    def forward(self, hidden_states, **kw):
        return (self.pred,)


def tensors(seed=0, b=2, n=3, c=4):
    g = torch.Generator().manual_seed(seed)
    pred, x0, noise, ctx = (torch.randn(b, n, c, generator=g) for _ in range(4))
    mask = (torch.rand(b, n, 1, generator=g) > 0.5).float()
    mask[0, 0], mask[0, 1] = 1.0, 0.0  # both regions present
    return pred, x0, noise, ctx, mask


def call(pred, x0, noise, ctx, t, mask, weight):
    return objective.dual_masked_loss(Fixed(pred), x0, noise, t, ctx, None, None, None, None, 1.0, weight, mask)


def test_terms_by_hand_with_weights():
    pred, x0, noise, ctx, mask = tensors()
    fg, bg = 3.0, 0.5
    weight = bg + (fg - bg) * mask
    terms = objective.dual_masked_terms(pred, x0, noise, ctx, mask, weight)
    b, n, c = pred.shape
    num_in = num_out = den = 0.0
    for i in range(b):
        for j in range(n):
            w = fg if mask[i, j, 0] == 1 else bg
            den += w * c
            for k in range(c):
                if mask[i, j, 0] == 1:
                    num_in += w * float(pred[i, j, k] - (noise[i, j, k] - x0[i, j, k])) ** 2
                else:
                    num_out += w * float(noise[i, j, k] - pred[i, j, k] - ctx[i, j, k]) ** 2
    assert terms["loss_in"].item() == pytest.approx(num_in / den, rel=1e-5)
    assert terms["loss_out"].item() == pytest.approx(num_out / den, rel=1e-5)
    # a model that reproduces the target inside and the context outside scores zero on both
    exact = torch.where(mask.bool(), noise - x0, noise - ctx)
    zero = objective.dual_masked_terms(exact, x0, noise, ctx, mask, weight)
    assert zero["loss_in"].item() < 1e-10 and zero["loss_out"].item() < 1e-10


def test_all_ones_is_plain_all_zeros_is_identity():
    pred, x0, noise, ctx, _ = tensors(1)
    t = torch.rand(2)
    ones = torch.ones(2, 3, 1)
    plain = objective.flow_matching_loss(Fixed(pred), x0, noise, t, ctx, None, None, None, None, 1.0)
    terms = call(pred, x0, noise, ctx, t, ones, 2.0 * ones)
    assert torch.allclose(terms["loss_in"], plain) and terms["loss_out"] == 0
    assert torch.allclose(call(pred, x0, noise, ctx, t, None, None)["loss_in"], plain)  # no mask: all editable
    zeros = torch.zeros(2, 3, 1)
    terms = call(pred, x0, noise, ctx, t, zeros, ones)
    assert terms["loss_in"] == 0
    assert torch.allclose(terms["loss_out"], ((noise - pred - ctx) ** 2).mean())


def test_refuses_unaligned_control():
    pred, x0, noise, ctx, mask = tensors(2)
    with pytest.raises(ValueError, match="dual_masked.*size of the target"):
        call(pred, x0, noise, torch.cat([ctx, ctx], 1), torch.rand(2), mask, mask)
    with pytest.raises(ValueError, match="dual_masked"):
        call(pred, x0, noise, None, torch.rand(2), mask, mask)


def test_l2_gradient():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    with torch.enable_grad():
        l2 = objective.lora_l2([p])
        l2.backward()
    assert l2.item() == 5.0 and torch.equal(p.grad, 2 * p.detach())


def masked_toy(root: Path) -> Path:
    data = write_toy_dataset(root / "toy", n=6, size=32)
    for img in sorted((data / "images").glob("*.png")):
        m = np.zeros((32, 32), np.uint8)
        m[:16] = 255
        Image.fromarray(m).save(img.with_name(img.stem + "_mask.png"))
    return data


def test_masked_training_run_logs_finite_terms(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.py")
    tc = dataclasses.replace(cfg.train, steps=3, save_every=0, validate_every=-1, log_every=1, loss="dual_masked",
                             mask_weight_fg=2.0, mask_weight_bg=1.0, lr=1e-3)
    cfg = dataclasses.replace(cfg, out_dir=str(tmp_path / "run"), train=tc,
                              data=dataclasses.replace(cfg.data, path=str(masked_toy(tmp_path)), held_out=0,
                                                       cache_dir=str(tmp_path / "cache")))
    with torch.enable_grad():
        result = train.main(cfg)
    out = Path(cfg.out_dir)
    logs = [json.loads(line) for p in out.rglob("log.jsonl") for line in p.read_text().splitlines()]
    steps = [r for r in logs if "loss_in" in r]
    assert len(steps) == 3
    for r in steps:
        assert all(math.isfinite(r[k]) for k in ("loss_in", "loss_out", "loss_l2"))
        assert r["loss_in"] > 0 and r["loss_out"] > 0 and r["loss_l2"] > 0
        assert r["loss"] == pytest.approx(r["loss_in"] + r["loss_out"] + r["loss_l2"], rel=1e-5)
    # B starts at zero, where the L2 term's gradient (2 lambda B) is zero too: only the data terms can move it
    sd = load_file(result["lora"])
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in sd.items())
