"""caption.py on tiny random BLIP and Florence-2 checkpoints (tiny.py): which images get captions, where and how
they are written, failures, batching, edit-pair templates, and that data.scan_dataset accepts the result."""

import csv
import json

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

import caption
from caption import CaptionConfig, caption_dataset, caption_images, load_captioner
from config import DataConfig
from data import scan_dataset
from images import DatasetError, open_image
from fixtures import ensure_tiny_captioner, write_tiny_blip, write_tiny_florence2

TOKENS = 5  # max_new_tokens: enough to tell captions apart, few enough to stay fast


@pytest.fixture(scope="session")
def blip_path():
    return ensure_tiny_captioner("blip")


@pytest.fixture(scope="session")
def blip(blip_path):
    return load_captioner(str(blip_path))


@pytest.fixture(scope="session")
def florence():
    return load_captioner(str(ensure_tiny_captioner("florence2")))


def write_images(folder, n, seed=0):
    """n distinct 32x32 pictures (a coloured square on a plain ground) as folder/000.png ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = np.empty((32, 32, 3), np.uint8)
        img[:] = rng.integers(0, 256, 3)
        y, x = rng.integers(0, 16, 2)
        img[y:y + 16, x:x + 16] = rng.integers(0, 256, 3)
        Image.fromarray(img).save(folder / f"{i:03d}.png")


def folder_dataset(root, n=4, captions=None):
    """images/ + control/ of n pairs; captions: {index: text} written as images/<stem>.txt."""
    write_images(root / "images", n, seed=0)
    write_images(root / "control", n, seed=1)
    for i, text in (captions or {}).items():
        (root / "images" / f"{i:03d}.txt").write_text(text)
    return root


def cfg_for(data, path, **kw):
    return CaptionConfig(data=str(data), model=str(path), max_new_tokens=TOKENS, **kw)


def expected(captioner, *paths):
    """The captions of these images from one direct caption_images call (batching is tested on its own)."""
    out = caption_images(captioner, [open_image(p) for p in paths], TOKENS)
    return out[0] if len(paths) == 1 else out


def test_captions_missing_ones_only_and_scan_accepts_them(tmp_path, blip):
    ds = folder_dataset(tmp_path / "ds", captions={0: "keep me", 2: "and me", 3: " \n"})  # 3: empty, as missing
    with pytest.raises(DatasetError, match="no caption"):
        scan_dataset(DataConfig(path=str(ds)))
    summary = caption_dataset(cfg_for(ds, "unused: the captioner is given"), blip, progress=False)
    assert summary.skipped == 2 and not summary.failed
    assert sorted(summary.written) == [str(ds / "images" / "001.txt"), str(ds / "images" / "003.txt")]
    assert (ds / "images" / "000.txt").read_text() == "keep me"
    assert (ds / "images" / "002.txt").read_text() == "and me"
    want = expected(blip, ds / "images" / "001.png", ds / "images" / "003.png")
    assert [(ds / "images" / f"{i:03d}.txt").read_text() for i in (1, 3)] == want and all(want)
    samples = scan_dataset(DataConfig(path=str(ds)))
    assert [s.prompt for s in samples][::2] == ["keep me", "and me"] and all(s.prompt for s in samples)
    assert not list(ds.rglob("*.tmp"))


def test_overwrite_rewrites_in_place_and_new_ones_follow_captions_folder(tmp_path, blip):
    ds = folder_dataset(tmp_path / "ds")
    (ds / "captions").mkdir()
    (ds / "captions" / "000.txt").write_text("old")
    (ds / "001.txt").write_text("old too")  # the dataset root is one of data.py's caption places as well
    caption_dataset(cfg_for(ds, "-"), blip, progress=False)
    assert (ds / "captions" / "000.txt").read_text() == "old" and (ds / "001.txt").read_text() == "old too"
    assert sorted(p.name for p in (ds / "captions").iterdir()) == ["000.txt", "002.txt", "003.txt"]
    summary = caption_dataset(cfg_for(ds, "-", overwrite=True), blip, progress=False)
    assert len(summary.written) == 4 and summary.skipped == 0
    want = expected(blip, ds / "images" / "000.png", ds / "images" / "001.png")
    assert [(ds / "captions" / "000.txt").read_text(), (ds / "001.txt").read_text()] == want
    assert "old" not in want
    assert not list((ds / "images").glob("*.txt"))  # no second caption file beside the one rewritten
    assert len(scan_dataset(DataConfig(path=str(ds)))) == 4


def test_trigger_prefix_suffix(tmp_path, blip):
    ds = folder_dataset(tmp_path / "ds", n=2)
    caption_dataset(cfg_for(ds, "-", trigger="ohwx", prefix="a photo of ", suffix=", 4k"), blip, progress=False)
    for i, raw in enumerate(expected(blip, ds / "images" / "000.png", ds / "images" / "001.png")):
        assert (ds / "images" / f"{i:03d}.txt").read_text() == f"ohwx, a photo of {raw}, 4k"


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_metadata_prompt_column(tmp_path, blip, fmt):
    ds = tmp_path / "ds"
    write_images(ds / "t", 3)
    write_images(ds / "c", 3, seed=1)
    rows = [{"image": f"t/{i:03d}.png", "control": f"c/{i:03d}.png", "note": f"café {i}"} for i in range(3)]
    rows[1]["prompt"] = "kept, with a comma"
    if fmt == "csv":  # no prompt column at all except in the row that has one: the column is added
        with open(ds / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["image", "control", "note", "prompt"])
            w.writeheader()
            w.writerows(rows)
    else:
        rows[0]["prompt"] = ""
        (ds / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = ds / f"metadata.{fmt}"
    summary = caption_dataset(cfg_for(ds, "-"), blip, progress=False)
    assert summary.skipped == 1 and len(summary.written) == 2 and not summary.failed
    samples = scan_dataset(DataConfig(path=str(meta)))
    first, last = expected(blip, ds / "t" / "000.png", ds / "t" / "002.png")
    assert [s.prompt for s in samples] == [first, "kept, with a comma", last]
    read = list(csv.DictReader(open(meta, encoding="utf-8"))) if fmt == "csv" else \
        [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines()]
    assert [r["note"] for r in read] == ["café 0", "café 1", "café 2"]  # other columns kept, in row order


def test_failures_are_counted_and_finished_captions_stay(tmp_path, blip, monkeypatch):
    ds = folder_dataset(tmp_path / "ds", n=6)
    (ds / "images" / "005.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    calls = []

    def flaky(captioner, images, max_new_tokens):
        calls.append(len(images))
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return caption_images(captioner, images, max_new_tokens)

    monkeypatch.setattr(caption, "caption_images", flaky)
    summary = caption_dataset(cfg_for(ds, "-", batch_size=2), blip, progress=False)
    assert calls == [2, 2, 1]  # 005.png never reached the captioner
    assert [p.split("/")[-1] for p in summary.written] == ["000.txt", "001.txt", "004.txt"]
    assert [(f.split("/")[-1], why.split(":")[0]) for f, why in summary.failed] == [
        ("002.png", "captioner failed on its batch"), ("003.png", "captioner failed on its batch"),
        ("005.png", str(ds / "images" / "005.png"))]
    assert "RuntimeError: CUDA out of memory" in summary.failed[0][1] and "corrupt" in summary.failed[2][1]
    assert "failed: 3" in str(summary) and "002.png" in str(summary)
    assert sorted(p.name for p in (ds / "images").glob("*.txt")) == ["000.txt", "001.txt", "004.txt"]
    assert not list(ds.rglob("*.tmp"))
    # a rerun captions what is still missing and keeps what was written
    before = (ds / "images" / "000.txt").read_text()
    again = caption_dataset(cfg_for(ds, "-", batch_size=2), blip, progress=False)
    assert again.skipped == 3 and len(again.written) == 2 and len(again.failed) == 1
    assert (ds / "images" / "000.txt").read_text() == before


def test_a_failed_write_leaves_no_partial_file(tmp_path, blip, monkeypatch):
    ds = folder_dataset(tmp_path / "ds", n=3)
    real = caption.os.replace

    def replace(src, dst):
        if str(dst).endswith("001.txt"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(caption.os, "replace", replace)
    summary = caption_dataset(cfg_for(ds, "-"), blip, progress=False)
    assert [f.split("/")[-1] for f, _ in summary.failed] == ["001.png"] and "No space left" in summary.failed[0][1]
    assert sorted(p.name for p in (ds / "images").iterdir() if p.suffix != ".png") == ["000.txt", "002.txt"]


def test_metadata_keeps_finished_rows_when_the_captioner_fails(tmp_path, blip, monkeypatch):
    ds = tmp_path / "ds"
    write_images(ds / "t", 3)
    (ds / "metadata.jsonl").write_text("".join(json.dumps({"image": f"t/{i:03d}.png"}) + "\n" for i in range(3)))
    calls = []

    def fail_second(captioner, images, max_new_tokens):
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("boom")
        return caption_images(captioner, images, max_new_tokens)

    monkeypatch.setattr(caption, "caption_images", fail_second)
    summary = caption_dataset(cfg_for(ds, "-", batch_size=1), blip, progress=False)
    assert len(summary.written) == 2 and [f.split("/")[-1] for f, _ in summary.failed] == ["001.png"]
    rows = [json.loads(line) for line in (ds / "metadata.jsonl").read_text().splitlines()]
    assert [bool(r.get("prompt")) for r in rows] == [True, False, True]
    assert not list(ds.rglob("*.tmp"))


@pytest.mark.parametrize("kind", ["blip", "florence2"])
def test_batch_size_does_not_change_captions(tmp_path, kind, request):
    captioner = request.getfixturevalue("blip" if kind == "blip" else "florence")
    ds = folder_dataset(tmp_path / "ds", n=4)
    out = {}
    for bs in (1, 3):  # 3: a full batch and a short one
        caption_dataset(cfg_for(ds, "-", batch_size=bs, overwrite=True), captioner, progress=False)
        out[bs] = [(ds / "images" / f"{i:03d}.txt").read_text() for i in range(4)]
    assert out[1] == out[3] and all(out[1])
    assert len(set(out[1])) > 1  # captions depend on the image, so a batch mixing up its order would show


def test_template_captions_both_images_of_a_pair(tmp_path, blip):
    ds = folder_dataset(tmp_path / "ds", n=3)
    cfg = cfg_for(ds, "-", template="change {control} to {target}", trigger="kx", batch_size=3)
    summary = caption_dataset(cfg, blip, progress=False)  # 6 images in batches of 3: pair 1 spans two batches
    assert len(summary.written) == 3 and not summary.failed
    want = expected(blip, *[ds / d / f"{i:03d}.png" for i in range(3) for d in ("control", "images")])
    for i in range(3):
        c, t = want[2 * i], want[2 * i + 1]
        assert (ds / "images" / f"{i:03d}.txt").read_text() == f"kx, change {c} to {t}"
    caption_dataset(cfg_for(ds, "-", template="{control}", overwrite=True), blip, progress=False)
    assert (ds / "images" / "000.txt").read_text() == expected(blip, ds / "control" / "000.png")


def test_template_and_config_errors(tmp_path, blip):
    ds = folder_dataset(tmp_path / "ds", n=1)
    for template, words in [("make {colour} red", r"unknown field\(s\) \{colour\}"), ("no fields", "no field"),
                            ("{target", "expected '}'")]:
        with pytest.raises(ValueError, match=words):
            caption_dataset(cfg_for(ds, "-", template=template), blip, progress=False)
    with pytest.raises(ValueError, match="3 caption config problem") as e:
        caption_dataset(cfg_for(ds, "-", batch_size=0, dtype="fp12", device="gpu"), blip, progress=False)
    assert "batch_size" in str(e.value) and "fp12" in str(e.value) and "gpu" in str(e.value)
    write_images(tmp_path / "t2i" / "images", 1)  # text-to-image: no control to caption
    with pytest.raises(DatasetError, match="captions the control image, which 1 image"):
        caption_dataset(cfg_for(tmp_path / "t2i", "-", template="{target} from {control}"), blip, progress=False)


def test_not_a_captioner(tmp_path, tiny_path):
    with pytest.raises(ValueError, match="no config.json .*diffusers pipeline"):
        load_captioner(str(tiny_path))
    with pytest.raises(ValueError, match="captioner folder .*/nowhere does not exist"):
        load_captioner(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="model_type 'clip_text_model', not a captioner; expected model_type blip"):
        load_captioner(str(tiny_path / "text_encoder"))
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({"model_type": "florence2", "auto_map": {"AutoConfig": "x.y"}}))
    with pytest.raises(ValueError, match="remote code .*florence-community/Florence-2-large"):
        load_captioner(str(remote))
    vqa = {"model_type": "blip", "architectures": ["BlipForQuestionAnswering"]}
    (remote / "config.json").write_text(json.dumps(vqa))
    with pytest.raises(ValueError, match="BlipForQuestionAnswering checkpoint, not BlipForConditionalGeneration"):
        load_captioner(str(remote))
    (remote / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not a JSON config"):
        load_captioner(str(remote))


def test_tasks(blip_path, blip):
    with pytest.raises(ValueError, match="'<OD>': not a Florence-2 captioning task; expected one of .*"
                                         "<MORE_DETAILED_CAPTION>"):
        load_captioner(str(ensure_tiny_captioner("florence2")), task="<OD>")
    with pytest.raises(ValueError, match="Florence-2 task token; BLIP takes"):
        load_captioner(str(blip_path), task="<CAPTION>")
    conditional = load_captioner(str(blip_path), task="a photo of")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    text = caption_images(conditional, [img], TOKENS)[0]
    assert text.startswith("a photo") and text != caption_images(blip, [img], TOKENS)[0]


def test_nothing_to_caption_loads_no_model(tmp_path):
    ds = folder_dataset(tmp_path / "ds", n=2, captions={0: "a", 1: "b"})
    summary = caption_dataset(cfg_for(ds, tmp_path / "no-such-model"), progress=False)
    assert summary.skipped == 2 and not summary.written


def test_cli(tmp_path, blip_path):
    ds = folder_dataset(tmp_path / "ds", n=2)
    summary = caption.main(["--data", str(ds), "--model", str(blip_path), "--max-new-tokens", "4", "--trigger", "z",
                            "--dtype", "bf16"])
    assert len(summary.written) == 2 and (ds / "images" / "000.txt").read_text().startswith("z, ")


def test_tiny_captioners_are_deterministic_with_working_tokenizers(tmp_path):
    for write in (write_tiny_blip, write_tiny_florence2):
        a, b = write(tmp_path / f"{write.__name__}-a"), write(tmp_path / f"{write.__name__}-b")
        wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
        assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
        assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
        tok = load_captioner(str(a)).processor.tokenizer
        prompts = ["make the sky red", "turn the cat into a dog", "café"]
        ids = [tuple(tok(p, add_special_tokens=False).input_ids) for p in prompts]
        assert len(set(ids)) == 3 and len(tok) > 100 and len(ids[0]) < len(prompts[0])
