"""What a training run checks and measures beside its loop: the conditioning check (before any model loads), the
held-out loss (fixed noise and t, comparable across steps and runs) and the validation grids (sample.py on the
held-out pairs: control(s) | sample | target).
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from cache import control_latents_of, sample_key
from config import Config, TrainConfig
from encode import unpack_latents
from images import StatIndex, open_image, target_size
from load import Components, model_identity
from objective import collate, flow_matching_loss
from report import plot_curves
from sample import sample


def conditioning_check(samples: list, cfg: Config, log) -> None:
    """What the run's conditioning needs of every sample, checked before any model loads: a mask for the region
    token, a depth image for the IP-Adapter (each missing one named). Depth images without an IP-Adapter are
    ignored, said once."""
    need = []
    if cfg.train.region_token:
        need += [f"{s.image}: no mask (train.region_token needs one per sample: masks/<stem>.png, images/<stem>_mask"
                 f".png or a mask column)" for s in samples if s.mask is None]
    if cfg.model.ip_adapter.path:
        need += [f"{s.image}: no depth image (model.ip_adapter needs one per sample: depth/<stem>.png, "
                 f"images/<stem>_depth.png or a depth column)" for s in samples if s.depth is None]
    elif any(s.depth is not None for s in samples):
        log(f"note: {sum(s.depth is not None for s in samples)} depth image(s) ignored: model.ip_adapter.path is "
            f"not set")
    if need:
        shown = need[:20] + ([f"... and {len(need) - 20} more"] if len(need) > 20 else [])
        raise ValueError(f"{len(need)} sample(s) of {cfg.data.path} lack what the config conditions on:\n  "
                         + "\n  ".join(shown))


@torch.no_grad()
def held_out_loss(transformer, val_data, empty, tc: TrainConfig, device, dtype, region=None) -> float:
    """Flow-matching loss on the held-out samples at fixed noise and t in {0.25, 0.5, 0.75} (comparable across
    steps and runs), conditioned as training is (IP-Adapter embeddings, region token)."""
    was = transformer.training
    transformer.eval()
    total, n = 0.0, 0
    vc = dataclasses.replace(tc, caption_dropout=0.0)
    for i in range(len(val_data)):
        for t in (0.25, 0.5, 0.75):
            b = collate([val_data[i]], empty, vc, ("val", i), device, dtype, slice(0, 1))
            b["t"] = torch.full_like(b["t"], t)
            total += flow_matching_loss(transformer, b["x0"], b["noise"], b["t"], b["control"],
                                        b["prompt_embeds"], b["pooled_prompt_embeds"], b["img_ids"],
                                        b["text_ids"], 1.0, b["weight"], ip_embeds=b["ip_embeds"], region=region,
                                        tmask=b["tmask"]).item()
            n += 1
    transformer.train(was)
    return total / n


def tile_grid(rows: list[list], gap: int = 0, fill=(255, 255, 255)):
    """Rows of PIL images as one RGB image, every tile whole at the top left of its cell: rows right-aligned by
    column (the last columns, sample | target, line up when rows hold different numbers of controls), each column as
    wide as its widest tile, each row as high as its highest, padding and `gap` pixels between cells in `fill` (white:
    not mistaken for a dark tile's edge)."""
    from PIL import Image

    n = max(len(r) for r in rows)
    rows = [[None] * (n - len(r)) + list(r) for r in rows]
    widths = [max((r[j].width for r in rows if r[j] is not None), default=0) for j in range(n)]
    heights = [max(t.height for t in r if t is not None) for r in rows]
    grid = Image.new("RGB", (sum(widths) + gap * (n - 1), sum(heights) + gap * (len(rows) - 1)), fill)
    y = 0
    for r, h in zip(rows, heights):
        x = 0
        for t, w in zip(r, widths):
            if t is not None:
                grid.paste(t.convert("RGB"), (x, y))
            x += w + gap
        y += h + gap
    return grid


# ---------------------------------------------------------------- the edits and their metrics


@torch.no_grad()
def sampled_edits(transformer, vae, val_samples, val_data, cfg: Config, region=None) -> list[dict]:
    """sample.py on each held-out pair (fixed seeds sample.seed + i, cached prompt embeddings, the cached IP-Adapter
    embeddings and the mask for the region token when the run uses them), the references at their training size
    (data.resize / max_pixels, as cached), so the edit's latents line up with the cached target's. Per pair:
    {"key", "controls" (PIL, as sampled), "image" (PIL), "latents" [16, h, w] fp32 on the CPU, "target" (PIL)}."""
    was = transformer.training
    transformer.eval()
    out = []
    for i, s in enumerate(val_samples):
        e = val_data[i]
        controls = [_training_size(open_image(p, background=cfg.data.background), cfg) for p in s.controls]
        control = controls or None  # sample() takes the list of references; [one] is the single-image edit
        target = _training_size(open_image(s.image, background=cfg.data.background), cfg)
        sc = cfg.sample
        res = sample(Components(vae=vae, transformer=transformer), control, None,
                     prompt_embeds=e["prompt_embeds"][None], pooled_prompt_embeds=e["pooled_prompt_embeds"][None],
                     guidance_scale=sc.guidance_scale, num_inference_steps=sc.num_inference_steps,
                     generator=torch.Generator().manual_seed(sc.seed + i), size_mode="native",
                     height=None if control is not None else target.height,
                     width=None if control is not None else target.width, progress=False,
                     ip_adapter_image_embeds=e.get("ip_image_embeds"),
                     mask=e.get("mask") if region is not None else None, region=region)
        h, w = res.images[0].height // 8, res.images[0].width // 8
        out.append(dict(key=s.key, controls=controls, image=res.images[0], target=target,
                        latents=unpack_latents(res.latents[:1].float().cpu(), h, w)[0]))
    transformer.train(was)
    return out


def _training_size(im, cfg: Config):
    """A decoded image at its training size (images.target_size), Lanczos as encode.preprocess_image resizes."""
    from PIL import Image

    h, w = target_size((im.height, im.width), cfg.data)
    return im if (im.height, im.width) == (h, w) else im.resize((w, h), Image.LANCZOS)


def pixel_mae(image, target) -> float:
    """Mean absolute difference of two PIL images in 8-bit units (0-255), at the target's size (`image` resized,
    bicubic, when its size differs)."""
    import numpy as np
    from PIL import Image

    if image.size != target.size:
        image = image.resize(target.size, Image.BICUBIC)
    a, b = (np.asarray(x.convert("RGB"), dtype=np.float64) for x in (image, target))
    return float(np.abs(a - b).mean())


def latent_mse(latents: torch.Tensor, target: torch.Tensor) -> float | None:
    """Mean squared difference of two [16, h, w] latents (the VAE's shifted and scaled space, as cached), or None
    when their shapes differ (a reference of another size than the target has no latent distance)."""
    if latents.shape != target.shape:
        return None
    return float(((latents.float().cpu() - target.float().cpu()) ** 2).mean())


def edit_metrics(edits: list[dict], val_data) -> dict[str, dict]:
    """Per held-out pair (by sample key): the sampled edit's distance to the target and to the (first) control,
    as pixel mean absolute error (0-255) and latent MSE: {mae_target, mae_control, mse_target, mse_control}
    (control distances absent for text-to-image, latent ones None where the shapes differ)."""
    out = {}
    for i, ed in enumerate(edits):
        e = val_data[i]
        m = {"mae_target": pixel_mae(ed["image"], ed["target"]), "mse_target": latent_mse(ed["latents"],
                                                                                           e["image_latents"])}
        if ed["controls"]:
            m["mae_control"] = pixel_mae(ed["image"], ed["controls"][0])
            m["mse_control"] = latent_mse(ed["latents"], control_latents_of(e)[0])
        out[ed["key"]] = m
    return out


def copy_metrics(val_samples, val_data, cfg: Config) -> dict[str, dict]:
    """The copy-the-control baseline per pair: the (first) control's own distance to the target, {mae_target,
    mse_target}; an edit that does nothing scores this. Empty for text-to-image."""
    out = {}
    for i, s in enumerate(val_samples):
        if s.control is None:
            continue
        e = val_data[i]
        control = _training_size(open_image(s.control, background=cfg.data.background), cfg)
        target = _training_size(open_image(s.image, background=cfg.data.background), cfg)
        out[s.key] = {"mae_target": pixel_mae(control, target),
                      "mse_target": latent_mse(control_latents_of(e)[0], e["image_latents"])}
    return out


def mean_metrics(per_pair: dict[str, dict], prefix: str) -> dict[str, float]:
    """{prefix_<metric>: mean over the pairs that have it} (None values and missing metrics skipped)."""
    names = sorted({k for m in per_pair.values() for k in m})
    out = {}
    for k in names:
        vals = [m[k] for m in per_pair.values() if m.get(k) is not None]
        if vals:
            out[f"{prefix}_{k}"] = sum(vals) / len(vals)
    return out


def base_key(val_samples, cfg: Config) -> str:
    """What the base model's edit metrics depend on: the held-out samples' content (cache.sample_key: image bytes,
    prompt, preprocessing), the transformer's and VAE's identity, the model section (quantization, IP-Adapter) and
    the sample section (steps, guidance, seed)."""
    ident = "|".join(model_identity(cfg.model, getattr(cfg.model, n), n) for n in ("clip", "t5", "vae", "transformer"))
    idx = StatIndex()
    keys = [sample_key(s, cfg.data, ident, idx) for s in val_samples]
    blob = json.dumps([keys, dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.sample)], sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@contextlib.contextmanager
def adapter_disabled(transformer):
    """The transformer without its adapter inside the block (peft's tuner layers off, as diffusers'
    disable_adapters does), on again after; a model without an adapter is left alone."""
    has = getattr(transformer, "_hf_peft_config_loaded", False)
    if has:
        transformer.disable_adapters()
    try:
        yield
    finally:
        if has:
            transformer.enable_adapters()


def base_metrics(transformer, vae, val_samples, val_data, cfg: Config, out_dir: Path, can_compute: bool
                 ) -> dict[str, dict] | None:
    """The base model's per-pair edit metrics (edit_metrics with the adapter disabled and no region token), read
    from <out_dir>/validation/base_metrics.json under base_key, else computed and added there (atomically).
    `can_compute` False (full fine-tuning past step 0: the base weights are gone) and nothing cached: None."""
    path = out_dir / "validation" / "base_metrics.json"
    key = base_key(val_samples, cfg)
    known = json.loads(path.read_text()) if path.is_file() else {}
    if key in known:
        return known[key]
    if not can_compute:
        return None
    with adapter_disabled(transformer):
        per_pair = edit_metrics(sampled_edits(transformer, vae, val_samples, val_data, cfg), val_data)
    known[key] = per_pair
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(known, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return per_pair


def validate_edits(transformer, vae, val_samples, val_data, cfg: Config, step: int, out_dir: Path, region=None,
                   base_ok: bool = True) -> tuple[dict, Path | None]:
    """One validation's edit work: the base model's metrics (cached) and the copy-the-control baseline, and, past
    step 0, the LoRA's sampled edits, their metrics and the grid (validation/step-<step>.png). Returns (the log
    record's fields: edit_* / base_* / copy_* means and "pairs": {key: {edit_*, base_*, copy_*}}, the grid's path
    or None at step 0)."""
    per = {"copy": copy_metrics(val_samples, val_data, cfg)}
    base = base_metrics(transformer, vae, val_samples, val_data, cfg, out_dir, base_ok)
    if base is not None:
        per["base"] = base
    grid = None
    if step > 0:
        edits = sampled_edits(transformer, vae, val_samples, val_data, cfg, region)
        per["edit"] = edit_metrics(edits, val_data)
        grid = validation_grid(edits, step, out_dir)
    rec = {}
    for prefix in ("edit", "base", "copy"):
        rec.update(mean_metrics(per.get(prefix, {}), prefix))
    rec["pairs"] = {s.key: {f"{p}_{k}": v for p in per for k, v in per[p].get(s.key, {}).items()}
                    for s in val_samples}
    return rec, grid


def edit_summary(rec: dict, step: int) -> str:
    """One line for the log: pixel MAE and latent MSE to the target, the edit's beside the base model's and
    copy-the-control's (a learned edit is well under both)."""
    def fmt(name):
        parts = [f"{p} {rec[f'{p}_{name}']:.4g}" for p in ("edit", "base", "copy") if f"{p}_{name}" in rec]
        return ", ".join(parts)

    return (f"step {step}: edit metrics, distance to target (lower is better): pixel MAE {fmt('mae_target')}; "
            f"latent MSE {fmt('mse_target')}"
            + (f"; the edit's pixel MAE to its control {rec['edit_mae_control']:.4g}" if "edit_mae_control" in rec
               else ""))


def validation_grid(edits: list[dict], step: int, out_dir: Path) -> Path:
    """The sampled edits as one PNG, a row per held-out pair: control(s) | sample | target."""
    grid = tile_grid([ed["controls"] + [ed["image"], ed["target"]] for ed in edits])
    path = out_dir / "validation" / f"step-{step:06d}.png"  # a log artefact, not a checkpoint
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "plot":
        print("usage: python validate.py plot RUN_DIR   (re-draws RUN_DIR/validation/curves.png from its log.jsonl)",
              file=sys.stderr)
        sys.exit(2)
    run_dir = Path(sys.argv[2])
    if not (run_dir / "log.jsonl").is_file():
        print(f"validate.py: error: {run_dir / 'log.jsonl'} does not exist (not a run folder?)", file=sys.stderr)
        sys.exit(2)
    try:
        plot_curves(run_dir / "log.jsonl", run_dir / "validation" / "curves.png")
    except ValueError as e:
        print(f"validate.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(run_dir / "validation" / "curves.png")
