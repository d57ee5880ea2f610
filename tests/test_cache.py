"""cache.py: content keys, the cache equal to encoding, checksummed atomic files rebuilt when corrupt."""

import shutil

from PIL import Image
import torch

import cache
from cache import build_cache, cache_paths, encode_sample, read_entry, sample_key
from config import DataConfig
from data import Sample, scan_dataset
from encode import encode_image, encode_prompt, preprocess_image
from tests_util import write_pair


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


def test_cache_checksum_rebuilds_values_overwritten_in_place(data, tmp_path, components):
    cfg = DataConfig(path=str(data), max_sequence_length=32)
    samples = scan_dataset(cfg)
    build_cache(samples, cfg, components, tmp_path / "cache", "m", progress=False)
    files, empty = cache_paths(samples, cfg, tmp_path / "cache", "m")
    good = read_entry(files[1], files[1].stem, ("image_latents",))
    raw = bytearray(files[1].read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start + 16: start + 24] = bytes(8)  # one value of the first tensor zeroed: header and size unchanged
    files[1].write_bytes(bytes(raw))
    assert read_entry(files[1], files[1].stem, ("image_latents",)) is None
    build_cache(samples, cfg, components, tmp_path / "cache", "m", progress=False)
    rebuilt = read_entry(files[1], files[1].stem, ("image_latents",))
    assert rebuilt is not None and all(torch.equal(rebuilt[k], good[k]) for k in good)


def test_decoder_changes_change_the_cache_key(data, monkeypatch):
    cfg = DataConfig(path=str(data))
    s = scan_dataset(cfg)[0]
    k = sample_key(s, cfg, "m")
    assert sample_key(s, DataConfig(path=str(data), background=(0, 0, 0)), "m") != k
    monkeypatch.setattr(cache, "CACHE_VERSION", "2")  # the decoder before orientation / 16-bit / transparency
    assert sample_key(s, cfg, "m") != k


def test_kontext_bucket_resizes_target_control_and_mask_alike(tmp_path, components):
    """data.bucket kontext on a synthetic 40 x 90 pair with a mask: target, control and mask come out at one bucket's
    latent size (the aspect's Kontext resolution shrunk to max_pixels), and the cache key says which bucketing."""
    import dataclasses

    from images import target_size

    write_pair(tmp_path / "d", "p", size=(40, 90), mask=True)
    s = scan_dataset(DataConfig(path=str(tmp_path / "d")))[0]
    cfg = DataConfig(path=str(tmp_path / "d"), bucket="kontext", max_pixels=64 * 64)
    h, w = target_size((40, 90), cfg)
    e = encode_sample(s, cfg, components, device="cpu")
    assert e["image_latents"].shape == e["control_latents"].shape == (16, h // 8, w // 8)
    assert e["mask"].shape == (1, h // 8, w // 8)
    native = encode_sample(s, dataclasses.replace(cfg, bucket="native"), components, device="cpu")
    assert native["image_latents"].shape != e["image_latents"].shape
    assert sample_key(s, cfg, "m") != sample_key(s, dataclasses.replace(cfg, bucket="native"), "m")
