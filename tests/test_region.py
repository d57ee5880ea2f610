"""region.py's learnable region token (issue #12): shapes at any resolution, where it joins the sequence, saving
beside the LoRA, training it with the LoRA (gradients, checkpoints, exact resume), and sampling with it."""

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import objective
import sample as sample_py
import train
from config import load_config
from encode import latent_ids, token_mask
from region import REGION_ID, MaskRegionToken, append_region, load_region, region_path, save_region

ROOT = Path(__file__).resolve().parents[1]


def test_token_at_any_grid():
    torch.manual_seed(0)
    m = MaskRegionToken(4, 4, 8)
    mask = (torch.rand(2, 1, 4, 4) > 0.5).float()
    own = m(mask)
    assert own.shape == (2, 1, 8)
    assert torch.allclose(own[:, 0], F.linear(mask.flatten(1), m.proj.weight, m.proj.bias))  # no pooling at its grid
    big = mask.repeat_interleave(3, 2).repeat_interleave(3, 3)  # the same mask at 12 x 12 tokens
    assert torch.allclose(m(big), own, atol=1e-6)
    assert m(torch.ones(1, 1, 7, 13)).shape == (1, 1, 8)  # uneven sizes pool too
    assert not torch.allclose(m(torch.zeros(1, 1, 4, 4)), m(torch.ones(1, 1, 4, 4)))


def test_token_mask_is_the_loss_rule():
    # the loss weight per token and the region token's grid come from the same subsampling
    mask = torch.rand(2, 1, 6, 8)
    entries = [{"image_latents": torch.zeros(16, 6, 8), "control_latents": torch.zeros(16, 6, 8), "mask": mask[i],
                "prompt_embeds": torch.zeros(3, 4), "pooled_prompt_embeds": torch.zeros(4)} for i in range(2)]
    empty = {"empty_prompt_embeds": torch.zeros(3, 4), "empty_pooled_prompt_embeds": torch.zeros(4)}
    b = objective.collate(entries, empty, train.TrainConfig(), ("step", 0, 0), "cpu", torch.float32, slice(0, 2))
    assert torch.equal(b["tmask"], token_mask(mask)) and b["tmask"].shape == (2, 1, 3, 4)
    assert torch.equal(b["mask"], mask[:, :, ::2, ::2].flatten(2).transpose(1, 2))


def test_append_region():
    control, ids = torch.randn(2, 6, 8), torch.cat([latent_ids(4, 6, 0.0), latent_ids(4, 6, 1.0)])
    assert append_region(None, torch.ones(2, 1, 2, 3), control, ids) == (control, ids)
    m = MaskRegionToken(2, 3, 8)
    assert append_region(m, None, control, ids) == (control, ids)
    tmask = torch.ones(2, 1, 2, 3)
    c2, ids2 = append_region(m, tmask, control, ids)
    assert c2.shape == (2, 7, 8) and torch.equal(c2[:, :6], control) and torch.equal(c2[:, 6:], m(tmask))
    assert ids2.shape == (13, 3) and ids2[-1].tolist() == [REGION_ID, 0.0, 0.0] and torch.equal(ids2[:12], ids)
    alone, ids3 = append_region(m, tmask, None, ids[:6])  # text-to-image: the token is the only extra one
    assert alone.shape == (2, 1, 8) and ids3.shape == (7, 3)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    m = MaskRegionToken(3, 5, 16)
    path = region_path(tmp_path / "lora.safetensors")
    assert path.name == "lora.region.safetensors"
    save_region(m, path)
    back = load_region(path, c_in=16)
    assert back.grid == (3, 5)
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    with pytest.raises(ValueError, match="16 wide but the transformer takes 64"):
        load_region(path, c_in=64)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a region-token file"):
        load_region(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="cannot read"):
        load_region(tmp_path / "missing.safetensors")


def masked_cfg(tmp_path, steps: int, **train_kw):
    from tiny import ensure_masked_toy_dataset

    cfg = load_config(ROOT / "configs" / "tiny.py")
    tc = dataclasses.replace(cfg.train, steps=steps, save_every=2, validate_every=-1, log_every=1, lr=1e-3,
                             region_token=True, **train_kw)
    return dataclasses.replace(cfg, out_dir=str(tmp_path / "run"), train=tc,
                               data=dataclasses.replace(cfg.data, path=str(ensure_masked_toy_dataset(n=6, size=32)),
                                                        held_out=1, cache_dir=str(tmp_path / "cache")))


def test_region_trains_saves_and_resumes_exactly(tmp_path):
    """The region token and the LoRA both get gradients and move; lora.region.safetensors is written beside the LoRA;
    2 steps + resume to 4 equal 4 steps straight (the optimizer state of the token included)."""
    with torch.enable_grad():
        full = train.main(masked_cfg(tmp_path / "a", 4, loss="dual_masked"))
        train.main(masked_cfg(tmp_path / "b", 2, loss="dual_masked"))
        resumed = train.main(dataclasses.replace(masked_cfg(tmp_path / "b", 4, loss="dual_masked"), resume="latest"))
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in full["history"][2:]]
    assert all("region_l2" in r and "loss_in" in r for r in full["history"])
    a, b = (load_region(region_path(r["lora"])) for r in (full, resumed))
    torch.manual_seed(0)
    start = MaskRegionToken(16, 16, 64)  # make_region's seeded start
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v)
        assert not torch.equal(v, start.state_dict()[k])  # it trained
    lora = load_file(str(full["lora"]))  # the LoRA trained beside it (its B starts at zero)
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)
    ckpts = sorted((Path(full["lora"]).parent / "checkpoints").glob("lora-*"))
    assert ckpts and all((c / "region.safetensors").is_file() for c in ckpts)


def test_resume_refuses_a_region_mismatch(tmp_path):
    with torch.enable_grad():
        train.main(masked_cfg(tmp_path, 2))
        cfg = masked_cfg(tmp_path, 4)
        cfg = dataclasses.replace(cfg, resume="latest", train=dataclasses.replace(cfg.train, region_token=False))
        # refused before the model loads (lora.resume_problems; load_checkpoint would refuse it too)
        with pytest.raises(ValueError, match="trained with train.region_token = True, the config says False"):
            train.main(cfg)


def test_sample_with_and_without_the_token(components, pipe):
    """The token changes the prediction; without a mask the call is exactly the pipeline's."""
    from PIL import Image

    image = Image.new("RGB", (32, 32), (90, 120, 200))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))
    torch.manual_seed(0)
    region = MaskRegionToken(4, 4, components.transformer.config.in_channels)
    kw = dict(num_inference_steps=2, max_sequence_length=16, output_type="latent", progress=False)
    run = lambda **k: sample_py.sample(components, image, "make it red", generator=torch.Generator().manual_seed(0),  # noqa: E731
                                       **kw, **k).latents
    plain = run(mask=None, region=None)
    ref = pipe(image=image, prompt="make it red", height=32, width=32, max_area=32 * 32, _auto_resize=False,
               num_inference_steps=2, max_sequence_length=16, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(plain, ref)
    with_token = run(mask=mask, region=region)
    assert not torch.allclose(with_token, plain)
    flipped = Image.eval(mask, lambda v: 255 - v)
    assert not torch.allclose(run(mask=flipped, region=region), with_token)  # the mask, not only the token's bias
    with pytest.raises(ValueError, match="needs both mask and region"):
        run(mask=mask)


def test_cli_region_inputs(tmp_path):
    from PIL import Image

    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"")
    img = Image.new("RGB", (32, 32))
    Image.new("L", (32, 32), 255).save(tmp_path / "m.png")
    Image.new("L", (16, 16), 255).save(tmp_path / "small.png")
    args = lambda **k: sample_py.Args(prompt="p", lora=(str(lora),), image=("in.png",), **k)  # noqa: E731
    assert sample_py._region_inputs(args(), [img]) == (None, None)  # a LoRA without a region token
    with pytest.raises(ValueError, match="no --lora has a region token"):
        sample_py._region_inputs(args(mask=str(tmp_path / "m.png")), [img])
    save_region(MaskRegionToken(2, 2, 64), region_path(lora))
    assert sample_py._region_inputs(args(), [img]) == (None, None)  # present but unused without --mask
    region, mask = sample_py._region_inputs(args(mask=str(tmp_path / "m.png")), [img])
    assert region.grid == (2, 2) and mask.size == (32, 32)
    with pytest.raises(ValueError, match="is 16x16 but --image"):
        sample_py._region_inputs(args(mask=str(tmp_path / "small.png")), [img])
