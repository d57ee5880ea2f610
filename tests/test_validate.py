"""validate.py: the validation grid's layout. The held-out loss and the grids of a run: tests/test_train.py; the
conditioning check: tests/test_mask_data.py."""

import validate


def test_tile_grid_keeps_every_tile_whole():
    """Rows of different sizes and lengths (one or two controls): every tile lands whole where its right-aligned
    column and its row put it, with white gaps between cells."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    tile = lambda w, h: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    rows = [[tile(64, 48), tile(64, 48), tile(80, 64)], [tile(32, 32), tile(40, 24), tile(32, 32), tile(16, 16)]]
    grid = validate.tile_grid(rows, gap=2)
    xs, ys = [0, 34, 100, 166], [0, 66]  # column widths 32, 64, 64, 80; row heights 64, 32
    assert grid.size == (246, 98)
    for r, y in zip(rows, ys):
        for t, x in zip(r, xs[len(xs) - len(r):]):
            assert np.array_equal(np.asarray(grid.crop((x, y, x + t.width, y + t.height))), np.asarray(t))
    assert grid.getpixel((98, 10)) == (255, 255, 255) and grid.getpixel((10, 64)) == (255, 255, 255)


def test_pixel_mae_and_latent_mse():
    """Pixel MAE in 8-bit units at the target's size; latent MSE only for equal shapes."""
    import numpy as np
    import torch
    from PIL import Image

    a = Image.fromarray(np.full((16, 16, 3), 10, np.uint8))
    b = Image.fromarray(np.full((16, 16, 3), 40, np.uint8))
    assert validate.pixel_mae(a, b) == 30.0
    assert validate.pixel_mae(a.resize((32, 32)), b) == 30.0  # resized to the target's size first
    x = torch.zeros(16, 2, 2)
    assert validate.latent_mse(x + 2, x) == 4.0
    assert validate.latent_mse(x, torch.zeros(16, 2, 4)) is None
    assert validate.mean_metrics({"a": {"m": 1.0, "n": None}, "b": {"m": 3.0, "n": 2.0}}, "edit") == \
        {"edit_m": 2.0, "edit_n": 2.0}


def synthetic_log(path, steps=30, every=10):
    """A log.jsonl as train.py writes it (training records, then validations with edit metrics)."""
    import json
    import random

    rnd = random.Random(0)
    with open(path, "w") as f:
        f.write(json.dumps({"step": 0, "held_out_loss": 1.0, "base_mae_target": 12.0, "copy_mae_target": 13.0,
                            "base_mse_target": 0.5, "copy_mse_target": 0.6, "pairs": {}}) + "\n")
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "loss": 1.0 / s + rnd.random() * 0.1, "lr": 1e-3}) + "\n")
            if s % every == 0:
                f.write(json.dumps({"step": s, "held_out_loss": 1.0 / s, "edit_mae_target": 10.0 / s,
                                    "edit_mae_control": 5.0 + s, "edit_mse_target": 0.4 / s,
                                    "edit_mse_control": 0.1 * s, "base_mae_target": 12.0, "copy_mae_target": 13.0,
                                    "base_mse_target": 0.5, "copy_mse_target": 0.6,
                                    "pairs": {"a": {"edit_mae_target": 1.0}}}) + "\n")


def test_curves_png_matches_the_log(tmp_path):
    """report.plot_curves writes the PNG and plots exactly the log's numbers; a step logged twice (a resumed run)
    counts with its last record; `python validate.py plot RUN_DIR` re-draws it."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    import report

    synthetic_log(tmp_path / "log.jsonl")
    with open(tmp_path / "log.jsonl", "a") as f:  # a resumed run repeats step 30
        f.write(json.dumps({"step": 30, "loss": 0.5}) + "\n")
    png = tmp_path / "validation" / "curves.png"
    data = report.plot_curves(tmp_path / "log.jsonl", png)
    assert Image.open(png).size[0] > 600
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in recs if "loss" in r}
    assert data["loss"] == (sorted(train), [train[s] for s in sorted(train)]) and data["loss"][1][-1] == 0.5
    assert data["loss_smoothed"][1][0] == data["loss"][1][0] and len(data["loss_smoothed"][1]) == 30
    val = [r for r in recs if "held_out_loss" in r]
    assert data["held_out_loss"] == ([r["step"] for r in val], [r["held_out_loss"] for r in val])
    for m in ("mae_target", "mae_control", "mse_target", "mse_control"):
        assert data[f"edit_{m}"] == ([10, 20, 30], [r[f"edit_{m}"] for r in val[1:]])
    assert (data["base_mae_target"], data["copy_mae_target"], data["copy_mse_target"]) == (12.0, 13.0, 0.6)
    png.unlink()
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "validate.py"), "plot", str(tmp_path)], capture_output=True,
                       text=True)
    assert r.returncode == 0 and png.is_file(), r.stderr
    r = subprocess.run([sys.executable, str(root / "validate.py"), "plot", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "log.jsonl does not exist" in r.stderr


def test_report_scalars_flatten_pairs():
    import report

    rec = {"step": 3, "held_out_loss": 0.5, "edit_mae_target": 2.0, "flag": True,
           "pairs": {"s1": {"edit_mae_target": 2.0, "edit_mse_control": None}}}
    assert report.scalars(rec) == {"held_out_loss": 0.5, "edit_mae_target": 2.0, "pair/s1/edit_mae_target": 2.0}
