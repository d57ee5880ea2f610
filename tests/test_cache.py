"""cache.py: dataset layouts and validation, content keys, atomic files, equality with encode.py."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cache import (DatasetError, Sample, build_cache, cache_paths, encode_sample, read_entry, sample_key, scan_dataset,
                   validate_dataset)
from config import DataConfig
from encode import encode_image, encode_prompt, preprocess_image


def write_pair(root, stem, size=(48, 64), caption="make the square red", seed=0, mask=False):
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "control").mkdir(parents=True, exist_ok=True)
    for sub in ("images", "control"):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / sub / f"{stem}.png")
    (root / "images" / f"{stem}.txt").write_text(caption)
    if mask:
        m = np.zeros(size, np.uint8)
        m[: size[0] // 2] = 255
        Image.fromarray(m).save(root / "images" / f"{stem}_mask.png")


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    for i in range(3):
        write_pair(root, f"s{i}", seed=i, mask=(i == 0))
    return root


def test_folder_layout(data):
    samples = scan_dataset(DataConfig(path=str(data)))
    assert [s.key for s in samples] == ["s0", "s1", "s2"]
    assert samples[0].mask is not None and samples[1].mask is None
    assert samples[0].prompt == "make the square red" and samples[0].control.name == "s0.png"


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_metadata_layouts(data, fmt):
    rows = [{"image": f"images/s{i}.png", "kontext_images" if i else "control": f"control/s{i}.png",
             "prompt": f"caption {i}"} for i in range(3)]
    if fmt == "csv":
        (data / "metadata.csv").write_text("image,control,prompt\n" + "".join(
            f"{r['image']},{r.get('control') or r['kontext_images']},{r['prompt']}\n" for r in rows))
    else:
        (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    samples = scan_dataset(DataConfig(path=str(data / f"metadata.{fmt}")))
    assert [s.prompt for s in samples] == ["caption 0", "caption 1", "caption 2"]
    assert all(s.control.is_file() for s in samples)


def test_every_problem_reported_at_once(data):
    (data / "images" / "s1.txt").unlink()  # missing caption
    (data / "control" / "s2.png").unlink()  # missing control
    shutil.copy(data / "control" / "s0.png", data / "control" / "orphan.png")  # unpaired control
    with pytest.raises(DatasetError) as e:
        scan_dataset(DataConfig(path=str(data)))
    msg = str(e.value)
    assert "3 problem(s)" in msg and "s1.png: no caption" in msg and "s2.png: no control image" in msg
    assert "orphan.png: control image without a target" in msg


def test_unreadable_truncated_small_and_mask_mismatch(data):
    (data / "images" / "s1.png").write_bytes(b"not an image")
    full = (data / "control" / "s2.png").read_bytes()
    (data / "control" / "s2.png").write_bytes(full[: len(full) // 2])  # truncated
    write_pair(data, "tiny", size=(8, 64))
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(data / "images" / "s0_mask.png")
    cfg = DataConfig(path=str(data))
    with pytest.raises(DatasetError) as e:
        validate_dataset(scan_dataset(cfg), cfg)
    msg = str(e.value)
    assert "s1.png: unreadable or corrupt image" in msg and "s2.png: unreadable or corrupt image" in msg
    assert "tiny.png: 64x8 is too small to encode" in msg
    assert "s0_mask.png: mask is 10x10 but its image" in msg


def test_empty_and_missing_dataset(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        scan_dataset(DataConfig(path=str(tmp_path)))
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(DataConfig(path=str(tmp_path / "nope")))


def test_keys_follow_content(data, tmp_path):
    cfg = DataConfig(path=str(data))
    s = scan_dataset(cfg)[1]
    k = sample_key(s, cfg, "model-a")
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    assert sample_key(scan_dataset(DataConfig(path=str(moved)))[1], cfg, "model-a") == k  # same bytes, same key
    assert sample_key(s, cfg, "model-b") != k
    assert sample_key(Sample(s.key, s.image, "other caption", s.control), cfg, "model-a") != k
    assert sample_key(s, DataConfig(path=str(data), max_pixels=1000), "model-a") != k
    assert sample_key(s, DataConfig(path=str(data), max_sequence_length=77), "model-a") != k
    write_pair(moved, "s1", seed=99)  # new image bytes under the same name
    assert sample_key(scan_dataset(DataConfig(path=str(moved)))[1], cfg, "model-a") != k


def test_cache_equals_encode_and_rebuilds_corrupt(data, tmp_path, components):
    cfg = DataConfig(path=str(data), max_sequence_length=32)
    samples = scan_dataset(cfg)
    build_cache(samples, cfg, components, tmp_path / "cache", "m", progress=False)
    files, empty = cache_paths(samples, cfg, tmp_path / "cache", "m")
    c = components
    for s, f in zip(samples, files):
        e = read_entry(f, f.stem, ("image_latents",))
        assert torch.equal(e["image_latents"], encode_image(c.vae, preprocess_image(Image.open(s.image)))[0])
        assert torch.equal(e["control_latents"], encode_image(c.vae, preprocess_image(Image.open(s.control)))[0])
        pe, pooled, _ = encode_prompt(c.clip, c.clip_tokenizer, c.t5, c.t5_tokenizer, s.prompt,
                                      max_sequence_length=32)
        assert torch.equal(e["prompt_embeds"], pe[0]) and torch.equal(e["pooled_prompt_embeds"], pooled[0])
    assert files[0].name != files[1].name
    assert read_entry(files[0], files[0].stem, ("mask",))["mask"].shape == (1, 6, 8)
    e1 = read_entry(files[1], files[1].stem, ("image_latents",))
    good = files[1].read_bytes()
    files[1].write_bytes(good[: len(good) // 3])  # a crash-truncated file
    assert read_entry(files[1], files[1].stem, ("image_latents",)) is None
    mtime0 = files[0].stat().st_mtime_ns
    build_cache(samples, cfg, components, tmp_path / "cache", "m", progress=False)
    rebuilt = read_entry(files[1], files[1].stem, ("image_latents",))
    assert rebuilt is not None
    assert all(torch.equal(rebuilt[k], e1[k]) for k in e1)  # rebuilt, identical tensors
    assert files[0].stat().st_mtime_ns == mtime0  # untouched: skipped
    assert not list((tmp_path / "cache").glob("*.tmp"))
    assert read_entry(empty, empty.stem, ("empty_prompt_embeds",))["empty_prompt_embeds"].shape == (32, 32)


def test_encode_sample_resize_options(data, components):
    s = scan_dataset(DataConfig(path=str(data)))[1]
    assert encode_sample(s, DataConfig(path="", resize=(32, 32)), components)["image_latents"].shape == (16, 4, 4)
    assert encode_sample(s, DataConfig(path="", max_pixels=32 * 48), components)["image_latents"].shape[1:] == (4, 4)
