"""tiny.py: the miniature checkpoint is a real diffusers folder with working, trained tokenizers, a VAE that
reconstructs, a base that copies its control image; the toy dataset's edit."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import objective
from encode import encode_image, latent_ids, pack_latents, preprocess_image
from tiny import TinySpec, _cell_pictures, build_components, ensure_toy_dataset, write_tiny

PROMPTS = ["make the sky red", "turn the cat into a dog", "add a hat", "café ümlaut 日本語", ""]


def test_tokenizers_distinguish_prompts(pipe):
    # Guards the transformers-5 trap: a CLIPTokenizer built from vocab_file= has 3 tokens and maps every
    # prompt to the same ids, and a pipeline-vs-us parity test still passes because both share it.
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        assert len(tok) > 100
        ids = {tuple(tok(p).input_ids) for p in PROMPTS}
        assert len(ids) == len(PROMPTS)
    words = pipe.tokenizer("make the sky red").input_ids
    assert len(words) < len("make the sky red") + 2  # merges learnt: fewer tokens than characters


def test_write_is_deterministic(tmp_path):
    spec = TinySpec(seed=3, copy_steps=3)  # the fitting runs too (the default's 1000 steps would take a minute)
    a, b = write_tiny(tmp_path / "a", spec), write_tiny(tmp_path / "b", spec)
    for sub, f in [("transformer", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")]:
        ta, tb = load_file(a / sub / f), load_file(b / sub / f)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    for tok in ("tokenizer", "tokenizer_2"):
        assert (a / tok / "tokenizer.json").read_text() == (b / tok / "tokenizer.json").read_text()


def test_wide_variant_is_wider():
    base, wide = build_components(TinySpec()), build_components(TinySpec().wide())
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(wide["transformer"]) > 2 * n(base["transformer"])
    assert wide["transformer"].config.joint_attention_dim == wide["text_encoder_2"].config.d_model


def test_vae_reconstructs_cell_images_and_averages_others(pipe):
    # The VAE as written and read back by diffusers: exact (to 1e-2 in [-1, 1]) on 8x8-cell images, and each 8x8
    # block's mean on noise, where a random VAE decodes to noise.
    cells = _cell_pictures(np.random.default_rng(0), 4, 64)
    noise = torch.rand(2, 3, 48, 80) * 2 - 1
    with torch.no_grad():
        rec = lambda x: pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample  # noqa: E731
        assert (rec(cells) - cells).abs().max() < 1e-2
        blocks = torch.nn.functional.avg_pool2d(noise, 8).repeat_interleave(8, 2).repeat_interleave(8, 3)
        assert (rec(noise) - blocks).abs().max() < 1e-2 and (rec(noise) - noise).abs().mean() > 0.3
        z = pipe.vae.encode(cells).latent_dist.mode()
    latents = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    assert 0.5 < latents.std() < 2  # FLUX-like scale for the flow-matching noise


def test_base_copies_its_control_under_train_objective(pipe):
    # fit_copy writes the copy objective itself (tiny.py may not import objective.py): objective.flow_matching_loss agrees
    # that the written base copies, and only from the right control.
    x = _cell_pictures(np.random.default_rng(1), 6, 64)
    with torch.no_grad():
        x0 = torch.cat([pack_latents(encode_image(pipe.vae, preprocess_image(Image.fromarray(
            ((im.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))))) for im in x])
        embeds, pooled, text_ids = pipe.encode_prompt("make the square red", prompt_2=None, max_sequence_length=32)
        ids = torch.cat([latent_ids(8, 8, 0.0), latent_ids(8, 8, marker=1.0)])
        g, n = torch.Generator().manual_seed(0), x0.shape[0]

        def loss(control, t):
            return float(objective.flow_matching_loss(pipe.transformer, x0, torch.randn(x0.shape, generator=g),
                                                      torch.full((n,), t), control, embeds.expand(n, -1, -1),
                                                      pooled.expand(n, -1), ids, text_ids, 1.0))

        for t in (0.25, 0.75):
            own, rolled = loss(x0, t), loss(x0.roll(1, 0), t)
            assert own < 0.05 and rolled > 20 * own, (t, own, rolled)


def test_toy_edit_paints_only_the_square_red():
    root = ensure_toy_dataset()
    for i in range(24):
        c = np.asarray(Image.open(root / "control" / f"{i:03d}.png")).astype(int)
        t = np.asarray(Image.open(root / "images" / f"{i:03d}.png")).astype(int)
        changed = (c != t).any(-1)
        ys, xs = np.nonzero(changed)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        assert changed.sum() == (y1 - y0) * (x1 - x0) and {y0 % 8, x0 % 8, y1 % 8, x1 % 8} == {0}  # a grid square
        assert (t[changed] == (230, 20, 20)).all() and np.abs(c[changed][0] - (230, 20, 20)).sum() >= 250
        bg = c[~changed]
        assert (bg == bg[0]).all() and bg[0][0] == bg[0][1] == bg[0][2]  # one grey background
        assert (root / "images" / f"{i:03d}.txt").read_text() == "make the square red"


def test_near_inverse_vae_needs_one_group():
    with pytest.raises(ValueError, match="norm_num_groups 1"):
        build_components(TinySpec(vae_groups=4))
