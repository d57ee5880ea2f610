"""Several reference images per edit: ComfyUI's "offset" ids (encode.py), both dataset layouts and the cache
(data.py, cache.py), batching and a training run (train.py), sample() and the CLI with two images (sample.py)."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cache
import images
import objective
import train
from cache import build_cache, cache_paths, control_latents_of, read_entry
from config import DataConfig, load_config
from data import check_dataset, scan_dataset, validate_dataset
from encode import (control_ids, encode_image, latent_ids, pack_controls, pack_latents, prepare_latents,
                    preprocess_image, reference_offsets)
from images import DatasetError
from sample import main, parse_args, sample

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(ROOT / "configs" / "tiny.py")
PROMPT = "make the square red"


def rand_image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---------------------------------------------------------------- ids (encode.py)

# latent (h, w) per reference -> (h_offset, w_offset) in latent pixels, worked out by hand from ComfyUI's rule:
# right of the canvas (w offset) when ref_h + canvas_h > ref_w + canvas_w, else below it (h offset).
OFFSETS = [
    ([(8, 8)], [(0, 0)]),
    ([(12, 4)], [(0, 0)]),
    ([(8, 8), (8, 8)], [(0, 0), (8, 0)]),  # a tie goes below
    ([(8, 8), (8, 8), (8, 8)], [(0, 0), (8, 0), (0, 8)]),  # canvas 16 x 8: the third goes right
    ([(12, 4), (12, 4), (12, 4)], [(0, 0), (0, 4), (0, 8)]),  # tall ones in a row
    ([(4, 12), (4, 12), (4, 12)], [(0, 0), (4, 0), (8, 0)]),  # wide ones in a column
    ([(8, 6), (4, 10), (6, 6)], [(0, 0), (8, 0), (0, 10)]),  # canvas 12 x 10 after two
    ([(128, 128), (64, 96)], [(0, 0), (128, 0)]),  # 1024^2 then 512x768 (latent sizes)
    ([(64, 96), (128, 128)], [(0, 0), (64, 0)]),  # 128 + 64 > 128 + 96 is false: below
]


@pytest.mark.parametrize("sizes,want", OFFSETS)
def test_reference_offsets_table(sizes, want):
    got = reference_offsets(sizes)
    assert got == want
    # and the rule's point: references never overlap each other on their shared index-1 plane
    boxes = [(oh, ow, oh + h, ow + w) for (h, w), (oh, ow) in zip(sizes, got)]
    for i, a in enumerate(boxes):
        for b in boxes[:i]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_control_ids_shape_and_values():
    sizes = [(4, 6), (6, 4), (2, 2)]  # offsets (0, 0), (4, 0) -> tokens (2, 0), then (0, 6) -> tokens (0, 3)
    assert reference_offsets(sizes) == [(0, 0), (4, 0), (0, 6)]
    ids = control_ids(sizes)
    assert ids.shape == (6 + 6 + 1, 3) and ids.dtype == torch.float32
    assert (ids[:, 0] == 1).all()  # one index for every reference (ComfyUI's "offset": index = 1)
    want = []
    for (h, w), (r0, c0) in zip(sizes, [(0, 0), (2, 0), (0, 3)]):
        want += [[1.0, r0 + r, c0 + c] for r in range(h // 2) for c in range(w // 2)]  # row-major, as packing
    assert ids.tolist() == want
    assert control_ids(sizes, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_one_reference_is_bit_equal_to_the_pipeline(pipe, components):
    ours = control_ids([(6, 10)])
    theirs = pipe._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32)
    theirs[..., 0] = 1  # pipeline.prepare_latents marks the image (control) ids so
    assert torch.equal(ours, theirs) and torch.equal(ours, latent_ids(6, 10, marker=1.0))
    # prepare_latents with a list of one == with the tensor == pipeline.prepare_latents
    x = preprocess_image(rand_image(48, 80, seed=2))
    lat = encode_image(components.vae, x)
    want = pipe.prepare_latents(x, 2, 16, 64, 96, torch.float32, "cpu", torch.Generator().manual_seed(5))
    for got in (prepare_latents(lat, 2, 64, 96, torch.float32, "cpu", torch.Generator().manual_seed(5)),
                prepare_latents([lat], 2, 64, 96, torch.float32, "cpu", torch.Generator().manual_seed(5))):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_prepare_latents_two_references():
    a, b = torch.randn(1, 16, 6, 10), torch.randn(1, 16, 8, 4)
    noise, control, ids, cids = prepare_latents([a, b], 3, 64, 96, torch.float32, "cpu",
                                                torch.Generator().manual_seed(0))
    assert noise.shape == (3, 24, 64) and control.shape == (3, 15 + 8, 64)
    assert torch.equal(control[0, :15], pack_latents(a)[0]) and torch.equal(control[2, 15:], pack_latents(b)[0])
    assert torch.equal(cids, control_ids([(6, 10), (8, 4)])) and ids.shape == (24, 3)
    tokens, same = pack_controls([a, b])
    assert torch.equal(tokens, control[:1]) and torch.equal(same, cids)
    with pytest.raises(ValueError, match="cannot repeat 2 control images"):
        prepare_latents([a, b.repeat(2, 1, 1, 1)], 3, 64, 96, torch.float32, "cpu")


# ---------------------------------------------------------------- datasets and the cache (data.py, cache.py)


def save(path, h=32, w=48, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rand_image(h, w, seed).save(path)


def folder(root, refs: dict[str, int]):
    """images/<stem>.png + caption, control/<stem>.png and <stem>_1.png ... (n references per stem)."""
    for i, (stem, n) in enumerate(refs.items()):
        save(root / "images" / f"{stem}.png", seed=10 * i)
        (root / "images" / f"{stem}.txt").write_text(PROMPT)
        for k in range(n):
            save(root / "control" / f"{stem}{f'_{k}' if k else ''}.png", 16 + 16 * k, 48, seed=10 * i + k + 1)
    return root


def test_folder_layout_one_to_three_references(tmp_path):
    root = folder(tmp_path / "d", {"a": 1, "b": 2, "c": 3, "c_1x": 1})
    save(root / "images" / "a_1.png")  # a target named like a reference of "a": its own control stays its own
    (root / "images" / "a_1.txt").write_text(PROMPT)
    save(root / "control" / "a_1.png")
    samples = {s.key: s for s in scan_dataset(DataConfig(path=str(root)))}
    names = {k: [p.name for p in s.controls] for k, s in samples.items()}
    assert names == {"a": ["a.png"], "a_1": ["a_1.png"], "b": ["b.png", "b_1.png"],
                     "c": ["c.png", "c_1.png", "c_2.png"], "c_1x": ["c_1x.png"]}
    assert samples["c"].control.name == "c.png" and samples["a"].extra_controls == ()
    sizes = validate_dataset(list(samples.values()), DataConfig(path=str(root)))
    assert sizes[list(samples).index("c")]["control_2"] == (48, 48)


def test_folder_layout_errors(tmp_path):
    root = folder(tmp_path / "d", {"a": 1, "b": 1, "c": 1})
    save(root / "control" / "a_2.png")  # a gap: no a_1
    (root / "control" / "b.png").rename(root / "control" / "b_1.png")  # a 2nd reference without the 1st
    save(root / "control" / "c_0.png")  # numbering starts at 1
    with pytest.raises(DatasetError) as e:
        scan_dataset(DataConfig(path=str(root)))
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert "a_2.png: reference _2 of" in msg and "but no a_1.*" in msg
    assert "b.png: no control image" in msg and "b_1.png is the 2nd reference, b.* the 1st" in msg
    assert "c_0.png: control image without a target" in msg and "numbered c_1, c_2" in msg


def test_metadata_layouts_with_lists(tmp_path):
    root = folder(tmp_path / "d", {"a": 1, "b": 2, "c": 3})
    rows = [("images/a.png", ["control/a.png"]), ("images/b.png", ["control/b.png", "control/b_1.png"]),
            ("images/c.png", ["control/c.png", "control/c_1.png", "control/c_2.png"])]
    meta = root  # data.path names the file: a folder holding images/ and a metadata file is not read as a folder
    (meta / "metadata.jsonl").write_text("\n".join(json.dumps({"image": i, "kontext_images": c if len(c) > 1 else c[0],
                                                               "prompt": PROMPT}) for i, c in rows))
    (meta / "metadata.csv").write_text("image,control,prompt\n" + "".join(f"{i},{'; '.join(c)},{PROMPT}\n"
                                                                          for i, c in rows))
    for name in ("metadata.jsonl", "metadata.csv"):
        samples = scan_dataset(DataConfig(path=str(meta / name)))
        assert [[p.name for p in s.controls] for s in samples] == [[Path(p).name for p in c] for _, c in rows]


def test_metadata_list_errors(tmp_path):
    meta = folder(tmp_path / "d", {"a": 2})
    (meta / "metadata.csv").write_text('image,control,prompt\n'
                                       'images/a.png,"[""control/a.png"", ""control/a_1.png""]",x\n'
                                       "images/a.png,control/a.png;;control/a_1.png,x\n"
                                       "images/a.png,control/a.png;control/gone.png,x\n")
    with pytest.raises(DatasetError) as e:
        scan_dataset(DataConfig(path=str(meta / "metadata.csv")))
    msg = str(e.value)
    assert "metadata.csv:2: control cell" in msg and "looks like a list; in a .csv separate several" in msg
    assert "metadata.csv:3: an empty path in control cell" in msg
    assert "metadata.csv:4: file not found" in msg and "gone.png" in msg
    (meta / "metadata.csv").unlink()
    (meta / "metadata.jsonl").write_text(json.dumps({"image": "images/a.png", "control": [], "prompt": "x"}) + "\n"
                                         + json.dumps({"image": "images/a.png", "control": ["control/a.png", 3],
                                                       "prompt": "x"}))
    with pytest.raises(DatasetError) as e:
        scan_dataset(DataConfig(path=str(meta / "metadata.jsonl")))
    assert "metadata.jsonl:1: empty 'control' cell" in str(e.value)
    assert "metadata.jsonl:2: a path must be a string, found 3" in str(e.value)


def test_check_prints_every_reference(tmp_path, capsys):
    root = folder(tmp_path / "d", {"a": 1, "b": 2})
    assert check_dataset(DataConfig(path=str(root))) == 0
    out = capsys.readouterr().out
    assert "with several references: 1" in out
    assert "target 48x32, control 48x16, control 2 48x32" in out and "target 48x32, control 48x16\n" in out


def test_cache_round_trip(tmp_path, components):
    root = folder(tmp_path / "d", {"a": 1, "b": 2, "c": 3})
    cfg = DataConfig(path=str(root), max_sequence_length=32)
    samples = scan_dataset(cfg)
    entries, _ = build_cache(samples, cfg, components, tmp_path / "cache", "m", progress=False)
    files, _ = cache_paths(samples, cfg, tmp_path / "cache", "m")
    for s, e, f in zip(samples, entries, files):
        stored = read_entry(f, f.stem, cache.required_keys(s))
        refs = control_latents_of(stored)
        assert len(refs) == len(s.controls) == len(control_latents_of(e))
        for p, r in zip(s.controls, refs):
            assert torch.equal(r, encode_image(components.vae, images.load_pixels(p, cfg))[0])
    assert sorted(k for k in read_entry(files[2], files[2].stem, ()) if k.startswith("control")) == [
        "control_latents", "control_latents_1", "control_latents_2"]
    # a 3-reference entry does not pass for a sample that wants a 4th
    more = dataclasses.replace(samples[2], extra_controls=samples[2].extra_controls + (samples[0].control,))
    assert read_entry(files[2], files[2].stem, cache.required_keys(more)) is None
    # a new reference is a new key; the other samples' files are reused untouched
    mtimes = [f.stat().st_mtime_ns for f in files]
    save(root / "control" / "a_1.png", seed=99)
    samples2 = scan_dataset(cfg)
    files2, _ = cache_paths(samples2, cfg, tmp_path / "cache", "m")
    assert files2[0] != files[0] and files2[1:] == files[1:]
    build_cache(samples2, cfg, components, tmp_path / "cache", "m", progress=False)
    assert [f.stat().st_mtime_ns for f in files[1:]] == mtimes[1:]
    assert len(control_latents_of(read_entry(files2[0], files2[0].stem, ()))) == 2


# ---------------------------------------------------------------- training (train.py)


def multiref_dataset(tmp_path, n=6, k=2) -> Path:
    """The toy edit dataset's first n pairs, each with k - 1 further references (the control flipped, 48 px high)."""
    from tiny import ensure_toy_dataset

    toy, root = ensure_toy_dataset(), tmp_path / "multi"
    for sub in ("images", "control"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        stem = f"{i:03d}"
        for name in (f"{stem}.png", f"{stem}.txt"):
            shutil.copy(toy / "images" / name, root / "images" / name)
        control = Image.open(toy / "control" / f"{stem}.png")
        control.save(root / "control" / f"{stem}.png")
        for j in range(1, k):
            control.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((64, 48)).rotate(90 * j).save(
                root / "control" / f"{stem}_{j}.png")
    return root


def tiny_train_cfg(tmp_path, data, **train_kw):
    cfg = load_config(TINY_CONFIG)
    kw = dict(steps=3, batch_size=2, save_every=0, validate_every=-1, log_every=1)
    kw.update(train_kw)
    return dataclasses.replace(cfg, out_dir=str(tmp_path / "run"), train=dataclasses.replace(cfg.train, **kw),
                               data=dataclasses.replace(cfg.data, path=str(data), cache_dir=str(tmp_path / "cache"),
                                                        held_out=1))


def test_collate_two_references(tmp_path):
    entries = [{"image_latents": torch.randn(16, 8, 8), "control_latents": torch.randn(16, 8, 8),
                "control_latents_1": torch.randn(16, 6, 8), "prompt_embeds": torch.randn(4, 32),
                "pooled_prompt_embeds": torch.randn(32)} for _ in range(2)]
    empty = {"empty_prompt_embeds": torch.zeros(4, 32), "empty_pooled_prompt_embeds": torch.zeros(32)}
    b = objective.collate(entries, empty, train.TrainConfig(), ("step", 0, 0), "cpu", torch.float32, slice(0, 2))
    assert b["control"].shape == (2, 16 + 12, 64)
    assert torch.equal(b["control"][1, 16:], pack_latents(entries[1]["control_latents_1"][None])[0])
    assert torch.equal(b["img_ids"], torch.cat([latent_ids(8, 8), control_ids([(8, 8), (6, 8)])]))
    # one reference: today's collate, term for term
    one = [{k: v for k, v in e.items() if k != "control_latents_1"} for e in entries]
    b1 = objective.collate(one, empty, train.TrainConfig(), ("step", 0, 0), "cpu", torch.float32, slice(0, 2))
    assert torch.equal(b1["control"], pack_latents(torch.stack([e["control_latents"] for e in one])))
    assert torch.equal(b1["img_ids"], torch.cat([latent_ids(8, 8), latent_ids(8, 8, marker=1.0)]))
    assert torch.equal(b1["noise"], b["noise"]) and torch.equal(b1["x0"], b["x0"])
    with pytest.raises(ValueError, match=r"entries with \[1, 2\] references in one batch"):
        objective.collate([entries[0], one[1]], empty, train.TrainConfig(), ("step", 0, 0), "cpu", torch.float32,
                          slice(0, 2))


def test_batches_never_mix_reference_counts(tmp_path):
    data = multiref_dataset(tmp_path, n=4, k=2)
    (data / "control" / "000_1.png").unlink()  # sample 000: one reference
    c = data / "control"  # 001: the same two references in the other order (the 48 px one first)
    (c / "001.png").rename(c / "001.tmp")
    (c / "001_1.png").rename(c / "001.png")
    (c / "001.tmp").rename(c / "001_1.png")
    cfg = tiny_train_cfg(tmp_path, data)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, held_out=0))
    samples = scan_dataset(cfg.data)
    cached = cache.training_data(cfg, samples, len(samples), log=lambda *a: None)
    uncached = cache.training_data(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, cached=False)),
                                   samples, len(samples), log=lambda *a: None)
    assert cached.shapes == uncached.shapes  # the bucket key needs no encoding in uncached mode
    assert len(set(cached.shapes)) == 3  # 1 reference / 2 references (64 px) / 2 references (48 px first)
    for step in range(6):
        idx = objective.global_batch(cached.shapes, 4, 0, step)
        assert len({cached.shapes[i] for i in idx}) == 1


def test_training_with_two_references(tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_train_cfg(tmp_path, multiref_dataset(tmp_path), validate_every=3)
    with torch.enable_grad():
        out = train.main(cfg)
    losses = [r["loss"] for r in out["history"]]
    assert len(losses) == 3 and all(np.isfinite(losses))
    sd = load_file(out["lora"])
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in sd.items())  # B starts at zero
    grid = Image.open(Path(cfg.out_dir) / "validation" / "step-000003.png")
    assert grid.size == (4 * 64, 64)  # control | 2nd reference (64x48) | sample | target
    log = [json.loads(line) for line in (Path(cfg.out_dir) / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["held_out_loss"]) for r in log if "held_out_loss" in r)


# ---------------------------------------------------------------- sampling (sample.py)


SMALL = dict(num_inference_steps=2, max_sequence_length=32, guidance_scale=1.0, progress=False)


def test_sample_two_images(components):
    a, b = rand_image(48, 80, seed=1), rand_image(64, 48, seed=2)
    seen = []
    hook = components.transformer.register_forward_pre_hook(
        lambda m, args, kw: seen.append((kw["hidden_states"].shape, kw["img_ids"])), with_kwargs=True)
    try:
        two = sample(components, [a, b], PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt", **SMALL)
    finally:
        hook.remove()
    assert two.images.shape == (1, 3, 48, 80)  # native: the output has the first reference's size
    # the transformer saw target + both references' tokens, with ComfyUI's offset ids
    assert seen[0][0] == (1, 15 + 15 + 12, 64)
    assert torch.equal(seen[0][1], torch.cat([latent_ids(6, 10), control_ids([(6, 10), (8, 6)])]))
    first = sample(components, a, PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt", **SMALL)
    assert torch.equal(sample(components, [a], PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt",
                              **SMALL).images, first.images)  # [one] is the single-image edit, bit for bit
    assert not torch.allclose(two.images, first.images)  # the 2nd reference changes the edit
    swapped = sample(components, [b, a], PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt",
                     size_mode="pipeline", height=48, width=80, max_area=48 * 80, auto_resize=False, **SMALL)
    assert swapped.images.shape == (1, 3, 48, 80) and not torch.allclose(swapped.images, two.images)
    with pytest.raises(ValueError, match="empty list"):
        sample(components, [], PROMPT, **SMALL)


def test_cli_two_images(tmp_path, capsys, components):
    a, b = rand_image(48, 80, seed=3), rand_image(32, 48, seed=4)
    a.save(tmp_path / "a.png")
    b.save(tmp_path / "b.png")
    args = parse_args(["--config", TINY_CONFIG, "--image", str(tmp_path / "a.png"), "--image", str(tmp_path / "b.png"),
                       "--prompt", PROMPT, "--sample.num-inference-steps", "2", "--out", str(tmp_path / "o.png")])
    assert args.image == (str(tmp_path / "a.png"), str(tmp_path / "b.png"))
    main(args)
    assert "saved" in capsys.readouterr().out
    want = sample(components, [a, b], PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                  max_sequence_length=32, guidance_scale=1.0, progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o.png")), np.asarray(want))
    with pytest.raises(ValueError, match=r"nope\.png"):
        main(parse_args(["--config", TINY_CONFIG, "--image", str(tmp_path / "a.png"), "--image",
                         str(tmp_path / "nope.png"), "--prompt", PROMPT]))
