"""report.py and the validations of a run: edit metrics in log.jsonl (the base model's cached by content), the
copy-the-control baseline, curves.png, the user's samples (train.sample_prompts), wandb offline (the logged keys, the same run continued on --resume), wandb
missing. The curves' data against a log: tests/test_validate.py."""

import dataclasses
import glob
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import report
import train
from config import load_config

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(tmp_path, **train_kw):
    cfg = load_config(ROOT / "configs" / "tiny.py")
    kw = dict(steps=2, save_every=0, validate_every=2, log_every=1, report_to=("jsonl", "wandb"))
    kw.update(train_kw)
    return dataclasses.replace(cfg, out_dir=str(tmp_path / "run"), train=dataclasses.replace(cfg.train, **kw),
                               data=dataclasses.replace(cfg.data, cache_dir=str(tmp_path / "cache")))


def wandb_records(path: Path):
    """The protobuf records of a wandb run file (<run>.wandb): a 7-byte header (':W&B', magic, version), then
    LevelDB-log blocks of 32 KiB, each chunk [crc32, length, type] + bytes, type 1 (full) or 4 (last) ending one."""
    from wandb.proto import wandb_internal_pb2 as pb

    b, pos, buf = path.read_bytes(), 7, b""
    while pos + 7 <= len(b):
        if (left := 32768 - pos % 32768) < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", b[pos:pos + 7])
        buf, pos = buf + b[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            buf = b""
            yield r


def test_run_logs_edit_metrics_curves_and_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    toy = Path(load_config(ROOT / "configs" / "tiny.py").data.path)
    lines = [{"control": str(toy / "control" / "005.png"), "prompt": "make the square red"},
             {"control": str(toy / "control" / "005.png"), "prompt": "make the square red", "seed": 0},
             {"control": [str(toy / "control" / "005.png"), str(toy / "control" / "006.png")],
              "prompt": "make the square red", "seed": 3}]
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = tiny_cfg(tmp_path, sample_prompts=str(tmp_path / "samples.jsonl"))
    with torch.enable_grad():
        train.main(cfg)
    out = Path(cfg.out_dir)
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    val = {r["step"]: r for r in recs if "held_out_loss" in r}
    assert sorted(val) == [0, 2]
    keys = {"022", "023"}  # the toy dataset's held-out pairs (data.held_out 2)
    assert "edit_mae_target" not in val[0] and {"base_mae_target", "copy_mae_target"} <= set(val[0])
    assert set(val[2]["pairs"]) == keys
    for name in ("mae_target", "mae_control", "mse_target", "mse_control"):
        per = [val[2]["pairs"][k][f"edit_{name}"] for k in sorted(keys)]
        assert val[2][f"edit_{name}"] == pytest.approx(sum(per) / 2) and all(v >= 0 for v in per)
    # copy the control: the control's own distance to the target, from the files (64 x 64: the training size)
    data = Path(cfg.data.path)
    for k in keys:
        c, t = (np.asarray(Image.open(data / d / f"{k}.png").convert("RGB"), np.float64) for d in ("control", "images"))
        assert val[0]["pairs"][k]["copy_mae_target"] == pytest.approx(np.abs(c - t).mean())
    base = json.loads((out / "validation" / "base_metrics.json").read_text())
    assert len(base) == 1 and set(next(iter(base.values()))) == keys
    assert (out / "validation" / "curves.png").is_file() and (out / "validation" / "step-000002.png").is_file()

    # resumed: the base metrics come from the cache (tampered here to tell), the wandb run continues
    (key, per_pair), = base.items()
    per_pair = {k: {n: v * 10 for n, v in m.items()} for k, m in per_pair.items()}
    (out / "validation" / "base_metrics.json").write_text(json.dumps({key: per_pair}))
    with torch.enable_grad():
        train.main(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=4), resume="latest"))
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    last = [r for r in recs if "held_out_loss" in r][-1]
    assert last["step"] == 4
    assert last["base_mae_target"] == pytest.approx(sum(m["mae_target"] for m in per_pair.values()) / 2)
    data = report.plot_curves(out / "log.jsonl", out / "validation" / "curves.png")
    assert data["edit_mae_target"][0] == [2, 4] and data["loss"][0] == [1, 2, 3, 4]

    # the user's samples: a row per line (control(s) | sample); line 0 (seed sample.seed + 0) and line 1 (seed 0)
    # are one edit; line 0 is sample.py's edit with the run's LoRA and the same sample section
    grid = np.asarray(Image.open(out / "validation" / "samples-000004.png").convert("RGB"), np.float64)
    assert grid.shape == (3 * 64, 3 * 64, 3)
    first, second = grid[:64, 128:], grid[64:128, 128:]
    assert np.array_equal(first, second) and not np.array_equal(first, grid[128:, 128:])
    import sample

    edited = sample.main(sample.Args(prompt="make the square red", image=(lines[0]["control"],),
                                     out=str(tmp_path / "edited.png"), config=str(ROOT / "configs" / "tiny.py"),
                                     lora=(str(out / "lora.safetensors"),), sample=cfg.sample))
    assert np.abs(np.asarray(Image.open(edited).convert("RGB"), np.float64) - first).mean() < 0.5

    runs = sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(runs) == 2 and len({Path(r).name for r in runs}) == 1  # one wandb run id, continued
    history, config = set(), set()
    for r in runs:
        for rec in wandb_records(Path(r)):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                history |= {i.key or i.nested_key[0] for i in rec.history.item}  # an image: [name, field]
            elif kind == "run":
                config |= {i.key for i in rec.run.config.update}
    assert {"loss", "lr", "held_out_loss", "edit_mae_target", "base_mse_target", "copy_mae_target",
            "pair/022/edit_mae_target", "validation/grid", "validation/curves", "validation/samples"} <= history
    assert {"model", "data", "train", "sample"} <= config


def test_missing_wandb_fails_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    cfg = tiny_cfg(tmp_path)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(tmp_path / "no-model")))
    with pytest.raises(ValueError, match="pip install wandb"):
        train.main(cfg)
    assert not (Path(cfg.out_dir) / "log.jsonl").exists()
