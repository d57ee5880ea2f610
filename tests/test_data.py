"""data.py: layouts, validation, warnings and refusals, the dataset check (python data.py check)."""

import contextlib
import json
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

from cache import build_cache
from config import DataConfig
from data import main, scan_dataset, validate_dataset
from encode import encode_image, preprocess_image
from images import DatasetError, DatasetWarning, target_size
from tests_util import write_pair

ROOT = Path(__file__).resolve().parents[1]


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


# ---------------------------------------------------------------- python data.py check


def check(capsys, *args) -> tuple[int, str]:
    code = main(["check", *map(str, args)])
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
    th, tw = target_size((48, 64), DataConfig(path="", max_pixels=1024))
    assert code == 0 and f"target {tw}x{th}, control {tw}x{th}" in out and "likely over 100 T5 tokens" in out
    # data.bucket kontext: the histogram of buckets (64x48 and 100x48 land in Kontext's 4:3 and 2:1-ish entries)
    code, out = check(capsys, data, "--bucket", "kontext")
    b1, b2 = (target_size(hw, DataConfig(path="", bucket="kontext"))[::-1] for hw in ((48, 64), (48, 100)))
    assert code == 0 and "nearest in aspect (data.bucket kontext)" in out
    assert f"     5  target {b1[0]}x{b1[1]}, control {b1[0]}x{b1[1]}" in out
    assert f"     1  target {b2[0]}x{b2[1]}, control {b2[0]}x{b2[1]}" in out


def test_check_lists_every_problem_and_exits_2(data, capsys, tmp_path):
    (data / "images" / "s1.txt").unlink()  # no caption: a scan problem
    full = (data / "control" / "s2.png").read_bytes()
    (data / "control" / "s2.png").write_bytes(full[: len(full) // 2])  # truncated: found by decoding
    code, out = check(capsys, data)
    assert code == 2
    assert "error: " + str(data / "images" / "s1.png") + ": no caption" in out
    assert "error: " + str(data / "control" / "s2.png") + ": unreadable or corrupt image" in out
    assert "samples: 2;" in out and "     1  target 64x48, control 64x48" in out  # s0 still counted; s2 unsized
    assert main(["check", str(data), "--repeat", "0"]) == 2
    assert "data.repeat: expected an integer >= 1" in capsys.readouterr().err
    # The command itself (python data.py check DATA): exit codes.
    run = lambda path: subprocess.run([sys.executable, str(ROOT / "data.py"), "check", str(path)],  # noqa: E731
                                      capture_output=True, text=True, cwd=ROOT)
    r = run(data)
    assert r.returncode == 2 and "no caption" in r.stdout
    (data / "images" / "s1.txt").write_text("x")
    (data / "control" / "s2.png").write_bytes(full)
    r = run(data)
    assert r.returncode == 0 and "check: 0 error(s)" in r.stdout, r.stdout + r.stderr
