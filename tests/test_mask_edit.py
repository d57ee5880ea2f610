"""Issue #12 end to end on the tiny models: sample() with an IP-Adapter image equals FluxKontextPipeline with
`ip_adapter_image` (with and without true CFG), and configs/region_tiny.py (IP-Adapter depth + region token + dual
masked loss) learns a masked edit: on unseen pairs the sampled edit moves toward the target inside the mask and
toward the context outside it, against the untrained model."""

import dataclasses
from pathlib import Path

import pytest
import torch

import train
from config import load_config
from encode import encode_image, pack_latents, preprocess_image, token_mask
from images import mask_latent, open_image
from load import load_components
from lora import load_lora
from region import load_region, region_path
from sample import sample
from tiny import ensure_masked_toy_dataset

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "make the square red"


@pytest.fixture(scope="module")
def twin():
    return load_config(ROOT / "configs" / "region_tiny.py")


@pytest.fixture(scope="module")
def ip_components(twin):
    return load_components(twin.model)


@pytest.fixture(scope="module")
def ip_pipe(twin):
    from diffusers import FluxKontextPipeline

    ipa = twin.model.ip_adapter
    p = FluxKontextPipeline.from_pretrained(twin.model.path, dtype=torch.float32)
    p.load_ip_adapter(ipa.path, weight_name=ipa.weight_name,
                      image_encoder_pretrained_model_name_or_path=str(Path(ipa.image_encoder) / "image_encoder"),
                      image_encoder_dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


def pair(root: Path, i: int) -> dict:
    return {k: root / d / f"{i:03d}.png" for k, d in
            (("context", "context"), ("target", "target"), ("mask", "masks"), ("depth", "depth"))}


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_ip_adapter_sample_equals_pipeline(ip_components, ip_pipe, cfg_scale):
    root = ensure_masked_toy_dataset(n=2, size=32, seed=3)
    image, depth = open_image(pair(root, 0)["context"]), open_image(pair(root, 0)["depth"], "RGB", (0, 0, 0))
    neg = dict(negative_prompt="blurry") if cfg_scale > 1 else {}
    common = dict(num_inference_steps=2, guidance_scale=2.5, max_sequence_length=16, true_cfg_scale=cfg_scale, **neg)
    ours = sample(ip_components, image, PROMPT, ip_adapter_image=depth, generator=torch.Generator().manual_seed(0),
                  output_type="latent", progress=False, **common).latents
    ref = ip_pipe(image=image, prompt=PROMPT, ip_adapter_image=depth, height=32, width=32, max_area=32 * 32,
                  _auto_resize=False, generator=torch.Generator().manual_seed(0), output_type="latent",
                  **common).images
    assert torch.equal(ours, ref)
    other = open_image(pair(root, 1)["depth"], "RGB", (0, 0, 0))
    black = sample(ip_components, image, PROMPT, ip_adapter_image=other.point(lambda v: 255 - v),
                   generator=torch.Generator().manual_seed(0), output_type="latent", progress=False, **common).latents
    assert not torch.allclose(black, ours)  # the depth image conditions the edit


def test_ip_adapter_scale_is_per_call(ip_components):
    image = open_image(pair(ensure_masked_toy_dataset(n=2, size=32, seed=3), 0)["context"])
    run = lambda **k: sample(ip_components, image, PROMPT, ip_adapter_image=image, num_inference_steps=2,  # noqa: E731
                             max_sequence_length=16, generator=torch.Generator().manual_seed(0),
                             output_type="latent", progress=False, **k).latents
    base = run()
    assert not torch.allclose(run(ip_adapter_scale=0.0), base)
    assert torch.equal(run(), base)  # the scale came back
    with pytest.raises(ValueError, match="has an IP-Adapter.*pass ip_adapter_image"):
        sample(ip_components, image, PROMPT, num_inference_steps=1, max_sequence_length=16, progress=False)


def masked_errors(c, pairs: list[dict], region=None, steps: int = 8) -> tuple[float, float]:
    """(inside-mask latent MSE to the target, outside-mask latent MSE to the context) of the sampled edits, each
    pair conditioned on its depth map (and, with `region`, its mask through the region token)."""
    inside, outside = [], []
    for i, p in enumerate(pairs):
        context, mask = open_image(p["context"]), open_image(p["mask"], "L")
        out = sample(c, context, PROMPT, num_inference_steps=steps, guidance_scale=1.0, max_sequence_length=32,
                     generator=torch.Generator().manual_seed(i), output_type="latent", progress=False,
                     ip_adapter_image=open_image(p["depth"], "RGB", (0, 0, 0)),
                     mask=mask if region is not None else None, region=region).latents
        target = pack_latents(encode_image(c.vae, preprocess_image(open_image(p["target"]))))
        ctx = pack_latents(encode_image(c.vae, preprocess_image(context)))
        m = token_mask(mask_latent(mask, (context.height // 8, context.width // 8))[None]).flatten(2).transpose(1, 2)
        inside.append((((out - target) ** 2) * m).sum() / (m.sum() * out.shape[-1]))
        outside.append((((out - ctx) ** 2) * (1 - m)).sum() / ((1 - m).sum() * out.shape[-1]))
    return float(torch.stack(inside).mean()), float(torch.stack(outside).mean())


@pytest.mark.slow
def test_learns_the_masked_edit(tmp_path, twin):
    """configs/region_tiny.py as shipped (800 steps, ~20 s), then 8 unseen pairs (another seed). Measured when
    written: inside 2.96 -> 0.86, outside 0.294 -> 0.0085 (untrained -> trained)."""
    cfg = dataclasses.replace(twin, out_dir=str(tmp_path / "run"),
                              train=dataclasses.replace(twin.train, validate_every=-1),
                              data=dataclasses.replace(twin.data, cache_dir=str(tmp_path / "cache")))
    with torch.enable_grad():
        lora = train.main(cfg)["lora"]
    root = ensure_masked_toy_dataset(n=8, seed=1)
    pairs = [pair(root, i) for i in range(8)]
    c = load_components(twin.model)
    before = masked_errors(c, pairs)
    load_lora(c.transformer, lora)
    after = masked_errors(c, pairs, load_region(region_path(lora)))
    assert after[0] < 0.5 * before[0], (before, after)
    assert after[1] < 0.25 * before[1], (before, after)
