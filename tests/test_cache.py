"""cache.py: layouts, validation, warnings and refusals, content keys, checksummed atomic files, the stat index."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cache
from cache import (DatasetError, DatasetWarning, Sample, build_cache, cache_paths, encode_sample, read_entry,
                   sample_key, scan_dataset, validate_dataset)
from config import DataConfig
from encode import encode_image, encode_prompt, preprocess_image

ROOT = Path(__file__).resolve().parents[1]


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


# ---------------------------------------------------------------- the dataset's sharp edges (issue 15)


@contextlib.contextmanager
def strict():
    """Any DatasetWarning is an error inside (to show that something does not warn)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)
        yield


def write_csv(path, header, rows, encoding="utf-8"):
    path.write_text(header + "\n" + "".join(r + "\n" for r in rows), encoding=encoding)


def test_empty_caption_warns(data):
    (data / "images" / "s1.txt").write_text("  \n")
    with pytest.warns(DatasetWarning, match=r"1 sample\(s\) with an empty caption") as w:
        samples = scan_dataset(DataConfig(path=str(data)))
    assert "s1.txt" in str(w[0].message) and "s0.txt" not in str(w[0].message)
    assert [s.prompt for s in samples] == ["make the square red", "", "make the square red"]
    # An empty prompt cell is an empty caption too, not a missing column.
    meta = data.parent / "meta"
    shutil.copytree(data / "images", meta / "images")
    shutil.copytree(data / "control", meta / "control")
    write_csv(meta / "metadata.csv", "image,control,prompt", ["images/s0.png,control/s0.png,",
                                                                "images/s1.png,control/s1.png,a caption"])
    with pytest.warns(DatasetWarning, match=r"metadata.csv:2"):
        samples = scan_dataset(DataConfig(path=str(meta / "metadata.csv")))
    assert [s.prompt for s in samples] == ["", "a caption"]


def test_ambiguous_stems_refused(data):
    Image.open(data / "images" / "s0.png").save(data / "images" / "s0.jpg")
    Image.open(data / "control" / "s1.png").save(data / "control" / "s1.JPG")
    (data / "captions").mkdir()
    (data / "captions" / "s2.txt").write_text("another caption")
    with pytest.raises(DatasetError) as e:
        scan_dataset(DataConfig(path=str(data)))
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert "2 files share the stem 's0' (s0.jpg, s0.png)" in msg
    assert "2 files share the stem 's1' (s1.JPG, s1.png)" in msg
    assert "s2.png: 2 captions" in msg


def test_folder_with_metadata_refused(data):
    write_csv(data / "metadata.csv", "image,control,prompt", ["images/s0.png,control/s0.png,x"])
    with pytest.raises(DatasetError, match="holds images/ and metadata.csv") as e:
        scan_dataset(DataConfig(path=str(data)))
    assert f"point data.path at the metadata file to use it (e.g. {data / 'metadata.csv'})" in str(e.value)
    assert len(scan_dataset(DataConfig(path=str(data / "metadata.csv")))) == 1  # the file itself is unambiguous


def test_unknown_columns_warn_known_used(data):
    write_csv(data / "metadata.csv", "image,control,prompt,masks,mask",
              ["images/s0.png,control/s0.png,x,images/s0_mask.png,images/s0_mask.png"])
    with pytest.warns(DatasetWarning, match=r"1 unknown column\(s\) in .*metadata.csv, ignored") as w:
        samples = scan_dataset(DataConfig(path=str(data / "metadata.csv")))
    assert "masks" in str(w[0].message) and "known columns: image, control, kontext_images, prompt, mask" in str(
        w[0].message)
    assert samples[0].mask.name == "s0_mask.png"


def test_aspect_change_warns_beyond_flooring(tmp_path):
    root = tmp_path / "d"
    write_pair(root, "long", size=(30, 1000))  # (h, w): floored to 992x16
    cfg = DataConfig(path=str(root))
    with pytest.warns(DatasetWarning, match="aspect ratio") as w:
        validate_dataset(scan_dataset(cfg), cfg)
    msg = str(w[0].message)
    assert "2 image(s)" in msg and "long.png: 1000x30 -> 992x16 (aspect 33.3 -> 62, +86%)" in msg
    root = tmp_path / "e"
    write_pair(root, "square", size=(1023, 1023))  # floored to 1008x1008: same aspect
    write_pair(root, "wide", size=(100, 1000), caption="x")  # 992x96: 1000/100 -> 992/96 = +3%, within 5%
    cfg = DataConfig(path=str(root))
    with strict():
        validate_dataset(scan_dataset(cfg), cfg)


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


def test_paths_outside_the_dataset_refused(data, tmp_path):
    shutil.copy(data / "images" / "s0.png", tmp_path / "outside.png")
    rows = ["../outside.png,control/s0.png,x", f"{tmp_path / 'outside.png'},control/s0.png,x",
            f"{data / 'images' / 's1.png'},control/s1.png,x"]  # absolute but inside: allowed
    write_csv(data / "metadata.csv", "image,control,prompt", rows)
    with pytest.raises(DatasetError) as e:
        scan_dataset(DataConfig(path=str(data / "metadata.csv")))
    msg = str(e.value)
    assert "2 problem(s)" in msg and "metadata.csv:2: '../outside.png' is outside the dataset folder" in msg
    assert f"metadata.csv:3: '{tmp_path / 'outside.png'}' is outside" in msg and "data.allow_outside_paths" in msg
    samples = scan_dataset(DataConfig(path=str(data / "metadata.csv"), allow_outside_paths=True))
    outside = tmp_path / "outside.png"
    assert [s.image for s in samples] == [outside, outside, data / "images" / "s1.png"]


def test_mixed_case_extensions_end_to_end(tmp_path, components):
    root = tmp_path / "d"
    write_pair(root, "a", seed=3)
    (root / "images" / "a.png").rename(root / "images" / "a.Png")
    Image.open(root / "control" / "a.png").save(root / "control" / "a.JPG")
    (root / "control" / "a.png").unlink()
    cfg = DataConfig(path=str(root), max_sequence_length=32)
    samples = scan_dataset(cfg)
    assert samples[0].image.name == "a.Png" and samples[0].control.name == "a.JPG"
    validate_dataset(samples, cfg)
    entries, _ = build_cache(samples, cfg, components, tmp_path / "cache", "m", progress=False)
    want = encode_image(components.vae, preprocess_image(Image.open(root / "control" / "a.JPG").convert("RGB")))[0]
    assert torch.equal(entries[0]["control_latents"], want)


def test_text_encodings(data):
    (data / "images" / "s1.txt").write_bytes("rendre le carré rouge".encode("latin-1"))
    with pytest.raises(DatasetError, match=r"(?s)1 problem\(s\).*s1.txt: not UTF-8 text \(byte 0xe9 at offset 14\)"):
        scan_dataset(DataConfig(path=str(data)))
    (data / "images" / "s1.txt").write_text("rendre le carré rouge", encoding="utf-8-sig")  # BOM: skipped
    assert scan_dataset(DataConfig(path=str(data)))[1].prompt == "rendre le carré rouge"
    write_csv(data / "metadata.csv", "image,control,prompt", ["images/s0.png,control/s0.png,x"], encoding="utf-8-sig")
    assert scan_dataset(DataConfig(path=str(data / "metadata.csv")))[0].image == data / "images" / "s0.png"


def test_metadata_column_errors_once(data):
    write_csv(data / "metadata.csv", "image,control", [f"images/s{i}.png,control/s{i}.png" for i in range(3)])
    with pytest.raises(DatasetError) as e:
        scan_dataset(DataConfig(path=str(data / "metadata.csv")))
    assert str(e.value).count("\n") == 1 and "no 'prompt' column (columns found: image, control;" in str(e.value)
    rows = [json.dumps({"image": "images/s0.png", "control": "control/s0.png", "prompt": "x"}),
            json.dumps({"image": "images/s1.png", "prompt": "x"})]
    (data / "metadata.jsonl").write_text("\n".join(rows))
    with pytest.raises(DatasetError, match=r"no 'control' column in line\(s\) 2 \(columns found: image, control, "
                                           r"prompt;"):
        scan_dataset(DataConfig(path=str(data / "metadata.jsonl")))
    # An unquoted comma splits a prompt into two cells: refused, not truncated to its first part.
    write_csv(data / "metadata.csv", "image,control,prompt", ["images/s0.png,control/s0.png,make it red, then blue"])
    with pytest.raises(DatasetError, match="metadata.csv:2: 4 cells but the header has 3"):
        scan_dataset(DataConfig(path=str(data / "metadata.csv")))


def test_nfc_and_nfd_names_match(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    root = tmp_path / "d"
    write_pair(root, nfd)  # as macOS writes it
    (root / "control" / f"{nfd}.png").rename(root / "control" / f"{nfc}.png")
    (root / "images" / f"{nfd}.txt").rename(root / "images" / f"{nfc}.txt")
    samples = scan_dataset(DataConfig(path=str(root)))
    assert len(samples) == 1 and samples[0].control.name == f"{nfc}.png"
    write_csv(root / "metadata.csv", "image,control,prompt", [f"images/{nfc}.png,control/{nfd}.png,x"])
    samples = scan_dataset(DataConfig(path=str(root / "metadata.csv")))
    assert samples[0].image.name == f"{nfd}.png" and samples[0].control.name == f"{nfc}.png"
    (root / "metadata.csv").unlink()
    (root / "control" / f"{nfc}.png").unlink()
    with pytest.raises(DatasetError) as e:
        scan_dataset(DataConfig(path=str(root)))
    assert str(e.value).startswith("1 problem(s)") and "no control image" in str(e.value)  # one error, not two


# ---------------------------------------------------------------- the stat index (warm starts)


def image_reads(monkeypatch):
    """A list that records every image file cache.py reads (to hash or decode it)."""
    reads, read_bytes = [], Path.read_bytes

    def counting(self):
        if self.suffix.lower() in (".png", ".jpg"):
            reads.append(self.name)
        return read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    return reads


def test_warm_start_reads_no_image_and_changed_files_are_reread(data, tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "RACY_NS", 0)  # trust files written this instant (the default waits 2 s)
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
    monkeypatch.setattr(cache, "RACY_NS", 0)
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
    assert torch.equal(pixels(cache.load_pixels(s.image, cfg)), torch.from_numpy(np.rot90(stored, -1).copy()).float())
    assert torch.equal(pixels(cache.load_pixels(s.control, cfg)), torch.from_numpy(np.rot90(stored, 1).copy()).float())
    m = cache.load_mask(s.mask, (6, 4))[0]
    assert torch.equal(m[:5], torch.zeros(5, 4)) and torch.equal(m[5], torch.ones(4))
    e = encode_sample(s, DataConfig(path="", max_sequence_length=32), components)
    assert e["image_latents"].shape[1:] == e["control_latents"].shape[1:] == e["mask"].shape[1:] == (6, 4)
    # Uncached training takes its batch shapes from the same upright sizes.
    assert cache.OnTheFly([s], cfg, components).shape(0) == tuple(e["image_latents"].shape) * 2
    assert cache.check_dataset(cfg) == 0
    assert "target 32x48, control 32x48" in capsys.readouterr().out  # W x H, upright


def test_old_stat_index_sizes_are_not_trusted(tmp_path, monkeypatch):
    # An index written before orientation was applied holds the stored size; its version is refused.
    monkeypatch.setattr(cache, "RACY_NS", 0)
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
    got = pixels(cache.load_pixels(tmp_path / "g16.png", DataConfig(path="")))
    assert all(torch.equal(got[..., c], want) for c in range(3))
    mask = cache.load_mask(tmp_path / "g16.png", (16, 16))[0]  # a grey ramp: thresholded
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
    got = pixels(cache.load_pixels(tmp_path / "t.png", DataConfig(path="", background=background)))
    assert (got - want).abs().max() <= 1  # alpha_composite rounds
    assert torch.equal(got[:, 12], torch.tensor(background).float().expand(16, 3))  # transparent: the background
    assert torch.equal(got[:, 0], torch.from_numpy(shown[:, 0]).float())  # opaque: unchanged


def test_transparent_mask_pixels_are_outside_the_edit_region(tmp_path):
    a = np.full((16, 16, 4), 255, np.uint8)  # white everywhere, as painting tools leave the hidden RGB
    a[:, 8:, 3] = 0  # a white stroke on the left half; the right half is transparent
    Image.fromarray(a, "RGBA").save(tmp_path / "m.png")
    m = cache.load_mask(tmp_path / "m.png", (16, 16))[0]
    assert torch.equal(m[:, :8], torch.ones(16, 8)) and torch.equal(m[:, 8:], torch.zeros(16, 8))


def test_decoder_changes_change_the_cache_key(data, monkeypatch):
    cfg = DataConfig(path=str(data))
    s = scan_dataset(cfg)[0]
    k = sample_key(s, cfg, "m")
    assert sample_key(s, DataConfig(path=str(data), background=(0, 0, 0)), "m") != k
    monkeypatch.setattr(cache, "CACHE_VERSION", "2")  # the decoder before orientation / 16-bit / transparency
    assert sample_key(s, cfg, "m") != k


# ---------------------------------------------------------------- python cache.py check


def check(capsys, *args) -> tuple[int, str]:
    code = cache.main(["check", *map(str, args)])
    return code, capsys.readouterr().out


def test_check_prints_counts_sizes_and_caption_stats(data, capsys):
    write_pair(data, "wide", size=(48, 100), caption="make the square red")
    write_pair(data, "clip", caption=" ".join(["word"] * 60))  # ~80 tokens: over CLIP's 77, within T5's 512
    write_pair(data, "long", caption=" ".join(["word"] * 600))  # ~800 tokens: over both
    (data / "images" / "s2.txt").write_text("")
    code, out = check(capsys, data)
    assert code == 0, out
    assert "samples: 6; with control: 6; with mask: 1; with a caption: 5" in out
    assert "     5  target 64x48, control 64x48" in out and "     1  target 96x48, control 96x48" in out
    assert "likely over 77 CLIP tokens" in out and f"{data / 'images' / 'clip.png'}: ~80 tokens" in out
    clip_line, t5_line = [line for line in out.splitlines() if "likely over" in line]
    assert clip_line.endswith(": 2") and t5_line.endswith(": 1") and "likely over 512 T5 tokens" in t5_line
    assert "empty: 1; shared by several samples: 1 caption(s), 3 samples (most: 'make the square red' x 3)" in out
    assert "warning: 1 sample(s) with an empty caption" in out and "s2.txt" in out
    assert out.rstrip().endswith("check: 0 error(s), 1 warning(s)")  # warnings are not fatal
    code, out = check(capsys, data, "--max-pixels", 1024, "--max-sequence-length", 100)
    th, tw = cache.target_size((48, 64), DataConfig(path="", max_pixels=1024))
    assert code == 0 and f"target {tw}x{th}, control {tw}x{th}" in out and "likely over 100 T5 tokens" in out


def test_check_lists_every_problem_and_exits_2(data, capsys, tmp_path):
    (data / "images" / "s1.txt").unlink()  # no caption: a scan problem
    full = (data / "control" / "s2.png").read_bytes()
    (data / "control" / "s2.png").write_bytes(full[: len(full) // 2])  # truncated: found by decoding
    code, out = check(capsys, data)
    assert code == 2
    assert "error: " + str(data / "images" / "s1.png") + ": no caption" in out
    assert "error: " + str(data / "control" / "s2.png") + ": unreadable or corrupt image" in out
    assert "samples: 2;" in out and "     1  target 64x48, control 64x48" in out  # s0 still counted; s2 unsized
    assert cache.main(["check", str(data), "--repeat", "0"]) == 2
    assert "data.repeat: expected an integer >= 1" in capsys.readouterr().err
    # The command itself (python cache.py check DATA): exit codes.
    run = lambda path: subprocess.run([sys.executable, str(ROOT / "cache.py"), "check", str(path)],  # noqa: E731
                                      capture_output=True, text=True, cwd=ROOT)
    r = run(data)
    assert r.returncode == 2 and "no caption" in r.stdout
    (data / "images" / "s1.txt").write_text("x")
    (data / "control" / "s2.png").write_bytes(full)
    r = run(data)
    assert r.returncode == 0 and "check: 0 error(s)" in r.stdout, r.stdout + r.stderr
