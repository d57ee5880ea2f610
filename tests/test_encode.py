"""encode.py against the FluxKontextPipeline methods of the same names (tiny model, fp32, CPU: exact)."""

import numpy as np
import pytest
import torch
from PIL import Image

from encode import (encode_image, encode_prompt, get_clip_prompt_embeds, get_t5_prompt_embeds, kontext_size,
                    latent_ids, output_size, pack_latents, prepare_latents, preprocess_image, unpack_latents)

PROMPTS = ["make the sky red", "turn the cat into a dog"]
PROMPTS_2 = ["add a hat to the person", "make it night"]
LONG = " ".join(["a photo of a cat sitting on a red chair in a sunny garden"] * 8)  # > 77 CLIP tokens


def rand_image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_get_clip_prompt_embeds(components, pipe):
    ours = get_clip_prompt_embeds(components.clip, components.clip_tokenizer, PROMPTS, num_images_per_prompt=2)
    theirs = pipe._get_clip_prompt_embeds(PROMPTS, num_images_per_prompt=2, device="cpu")
    assert ours.shape == theirs.shape == (4, 32)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours[0], ours[2])  # distinct prompts give distinct embeddings
    long_ours = get_clip_prompt_embeds(components.clip, components.clip_tokenizer, [LONG])
    assert torch.equal(long_ours, pipe._get_clip_prompt_embeds([LONG], device="cpu"))  # truncated at 77, as theirs


def test_get_t5_prompt_embeds(components, pipe):
    ours = get_t5_prompt_embeds(components.t5, components.t5_tokenizer, PROMPTS, 2, max_sequence_length=64)
    theirs = pipe._get_t5_prompt_embeds(PROMPTS, 2, max_sequence_length=64, device="cpu")
    assert ours.shape == theirs.shape == (4, 64, 32)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours[0], ours[2])


def test_encode_prompt(components, pipe):
    c = components
    ours = encode_prompt(c.clip, c.clip_tokenizer, c.t5, c.t5_tokenizer, PROMPTS, PROMPTS_2,
                         num_images_per_prompt=2, max_sequence_length=128)
    theirs = pipe.encode_prompt(PROMPTS, PROMPTS_2, device="cpu", num_images_per_prompt=2, max_sequence_length=128)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)
    same = encode_prompt(c.clip, c.clip_tokenizer, c.t5, c.t5_tokenizer, PROMPTS, max_sequence_length=128)
    assert not torch.equal(same[0], ours[0][::2])  # prompt_2 really reaches T5


def test_encode_prompt_rejects_long_sequence(components):
    c = components
    with pytest.raises(ValueError, match="max_sequence_length"):
        encode_prompt(c.clip, c.clip_tokenizer, c.t5, c.t5_tokenizer, "x", max_sequence_length=513)


@pytest.mark.parametrize("size,auto", [((72, 100), False), ((50, 90), False), ((130, 70), True)])
def test_preprocess_image_equals_pipeline(pipe, size, auto):
    img = rand_image(*size)
    h, w = kontext_size(*size, auto)
    theirs = pipe.image_processor.preprocess(pipe.image_processor.resize(img, h, w), h, w)
    ours = preprocess_image(img, auto_resize=auto)
    assert ours.shape == theirs.shape == (1, 3, h, w) and h % 16 == 0 and w % 16 == 0
    assert torch.equal(ours, theirs)
    assert ours.min() >= -1 and ours.max() <= 1


def test_preprocess_image_inputs_and_errors():
    img = rand_image(64, 48)
    a = preprocess_image(img)
    b = preprocess_image(np.asarray(img).astype(np.float32) / 255)
    assert torch.allclose(a, b, atol=1e-6)
    assert preprocess_image(img.convert("RGBA")).shape == (1, 3, 64, 48)
    with pytest.raises(ValueError, match="too small"):
        preprocess_image(rand_image(10, 40))


def test_kontext_and_output_sizes():
    assert kontext_size(1000, 1000, True) == (1024, 1024)
    assert kontext_size(500, 1500, True) == (672, 1568)
    assert kontext_size(70, 100, False) == (64, 96)
    assert output_size(1024, 1024, 1024 ** 2) == (1024, 1024)
    assert output_size(64, 96, 64 * 96) == (64, 96)


def test_encode_image_equals_pipeline(components, pipe):
    x = preprocess_image(rand_image(64, 96, seed=1))
    ours = encode_image(components.vae, x)
    theirs = pipe._encode_vae_image(x, generator=None)
    assert ours.shape == (1, 16, 8, 12) and torch.equal(ours, theirs)


def test_pack_unpack_equal_pipeline_and_round_trip(pipe):
    x = torch.randn(2, 16, 6, 10)
    packed = pack_latents(x)
    assert torch.equal(packed, pipe._pack_latents(x, 2, 16, 6, 10))
    assert packed.shape == (2, 15, 64)
    assert torch.equal(packed[0, 1, :4], x[0, 0, 0:2, 2:4].reshape(-1))  # channel order c*4 + dy*2 + dx
    assert torch.equal(unpack_latents(packed, 6, 10), pipe._unpack_latents(packed, 48, 80, 8))
    assert torch.equal(unpack_latents(packed, 6, 10), x)


def test_latent_ids_equal_pipeline(pipe):
    assert torch.equal(latent_ids(6, 10), pipe._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32))
    ids = latent_ids(6, 10, marker=1.0)
    assert (ids[:, 0] == 1).all() and ids[7].tolist() == [1.0, 1.0, 2.0]


@pytest.mark.parametrize("batch", [1, 3])
def test_prepare_latents_equals_pipeline(components, pipe, batch):
    x = preprocess_image(rand_image(48, 80, seed=2))
    theirs = pipe.prepare_latents(x, batch, 16, 64, 96, torch.float32, "cpu", torch.Generator().manual_seed(5))
    ours = prepare_latents(encode_image(components.vae, x), batch, 64, 96, torch.float32, "cpu",
                           torch.Generator().manual_seed(5))
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and torch.equal(a, b)
    assert ours[0].shape == (batch, 24, 64) and ours[1].shape == (batch, 15, 64)
