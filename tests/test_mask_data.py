"""Issue #12's data: the pairs layout (target/, context/, masks/, depth/, prompts.txt), depth images in the other
layouts, masks thresholded at 0.5, and the up-front checks of what the run conditions on."""

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import validate
from cache import sample_key
from config import Config, DataConfig, IPAdapterConfig, ModelConfig, TrainConfig
from data import scan_dataset, validate_dataset
from images import DatasetError, DatasetWarning, load_mask, mask_latent


def png(path: Path, size=(32, 32), value=128, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    Image.fromarray(np.full(shape, value, np.uint8), mode).save(path)
    return path


def pairs(root: Path, stems=("a", "b", "c"), masks=True, depth=True, prompts=None) -> Path:
    for s in stems:
        png(root / "target" / f"{s}.png")
        png(root / "context" / f"{s}.png")
        if masks:
            png(root / "masks" / f"{s}.png", value=255, mode="L")
        if depth:
            png(root / "depth" / f"{s}.png", value=90)
    lines = prompts if prompts is not None else [f"edit {s}" for s in stems]
    (root / "prompts.txt").write_text("\n".join(lines) + "\n")
    return root


def scan(root, **kw):
    return scan_dataset(DataConfig(path=str(root), **kw))


def test_pairs_layout(tmp_path):
    root = pairs(tmp_path / "d", stems=("b", "a", "c"), prompts=["first", "second", "third"])
    samples = scan(root)
    # prompts.txt follows the sorted stems, not the order the files were written in
    assert [(s.key, s.prompt) for s in samples] == [("a", "first"), ("b", "second"), ("c", "third")]
    s = samples[0]
    assert (s.image, s.control, s.mask, s.depth) == (root / "target/a.png", root / "context/a.png",
                                                     root / "masks/a.png", root / "depth/a.png")
    sizes = validate_dataset(samples, DataConfig(path=str(root)))
    assert sizes[0]["depth"] == (32, 32)
    bare = scan(pairs(tmp_path / "bare", masks=False, depth=False))
    assert all(s.mask is None and s.depth is None for s in bare)


def test_pairs_layout_problems(tmp_path):
    root = pairs(tmp_path / "d")
    (root / "context" / "b.png").unlink()
    png(root / "masks" / "zzz.png", mode="L")
    png(root / "depth" / "yyy.png")
    with pytest.raises(DatasetError) as e:
        scan(root)
    msg = str(e.value)
    assert "context/b.*" in msg and "zzz.png: no target/zzz.*" in msg and "yyy.png: no target/yyy.*" in msg
    root = pairs(tmp_path / "lines", prompts=["one", "two"])
    with pytest.raises(DatasetError, match=r"prompts.txt: 2 line\(s\) but 3 target"):
        scan(root)
    root = pairs(tmp_path / "none")
    (root / "prompts.txt").unlink()
    with pytest.raises(DatasetError, match="prompts.txt: missing"):
        scan(root)
    root = pairs(tmp_path / "both")
    png(root / "images" / "a.png")
    with pytest.raises(DatasetError, match="ambiguous"):
        scan(root)


def test_pairs_blank_line_and_numeric_names(tmp_path):
    # a trailing blank line is not a prompt; stems "2" and "10" sort as text and that is warned about
    root = pairs(tmp_path / "d", stems=("2", "10"), prompts=["for 10", "for 2", ""])
    with pytest.warns(DatasetWarning, match="zero-pad"):
        samples = scan(root)
    assert [(s.key, s.prompt) for s in samples] == [("10", "for 10"), ("2", "for 2")]


def test_depth_in_folder_and_metadata(tmp_path):
    root = tmp_path / "f"
    png(root / "images" / "x.png")
    png(root / "images" / "x_depth.png")
    png(root / "control" / "x.png")
    (root / "images" / "x.txt").write_text("p")
    [s] = scan(root)
    assert s.depth == root / "images" / "x_depth.png" and s.key == "x"  # not a target of its own
    meta = tmp_path / "m"
    for n in ("t.png", "c.png", "d.png"):
        png(meta / n)
    (meta / "metadata.jsonl").write_text('{"image": "t.png", "control": "c.png", "prompt": "p", "depth": "d.png"}\n')
    [s] = scan(meta / "metadata.jsonl")
    assert s.depth == meta / "d.png"


def test_depth_changes_the_key_only_when_present(tmp_path):
    [s] = scan(pairs(tmp_path / "d", stems=("a",)))
    cfg = DataConfig(path=str(tmp_path / "d"))
    with_depth, without = sample_key(s, cfg, "m"), sample_key(dataclasses.replace(s, depth=None), cfg, "m")
    assert with_depth != without
    png(s.depth, value=91)  # other depth bytes, other key
    assert sample_key(s, cfg, "m") not in (with_depth, without)


def test_mask_threshold_and_warning(tmp_path):
    a = np.zeros((16, 16), np.uint8)
    a[:, :8] = 255
    a[:, 8:10] = 140  # above 0.5: inside
    a[:, 10:12] = 100  # below: outside
    with pytest.warns(DatasetWarning, match="neither black nor white; thresholded at 0.5"):
        m = mask_latent(Image.fromarray(a, "L"), (16, 16), "m.png")
    assert torch.equal(m[0, 0], torch.tensor([1.0] * 10 + [0.0] * 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # training's masks: validate_dataset warned already
        assert torch.equal(mask_latent(Image.fromarray(a, "L"), (16, 16), None), m)
    binary = np.where(a >= 128, 255, 0).astype(np.uint8)
    Image.fromarray(binary, "L").save(tmp_path / "b.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a black-and-white mask is not warned about
        m2 = load_mask(tmp_path / "b.png", (2, 2))
    assert torch.allclose(m2[0], torch.tensor([[1.0, 0.25], [1.0, 0.25]]))  # area average of the binary mask


def cfg_for(root, **train_kw) -> Config:
    return Config(data=DataConfig(path=str(root)), train=TrainConfig(**train_kw))


def test_conditioning_check(tmp_path):
    root = pairs(tmp_path / "d", masks=False, depth=False)
    samples = scan(root)
    notes = []
    validate.conditioning_check(samples, cfg_for(root), notes.append)  # nothing asked, nothing needed
    with pytest.raises(ValueError, match=r"(?s)3 sample\(s\).*target/a.png: no mask \(train.region_token"):
        validate.conditioning_check(samples, cfg_for(root, region_token=True), notes.append)
    ipa = dataclasses.replace(cfg_for(root), model=ModelConfig(ip_adapter=IPAdapterConfig(path="x")))
    with pytest.raises(ValueError, match="no depth image"):
        validate.conditioning_check(samples, ipa, notes.append)
    with_depth = scan(pairs(tmp_path / "e", masks=False))
    validate.conditioning_check(with_depth, cfg_for(tmp_path / "e"), notes.append)
    assert notes == ["note: 3 depth image(s) ignored: model.ip_adapter.path is not set"]


def test_grey_masks_warned_up_front(tmp_path, monkeypatch):
    import images

    monkeypatch.setattr(images, "RACY_NS", 0)  # fresh files enter the stat index: the second call is a warm start
    root = pairs(tmp_path / "d")
    a = np.zeros((32, 32), np.uint8)
    a[:, :16], a[0, 20] = 255, 77  # one grey pixel (JPEG noise, an antialiased edge)
    Image.fromarray(a, "L").save(root / "masks" / "b.png")
    cfg = DataConfig(path=str(root))
    with pytest.warns(DatasetWarning, match=r"(?s)1 mask\(s\) are not black and white.*masks/b.png: 1 grey"):
        validate_dataset(scan(root), cfg, tmp_path / "cache")
    with pytest.warns(DatasetWarning, match="not black and white"):  # a warm start (stat index) still says it
        validate_dataset(scan(root), cfg, tmp_path / "cache")
    Image.fromarray(np.where(a > 127, 255, 0).astype(np.uint8), "L").save(root / "masks" / "b.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_dataset(scan(root), cfg, tmp_path / "cache")
