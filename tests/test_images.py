"""images.py: the stat index (warm starts), decoding (EXIF orientation, 16-bit, transparency), masks."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cache
import images
from cache import cache_paths, encode_sample, sample_key
from config import DataConfig
from data import check_dataset, scan_dataset, validate_dataset
from images import DatasetError
from tests_util import write_pair


# ---------------------------------------------------------------- the stat index (warm starts)


def image_reads(monkeypatch):
    """A list that records every image file images.py reads (to hash or decode it)."""
    reads, read_bytes = [], Path.read_bytes

    def counting(self):
        if self.suffix.lower() in (".png", ".jpg"):
            reads.append(self.name)
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    return reads


def test_warm_start_reads_no_image_and_changed_files_are_reread(data, tmp_path, monkeypatch):
    monkeypatch.setattr(images, "RACY_NS", 0)  # trust files written this instant (the default waits 2 s)
    cfg, cache_dir = DataConfig(path=str(data)), tmp_path / "cache"
    reads = image_reads(monkeypatch)
    samples = scan_dataset(cfg)
    validate_dataset(samples, cfg, cache_dir)
    cold = [f.name for f in cache_paths(samples, cfg, cache_dir, "m")[0]]
    assert sorted(reads) == sorted(["s0.png", "s0.png", "s0_mask.png", "s1.png", "s1.png", "s2.png", "s2.png"])
    reads.clear()
    validate_dataset(samples, cfg, cache_dir)
    assert [f.name for f in cache_paths(samples, cfg, cache_dir, "m")[0]] == cold and reads == []  # warm: stat only
    assert cold == [f.name for f in cache_paths(samples, cfg, tmp_path / "fresh", "m")[0]]  # same keys, no index
    # Same size, new mtime: re-hashed and re-decoded (here: now corrupt).
    image = data / "images" / "s1.png"
    size, mtime = image.stat().st_size, image.stat().st_mtime_ns
    image.write_bytes(b"x" * size)
    os.utime(image, ns=(mtime + 1_000_000_000, mtime + 1_000_000_000))
    with pytest.raises(DatasetError, match="s1.png: unreadable or corrupt image"):
        validate_dataset(samples, cfg, cache_dir)
    # New size (another valid image): re-decoded and a new key; the unchanged files are still not read.
    write_pair(data, "s1", seed=7, size=(32, 48))
    reads.clear()
    validate_dataset(samples, cfg, cache_dir)
    warm = [f.name for f in cache_paths(samples, cfg, cache_dir, "m")[0]]
    assert sorted(reads) == ["s1.png", "s1.png"] and warm[0] == cold[0] and warm[1] != cold[1]
    assert warm[1] == sample_key(samples[1], cfg, "m") + ".safetensors"  # = hashing the new bytes directly


def test_fresh_files_are_not_remembered(data, tmp_path):
    # Written < RACY_NS ago: a same-size rewrite within the same timestamp tick would keep the stat, so the hash is
    # used for this run only, and the rewrite below (same size: random pixels) is seen.
    cfg, cache_dir = DataConfig(path=str(data)), tmp_path / "cache"
    samples = scan_dataset(cfg)
    k = cache_paths(samples, cfg, cache_dir, "m")[0][1].name
    write_pair(data, "s1", seed=99)
    assert cache_paths(samples, cfg, cache_dir, "m")[0][1].name != k
    index = json.loads(next(cache_dir.glob("stat-index-*.json")).read_text())
    assert index["files"] == {}


def test_corrupt_index_is_rebuilt(data, tmp_path, monkeypatch):
    monkeypatch.setattr(images, "RACY_NS", 0)
    cfg, cache_dir = DataConfig(path=str(data)), tmp_path / "cache"
    samples = scan_dataset(cfg)
    validate_dataset(samples, cfg, cache_dir)
    index = next(cache_dir.glob("stat-index-*.json"))
    assert len(json.loads(index.read_text())["files"]) == 7
    index.write_text('{"version": 1, "files": [')  # truncated
    reads = image_reads(monkeypatch)
    validate_dataset(samples, cfg, cache_dir)
    assert len(reads) == 7 and len(json.loads(index.read_text())["files"]) == 7


def test_unwritable_index_warns_and_still_validates(data, tmp_path):
    cfg, not_a_dir = DataConfig(path=str(data)), tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.warns(UserWarning, match="could not write the stat index .* the next start re-hashes every image"):
        validate_dataset(scan_dataset(cfg), cfg, not_a_dir)


# ---------------------------------------------------------------- decoding: orientation, 16-bit, transparency


def save_oriented(array, path, orientation):
    """A PNG of `array` (as stored) whose EXIF says how to turn it upright."""
    im = Image.fromarray(array)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif)


def pixels(t):
    """load_pixels' [1, 3, H, W] in [-1, 1] back to uint8-valued [H, W, 3]."""
    return ((t[0].permute(1, 2, 0) + 1) * 127.5).round()


def test_exif_orientation_applied_to_target_control_and_mask(tmp_path, components, capsys):
    rng = np.random.default_rng(0)
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "control").mkdir()
    stored = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)  # h 32, w 48 as stored; upright 48 high, 32 wide
    save_oriented(stored, root / "images" / "a.png", 6)  # 6: turn 90 degrees clockwise to view
    save_oriented(stored, root / "control" / "a.png", 8)  # 8: 90 degrees counter-clockwise
    mask = np.zeros((48, 32), np.uint8)
    mask[:8] = 255  # the top rows as stored: the bottom rows once turned 180 degrees
    save_oriented(mask, root / "images" / "a_mask.png", 3)
    (root / "images" / "a.txt").write_text("x")
    cfg = DataConfig(path=str(root))
    s = scan_dataset(cfg)[0]
    assert validate_dataset([s], cfg) == [{"image": (48, 32), "control": (48, 32), "mask": (48, 32)}]  # upright
    assert torch.equal(pixels(images.load_pixels(s.image, cfg)), torch.from_numpy(np.rot90(stored, -1).copy()).float())
    assert torch.equal(pixels(images.load_pixels(s.control, cfg)), torch.from_numpy(np.rot90(stored, 1).copy()).float())
    m = images.load_mask(s.mask, (6, 4))[0]
    assert torch.equal(m[:5], torch.zeros(5, 4)) and torch.equal(m[5], torch.ones(4))
    e = encode_sample(s, DataConfig(path="", max_sequence_length=32), components)
    assert e["image_latents"].shape[1:] == e["control_latents"].shape[1:] == e["mask"].shape[1:] == (6, 4)
    # Uncached training takes its batch shapes from the same upright sizes.
    assert cache.OnTheFly([s], cfg, components).shape(0) == tuple(e["image_latents"].shape) * 2
    assert check_dataset(cfg) == 0
    assert "target 32x48, control 32x48" in capsys.readouterr().out  # W x H, upright


def test_old_stat_index_sizes_are_not_trusted(tmp_path, monkeypatch):
    # An index written before orientation was applied holds the stored size; its version is refused.
    monkeypatch.setattr(images, "RACY_NS", 0)
    root, cache_dir = tmp_path / "d", tmp_path / "cache"
    write_pair(root, "a", size=(32, 48))
    save_oriented(np.zeros((32, 48, 3), np.uint8), root / "images" / "a.png", 6)
    cfg = DataConfig(path=str(root))
    validate_dataset(scan_dataset(cfg), cfg, cache_dir)
    index = next(cache_dir.glob("stat-index-*.json"))
    stored = json.loads(index.read_text())
    name = os.path.abspath(root / "images" / "a.png")
    assert stored["files"][name]["hw"] == [48, 32]
    stored["files"][name]["hw"], stored["version"] = [32, 48], 1  # as the old decoder recorded it
    index.write_text(json.dumps(stored))
    assert validate_dataset(scan_dataset(cfg), cfg, cache_dir)[0]["image"] == (48, 32)


def test_16_bit_png_scaled_not_clipped(tmp_path):
    values = np.arange(256, dtype=np.uint16).reshape(16, 16) * 257  # 0, 257, ..., 65535: every 8-bit level
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    want = torch.from_numpy(np.arange(256).reshape(16, 16)).float()
    got = pixels(images.load_pixels(tmp_path / "g16.png", DataConfig(path="")))
    assert all(torch.equal(got[..., c], want) for c in range(3))
    mask = images.load_mask(tmp_path / "g16.png", (16, 16))[0]  # a grey ramp: thresholded
    assert torch.equal(mask, (want >= 128).float())  # scaled to 8 bits first (clipping would make it all white)


def transparent(mode, rgb=(200, 30, 60)):
    """(image, alpha [H, W] in 0..255): left half opaque `rgb`, right half transparent over a hidden colour; RGBA
    also has a half-transparent middle column."""
    if mode == "P":
        im = Image.new("P", (16, 16), 0)
        im.putpalette([*rgb, 10, 250, 10] + [0] * 762)  # index 1: a hidden green, transparent (tRNS)
        im.paste(1, (8, 0, 16, 16))
        im.info["transparency"] = 1
        alpha = np.full((16, 16), 255)
        alpha[:, 8:] = 0
        return im, alpha
    a = np.zeros((16, 16, 4), np.uint8)
    a[..., :3] = (10, 250, 10)
    a[:, :8, :3] = rgb
    a[:, :8, 3] = 255
    if mode == "RGBA":
        a[:, 8, 3] = 128
    im = Image.fromarray(a, "RGBA")
    if mode == "LA":
        im = im.convert("LA")
    return im, a[..., 3].astype(int)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
@pytest.mark.parametrize("background", [(255, 255, 255), (0, 128, 255)])
def test_transparency_composited_on_the_background(tmp_path, mode, background):
    im, alpha = transparent(mode)
    im.save(tmp_path / "t.png")
    shown = np.asarray(im.convert("RGBA"))[..., :3].astype(float)  # the colour under the alpha
    a = alpha[..., None] / 255
    want = torch.from_numpy(shown * a + np.array(background) * (1 - a)).float()
    got = pixels(images.load_pixels(tmp_path / "t.png", DataConfig(path="", background=background)))
    assert (got - want).abs().max() <= 1  # alpha_composite rounds
    assert torch.equal(got[:, 12], torch.tensor(background).float().expand(16, 3))  # transparent: the background
    assert torch.equal(got[:, 0], torch.from_numpy(shown[:, 0]).float())  # opaque: unchanged


def test_transparent_mask_pixels_are_outside_the_edit_region(tmp_path):
    a = np.full((16, 16, 4), 255, np.uint8)  # white everywhere, as painting tools leave the hidden RGB
    a[:, 8:, 3] = 0  # a white stroke on the left half; the right half is transparent
    Image.fromarray(a, "RGBA").save(tmp_path / "m.png")
    m = images.load_mask(tmp_path / "m.png", (16, 16))[0]
    assert torch.equal(m[:, :8], torch.ones(16, 8)) and torch.equal(m[:, 8:], torch.zeros(16, 8))


def test_kontext_bucket_is_the_pipelines_nearest_aspect():
    """data.bucket kontext: the PREFERRED_KONTEXT_RESOLUTIONS entry nearest the image's aspect, chosen as
    FluxKontextPipeline's _auto_resize chooses it (diffusers' own list); max_pixels then shrinks it at that aspect;
    native keeps the image's own size."""
    import dataclasses

    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    cfg = DataConfig(path="", bucket="kontext")
    seen = set()
    for h, w in [(100, 100), (200, 300), (300, 200), (480, 1920), (1000, 1001), (37, 53), (1568, 672)]:
        _, bw, bh = min((abs(w / h - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)
        assert images.target_size((h, w), cfg) == (bh, bw)
        seen.add((bw, bh))
    assert len(seen) == 5  # (1000, 1001) joins (100, 100)'s 1024 x 1024, (37, 53) joins (200, 300)'s 1248 x 832
    th, tw = images.target_size((200, 300), dataclasses.replace(cfg, max_pixels=64 * 64))
    assert th * tw <= 64 * 64 and th < tw and th % 16 == 0 and tw % 16 == 0
    assert images.target_size((200, 300), DataConfig(path="")) == (192, 288)
