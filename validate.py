"""What a training run checks and measures beside its loop: the conditioning check (before any model loads), the
held-out loss (fixed noise and t, comparable across steps and runs) and the validation grids (sample.py on the
held-out pairs: control(s) | sample | target).
"""

import dataclasses
from pathlib import Path

import torch

from config import Config, TrainConfig
from images import open_image
from load import Components
from objective import collate, flow_matching_loss
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


@torch.no_grad()
def validation_grid(transformer, vae, val_samples, val_data, cfg: Config, step: int, out_dir: Path,
                    region=None) -> Path:
    """sample.py on each held-out pair (fixed seeds, cached prompt embeddings, the cached IP-Adapter embeddings and
    the mask for the region token when the run uses them), saved as one PNG with a row per sample:
    control(s) | sample | target."""
    was = transformer.training
    transformer.eval()
    rows = []
    for i, s in enumerate(val_samples):
        e = val_data[i]
        controls = [open_image(p, background=cfg.data.background) for p in s.controls]
        control = controls or None  # sample() takes the list of references; [one] is the single-image edit
        target = open_image(s.image, background=cfg.data.background)
        sc = cfg.sample
        out = sample(Components(vae=vae, transformer=transformer), control, None,
                     prompt_embeds=e["prompt_embeds"][None], pooled_prompt_embeds=e["pooled_prompt_embeds"][None],
                     guidance_scale=sc.guidance_scale, num_inference_steps=sc.num_inference_steps,
                     generator=torch.Generator().manual_seed(sc.seed + i), size_mode="native",
                     height=None if control is not None else target.height,
                     width=None if control is not None else target.width, progress=False,
                     ip_adapter_image_embeds=e.get("ip_image_embeds"),
                     mask=e.get("mask") if region is not None else None, region=region).images[0]
        rows.append(controls + [out, target])
    grid = tile_grid(rows)
    path = out_dir / "validation" / f"step-{step:06d}.png"  # a log artefact, not a checkpoint
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    transformer.train(was)
    return path
