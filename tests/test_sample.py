"""sample.py against FluxKontextPipeline.__call__ / load_lora_weights (tiny model, fp32, CPU: exact).

Both sides get the same generator seed; latents are compared with output_type="latent", pixels with "pt" / "pil".
"""

import dataclasses
import inspect
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from config import SampleConfig, load_config
from conftest import ROOT, tiny_config
from lora import load_lora, set_lora_scales, unload_lora
from sample import (NOT_SAMPLE_KWARGS, Args, Timings, flux_scheduler, format_timings, main, parse_args,
                    prepare_transformer, sample, sample_sizes)
from test_lora import two_lora_files

PROMPT = "make the sky red"
PROMPTS = ["make the sky red", "turn the cat into a dog"]
SMALL = dict(height=48, width=80, max_area=48 * 80, num_inference_steps=3, max_sequence_length=32)
TINY_CONFIG = str(ROOT / "configs" / "tiny.py")


def rand_image(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def theirs(pipe, image, prompt, auto_resize=False, seed=0, output_type="latent", **kw):
    """FluxKontextPipeline.__call__; with output_type="latent" it returns the packed latents [B, N, 64]."""
    return pipe(image=image, prompt=prompt, generator=gen(seed), _auto_resize=auto_resize, output_type=output_type,
                **kw).images


def ours(components, image, prompt, auto_resize=False, seed=0, output_type="latent", size_mode="pipeline", **kw):
    # size_mode: sample()'s default is SampleConfig's "native"; most tests compare the pipeline's own size rule
    return sample(components, image, prompt, generator=gen(seed), auto_resize=auto_resize, output_type=output_type,
                  size_mode=size_mode, progress=False, **kw)


# ---------------------------------------------------------------- schedule and sizes


def test_flux_scheduler_equals_checkpoint_scheduler(pipe):
    theirs_cfg = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    ours_cfg = {k: v for k, v in flux_scheduler().config.items() if not k.startswith("_")}
    assert ours_cfg == theirs_cfg


def test_sample_sizes():
    # pipeline: output 1024^2 by default whatever the input, rescaled to max_area; input snapped when auto_resize
    assert sample_sizes((48, 80), None, None, 1024 ** 2, "pipeline", True) == ((1024, 1024), (800, 1328))
    assert sample_sizes((53, 90), None, None, 1024 ** 2, "pipeline", False) == ((1024, 1024), (48, 80))
    assert sample_sizes((48, 80), 64, 128, 512 ** 2, "pipeline", False) == ((352, 720), (48, 80))
    assert sample_sizes(None, 48, 80, 48 * 80, "pipeline", True) == ((48, 80), None)
    # native: output = input, floored to 16, never snapped
    assert sample_sizes((53, 90), None, None, 1024 ** 2, "native", True) == ((48, 80), (48, 80))
    assert sample_sizes(None, 50, 90, 1024 ** 2, "native", True) == ((48, 80), None)
    with pytest.raises(ValueError, match="needs height and width"):
        sample_sizes(None, None, None, 1024 ** 2, "native", True)
    with pytest.raises(ValueError, match="size_mode='pipeline'"):
        sample_sizes((48, 80), 64, 64, 1024 ** 2, "native", True)
    with pytest.raises(ValueError, match="size_mode must be"):
        sample_sizes((48, 80), None, None, 1024 ** 2, "nativ", True)


# ---------------------------------------------------------------- parity with FluxKontextPipeline.__call__


def test_equals_pipeline_without_cfg(components, pipe):
    img = rand_image(48, 80)
    out = ours(components, img, PROMPT, **SMALL)
    assert out.latents.shape == (1, 15, 64) and out.images is None
    assert torch.equal(out.latents, theirs(pipe, img, PROMPT, **SMALL))
    pixels = ours(components, img, PROMPT, output_type="pt", **SMALL)
    assert pixels.images.shape == (1, 3, 48, 80)
    assert torch.equal(pixels.images, theirs(pipe, img, PROMPT, output_type="pt", **SMALL))
    t = pixels.timings
    assert len(t.steps) == 3 and t.decode > 0 and t.encode_image > 0 and t.encode_prompt > 0
    assert t.total >= t.encode_prompt + t.encode_image + sum(t.steps) + t.decode - 1e-6


def test_latent_channels_come_from_the_transformer(tmp_path):
    """A miniature whose VAE has 4 latent channels (transformer in_channels 16) runs in FluxKontextPipeline; sample()
    takes the noise's channels from transformer.config.in_channels // 4 as the pipeline does, not a constant 16."""
    from diffusers import FluxKontextPipeline

    from load import load_components
    from tiny import TinySpec, ensure_tiny

    path = ensure_tiny(TinySpec(latent_channels=4, copy_steps=0), root=tmp_path)  # the copy pre-training: not needed
    c = load_components(tiny_config(path))
    p = FluxKontextPipeline.from_pretrained(path, dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    img = rand_image(48, 80)
    out = ours(c, img, PROMPT, **SMALL)
    assert out.latents.shape == (1, 15, 16)
    assert torch.equal(out.latents, theirs(p, img, PROMPT, **SMALL))
    assert torch.equal(ours(c, img, PROMPT, output_type="pt", **SMALL).images,
                       theirs(p, img, PROMPT, output_type="pt", **SMALL))


def test_equals_pipeline_pil_and_np(components, pipe):
    img = rand_image(48, 80, seed=3)
    pil = ours(components, img, PROMPT, output_type="pil", **SMALL).images
    assert len(pil) == 1 and pil[0].size == (80, 48)
    assert np.array_equal(np.asarray(pil[0]), np.asarray(theirs(pipe, img, PROMPT, output_type="pil", **SMALL)[0]))
    arr = ours(components, img, PROMPT, output_type="np", **SMALL).images
    assert np.array_equal(arr, theirs(pipe, img, PROMPT, output_type="np", **SMALL))


def test_equals_pipeline_true_cfg(components, pipe):
    img = rand_image(48, 80)
    kw = dict(negative_prompt="make it night", true_cfg_scale=2.0, **SMALL)
    out = ours(components, img, PROMPT, **kw).latents
    assert torch.equal(out, theirs(pipe, img, PROMPT, **kw))
    assert not torch.allclose(out, ours(components, img, PROMPT, **SMALL).latents)  # the negative branch matters


def test_equals_pipeline_two_guidance_values(components, pipe):
    img = rand_image(48, 80)
    outs = []
    for g in (1.0, 5.0):
        outs.append(ours(components, img, PROMPT, guidance_scale=g, **SMALL).latents)
        assert torch.equal(outs[-1], theirs(pipe, img, PROMPT, guidance_scale=g, **SMALL))
    assert not torch.allclose(*outs)  # the guidance embedding reaches the transformer


def test_equals_pipeline_non_square_input_not_multiple_of_16(components, pipe):
    img = rand_image(53, 90, seed=4)  # encoded at 48x80; output 64x96, a different size and aspect
    kw = dict(SMALL, height=64, width=96, max_area=64 * 96)
    out = ours(components, img, PROMPT, output_type="pt", **kw).images
    assert out.shape == (1, 3, 64, 96)
    assert torch.equal(out, theirs(pipe, img, PROMPT, output_type="pt", **kw))


def test_native_equals_pipeline_at_input_size(components, pipe):
    img = rand_image(53, 90, seed=4)
    out = ours(components, img, PROMPT, size_mode="native", auto_resize=True, num_inference_steps=3,
               max_sequence_length=32)
    ref = theirs(pipe, img, PROMPT, auto_resize=False, height=48, width=80, max_area=48 * 80, num_inference_steps=3,
                 max_sequence_length=32)
    assert out.latents.shape == (1, 15, 64) and torch.equal(out.latents, ref)


def test_equals_pipeline_auto_resize(components, pipe):
    # the 48x80 input is snapped to 800x1328 (4150 control tokens): one step keeps it quick
    img = rand_image(48, 80)
    kw = dict(SMALL, num_inference_steps=1)
    out = ours(components, img, PROMPT, auto_resize=True, **kw).latents
    assert torch.equal(out, theirs(pipe, img, PROMPT, auto_resize=True, **kw))
    assert not torch.allclose(out, ours(components, img, PROMPT, auto_resize=False, **kw).latents)


def test_equals_pipeline_batch_of_prompts(components, pipe):
    img = rand_image(48, 80)
    kw = dict(num_images_per_prompt=2, true_cfg_scale=1.5, **SMALL)
    # ours repeats a single prompt_2 / negative prompt for every prompt; the pipeline needs the lists
    out = ours(components, img, PROMPTS, prompt_2="add a hat", negative_prompt="make it night", **kw).latents
    ref = theirs(pipe, img, PROMPTS, prompt_2=["add a hat"] * 2, negative_prompt=["make it night"] * 2, **kw)
    assert out.shape == (4, 15, 64) and torch.equal(out, ref)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[0], out[2])


def test_equals_pipeline_text_to_image(components, pipe):
    out = ours(components, None, PROMPT, output_type="pt", **SMALL)
    assert torch.equal(out.images, theirs(pipe, None, PROMPT, output_type="pt", **SMALL))
    assert out.timings.encode_image < 0.01  # nothing to encode


def test_equals_pipeline_from_embeds_and_latents(components, pipe):
    img = rand_image(48, 80)
    embeds, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", max_sequence_length=32)
    neg, neg_pooled, _ = pipe.encode_prompt("make it night", device="cpu", max_sequence_length=32)
    latents = torch.randn(1, 15, 64, generator=gen(7))
    kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
              negative_pooled_prompt_embeds=neg_pooled, true_cfg_scale=2.0, latents=latents, **SMALL)
    out = ours(components, img, None, **kw).latents
    assert torch.equal(out, theirs(pipe, img, None, **kw))
    with pytest.raises(ValueError, match="latents have shape"):
        ours(components, img, None, **dict(kw, latents=latents[:, :8]))
    # given embeddings are repeated num_images_per_prompt times (the pipeline fails there for a batch of prompts:
    # give it them repeated)
    embeds, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=32)
    kw = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, **SMALL)
    out = ours(components, img, None, num_images_per_prompt=2, **kw).latents
    ref = theirs(pipe, img, None, **dict(kw, prompt_embeds=embeds.repeat_interleave(2, dim=0),
                                         pooled_prompt_embeds=pooled.repeat_interleave(2, dim=0)))
    assert out.shape == (4, 15, 64) and torch.equal(out, ref)


def test_input_errors(components):
    img = rand_image(48, 80)
    with pytest.raises(ValueError, match="needs a negative prompt"):
        ours(components, img, PROMPT, true_cfg_scale=2.0, **SMALL)
    with pytest.raises(ValueError, match="exactly one of prompt and prompt_embeds"):
        ours(components, img, None, **SMALL)
    with pytest.raises(ValueError, match="output_type"):
        ours(components, img, PROMPT, output_type="jpeg", **SMALL)
    with pytest.raises(ValueError, match="negative_prompt has 1 entries"):
        ours(components, img, PROMPTS, negative_prompt=["x"], true_cfg_scale=2.0, **SMALL)
    with pytest.raises(ValueError, match="num_inference_steps must be at least 1"):
        ours(components, img, PROMPT, **dict(SMALL, num_inference_steps=0))
    with pytest.raises(ValueError, match="image 2 of 2 must be"):  # a list: several references (test_multiref.py)
        ours(components, [img, "x.png"], PROMPT, **SMALL)


def test_format_timings():
    table = format_timings(Timings(encode_prompt=0.5, encode_image=0.25, steps=[0.3, 0.1, 0.1], decode=0.2, total=1.5))
    lines = table.splitlines()
    assert lines[0].split() == ["stage", "seconds"]
    assert "denoise (3 steps)" in table and "0.5000" in table and "0.1667 s/step, first 0.3000" in table
    assert lines[-1].split() == ["total", "1.5000"]
    assert "denoise (0 steps)" in format_timings(Timings())


# ---------------------------------------------------------------- with LoRAs (lora.load_lora vs load_lora_weights)


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, tiny_path):
    return two_lora_files(tmp_path_factory.mktemp("lora"), tiny_path)  # written by diffusers' save_lora_weights


def test_lora_equals_pipeline_and_unload_restores(components, pipe, lora_files):
    img, t = rand_image(48, 80), components.transformer
    base = ours(components, img, PROMPT, **SMALL).latents
    try:
        load_lora(t, lora_files[0], "a")
        pipe.load_lora_weights(str(lora_files[0]), adapter_name="a")
        with_lora = ours(components, img, PROMPT, **SMALL).latents
        assert torch.equal(with_lora, theirs(pipe, img, PROMPT, **SMALL))
        assert not torch.allclose(with_lora, base)
    finally:
        pipe.unload_lora_weights()
        unload_lora(t)
    assert not hasattr(t, "peft_config") or not t.peft_config
    assert torch.equal(ours(components, img, PROMPT, **SMALL).latents, base)
    assert torch.equal(theirs(pipe, img, PROMPT, **SMALL), base)  # the pipeline's LoRA is gone too


def test_two_named_loras_with_scales_equal_pipeline(components, pipe, lora_files):
    img, t = rand_image(48, 80), components.transformer
    base = theirs(pipe, img, PROMPT, **SMALL)
    runs = {}
    try:
        load_lora(t, lora_files[0], "a", scale=0.7)
        load_lora(t, lora_files[1], "b", scale=1.5)  # stacks: "a" stays active at 0.7
        pipe.load_lora_weights(str(lora_files[0]), adapter_name="a")
        pipe.load_lora_weights(str(lora_files[1]), adapter_name="b")
        pipe.set_adapters(["a", "b"], [0.7, 1.5])
        runs["ab"] = ours(components, img, PROMPT, **SMALL).latents
        assert torch.equal(runs["ab"], theirs(pipe, img, PROMPT, **SMALL))

        set_lora_scales(t, {"b": 0.5})  # only "b" active
        pipe.set_adapters(["b"], [0.5])
        runs["b"] = ours(components, img, PROMPT, **SMALL).latents
        assert torch.equal(runs["b"], theirs(pipe, img, PROMPT, **SMALL))

        unload_lora(t, "b")  # "a" stays loaded and inactive (peft alone would switch it on)
        assert list(t.peft_config) == ["a"]
        assert torch.equal(ours(components, img, PROMPT, **SMALL).latents, base)

        set_lora_scales(t, {"a": 0.7})
        pipe.delete_adapters("b")
        pipe.set_adapters(["a"], [0.7])
        runs["a"] = ours(components, img, PROMPT, **SMALL).latents
        assert torch.equal(runs["a"], theirs(pipe, img, PROMPT, **SMALL))
        with pytest.raises(ValueError, match="no adapter named"):
            set_lora_scales(t, {"b": 1.0})
        with pytest.raises(ValueError, match="already loaded"):
            load_lora(t, lora_files[1], "a")
    finally:
        pipe.unload_lora_weights()
        unload_lora(t)
    assert not torch.allclose(runs["ab"], runs["a"]) and not torch.allclose(runs["ab"], runs["b"])


# ---------------------------------------------------------------- devices and dtypes


def test_text_encoders_in_bf16_beside_fp32_transformer(tiny_path, components, pipe):
    cfg = tiny_config(tiny_path)
    cfg.clip.dtype = cfg.t5.dtype = "bf16"
    from load import load_components

    mixed = load_components(cfg)
    assert mixed.t5.dtype == torch.bfloat16 and mixed.transformer.dtype == torch.float32
    img = rand_image(48, 80)
    out = ours(mixed, img, PROMPT, negative_prompt="make it night", true_cfg_scale=2.0, **SMALL).latents
    ref = theirs(pipe, img, PROMPT, negative_prompt="make it night", true_cfg_scale=2.0, **SMALL)
    assert out.dtype == torch.float32
    assert not torch.equal(out, ref)  # the bf16 embeddings really were used
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=0)  # measured: 2.4e-3 of |x| <= 4.2


@pytest.mark.gpu
def test_text_encoders_on_cpu_rest_on_cuda(tiny_path, pipe):
    from load import load_components

    cfg = tiny_config(tiny_path)
    cfg.vae.device = cfg.transformer.device = "cuda:0"
    split = load_components(cfg)
    img = rand_image(48, 80)
    kw = dict(negative_prompt="make it night", true_cfg_scale=2.0, **SMALL)
    out = ours(split, img, PROMPT, output_type="pt", **kw)
    assert out.latents.device == torch.device("cuda:0") and out.images.shape == (1, 3, 48, 80)
    assert len(out.timings.steps) == 3
    # CPU generator: the same noise on both sides; cuDNN convolutions may use TF32, hence the tolerance
    ref = theirs(pipe, img, PROMPT, output_type="pt", **kw)
    torch.testing.assert_close(out.images.cpu(), ref, atol=2e-2, rtol=0)
    torch.testing.assert_close(out.latents.cpu(), theirs(pipe, img, PROMPT, **kw), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_equals_pipeline_full_size_bf16():
    """sample() vs FluxKontextPipeline.__call__ on full-size random FLUX.1 Kontext components
    (fixtures.full_size_components: CLIP-L, T5-XXL, the FLUX VAE, the 12B transformer) in bf16 at 1024^2, 4 steps, without
    and with true CFG. Both sides share the modules and the CPU generator's seed. First eager with flash attention
    (deterministic kernels: the math must agree, measured 0 on the H100), then as `python sample.py` does
    (SampleConfig defaults: attention "auto", eager), then compiled: with compiled cuDNN attention the H200 gave
    3.4e-3 one time and 0 another, so the cuDNN cases are held to bf16 rounding over 4 steps (1e-2). Prints both
    sides' seconds per step."""
    from diffusers import FluxKontextPipeline

    from load import Components
    from fixtures import full_size_components

    device = torch.device("cuda:0")
    parts = full_size_components(device, torch.bfloat16)
    c = Components(clip=parts["text_encoder"], clip_tokenizer=parts["tokenizer"], t5=parts["text_encoder_2"],
                   t5_tokenizer=parts["tokenizer_2"], vae=parts["vae"], transformer=parts["transformer"])
    pipe = FluxKontextPipeline(scheduler=flux_scheduler(), **parts)
    pipe.set_progress_bar_config(disable=True)
    img = rand_image(1024, 1024)  # the preferred Kontext resolution for aspect 1: not resized by either side

    marks = []

    def on_step(pipe_, i, t, kwargs):  # the pipeline's step ends, synchronised
        torch.cuda.synchronize(device)
        marks.append(time.perf_counter())
        return kwargs

    configs = (SampleConfig(compile=False, attention_backend="flash"), SampleConfig(), SampleConfig(compile=True))
    runs = [(sc, case, extra) for sc in configs
            for case, extra in [("no CFG", {}), ("true CFG 2.0", dict(negative_prompt="blurry", true_cfg_scale=2.0))]]
    attention = None
    for sc, case, extra in runs:
        attention = prepare_transformer(c.transformer, sc, device) if case == "no CFG" else attention
        kw = dict(height=1024, width=1024, max_area=1024 ** 2, num_inference_steps=4, guidance_scale=3.5,
                  auto_resize=True, seed=1, **extra)
        ours(c, img, PROMPT, **kw)  # warm-up: compiles the blocks (both sides run the same compiled modules)
        marks.clear()
        ref = theirs(pipe, img, PROMPT, callback_on_step_end=on_step, **kw)
        out = ours(c, img, PROMPT, **kw)
        a, b = out.latents.float(), ref.float()
        rel = float((a - b).norm() / b.norm())
        theirs_steps = [m1 - m0 for m0, m1 in zip(marks, marks[1:])]  # steps 2-4 (step 1 holds the encoders)
        print(f"\n{case} (attention {attention}, compile {sc.compile}): rel. err. of the final latents {rel:.2e}; s/step, steps 2-4: "
              f"pipeline {np.mean(theirs_steps):.4f}, ours {np.mean(out.timings.steps[1:]):.4f}\n"
              + format_timings(out.timings))
        assert a.shape == (1, 4096, 64) and torch.isfinite(a).all() and torch.isfinite(b).all()
        assert rel <= (1e-3 if attention == "flash" else 1e-2), (case, attention, sc.compile, rel)


# ---------------------------------------------------------------- CLI


def cli(*flags):
    return main(parse_args(["--config", TINY_CONFIG, *map(str, flags)]))


def test_one_set_of_defaults():
    # the CLI's --sample.* defaults are the --config file's config.sample (SampleConfig() without one) ...
    assert parse_args(["--prompt", PROMPT]).sample == SampleConfig()
    tiny = load_config(TINY_CONFIG).sample
    assert tiny != SampleConfig() and parse_args(["--config", TINY_CONFIG]).sample == tiny
    got = parse_args(["--config", TINY_CONFIG, "--sample.num-inference-steps", "3", "--sample.size-mode", "pipeline"])
    assert got.sample == dataclasses.replace(tiny, num_inference_steps=3, size_mode="pipeline")
    with pytest.raises(SystemExit):  # the old flag name is gone: num_inference_steps everywhere
        parse_args(["--config", TINY_CONFIG, "--steps", "3"])
    # ... and sample() takes every other SampleConfig field as a keyword of the same name and default, which is how
    # main() passes them on (seed makes the generator; compile and attention_backend go to prepare_transformer,
    # compile_cache to compile_cache.py, pixel_budget resizes main's input images)
    params = inspect.signature(sample).parameters
    fields = {f.name for f in dataclasses.fields(SampleConfig)}
    assert fields - set(params) == set(NOT_SAMPLE_KWARGS) == {"seed", "compile", "compile_cache", "attention_backend",
                                                               "pixel_budget"}
    for name in fields - set(NOT_SAMPLE_KWARGS):
        assert params[name].default == getattr(SampleConfig(), name), name
    # Args holds only what SampleConfig does not
    assert not {f.name for f in dataclasses.fields(Args)} & {f.name for f in dataclasses.fields(SampleConfig)}


def test_cli_equals_pipeline(tmp_path, capsys, pipe):
    src, out = tmp_path / "in.png", tmp_path / "sub" / "edited.png"
    img = rand_image(50, 90, seed=5)  # native size mode (configs/tiny.py): 48x80 out
    img.save(src)
    cli("--image", src, "--prompt", PROMPT, "--sample.num-inference-steps", 2, "--sample.seed", 3, "--out", out)
    printed = capsys.readouterr().out
    assert "denoise (2 steps)" in printed and "encode_prompt" in printed and "total" in printed
    got = Image.open(out)
    assert got.size == (80, 48)
    # configs/tiny.py: guidance 1.0, max_sequence_length 32
    ref = theirs(pipe, img, PROMPT, seed=3, output_type="pil", height=48, width=80, max_area=48 * 80,
                 num_inference_steps=2, guidance_scale=1.0, max_sequence_length=32)[0]
    assert np.array_equal(np.asarray(got), np.asarray(ref))


def test_cli_lora_and_true_cfg_equal_pipeline(tmp_path, capsys, pipe, lora_files):
    src, out = tmp_path / "in.png", tmp_path / "edited.png"
    img = rand_image(48, 80, seed=6)
    img.save(src)
    cli("--image", src, "--prompt", PROMPT, "--sample.num-inference-steps", 2, "--out", out, "--lora", lora_files[0],
        lora_files[1], "--lora-scale", 0.5, 1.2, "--sample.negative-prompt", "make it night",
        "--sample.true-cfg-scale", 2.0)
    try:
        pipe.load_lora_weights(str(lora_files[0]), adapter_name="a")
        pipe.load_lora_weights(str(lora_files[1]), adapter_name="b")
        pipe.set_adapters(["a", "b"], [0.5, 1.2])
        ref = theirs(pipe, img, PROMPT, output_type="pil", num_inference_steps=2,
                     guidance_scale=1.0, max_sequence_length=32, negative_prompt="make it night",
                     true_cfg_scale=2.0, height=48, width=80, max_area=48 * 80)[0]
    finally:
        pipe.unload_lora_weights()
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(ref))


def test_cli_text_to_image_equals_pipeline(tmp_path, capsys, pipe):
    out = tmp_path / "t2i.png"
    cli("--prompt", PROMPT, "--sample.num-inference-steps", 2, "--height", 48, "--width", 80, "--out", out)
    ref = theirs(pipe, None, PROMPT, output_type="pil", height=48, width=80, max_area=48 * 80,
                 num_inference_steps=2, guidance_scale=1.0, max_sequence_length=32)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(ref))


def test_cli_errors_name_the_file(tmp_path, lora_files):
    # images.open_image's messages: the path, then why (OSError's "No such file or directory" for a missing one)
    with pytest.raises(ValueError, match=r"nope\.png.*(does not exist|No such file)"):
        cli("--image", tmp_path / "nope.png", "--prompt", PROMPT)
    src = tmp_path / "in.png"
    rand_image(48, 80).save(src)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(src.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"truncated\.png.*unreadable or corrupt"):
        cli("--image", truncated, "--prompt", PROMPT)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"text\.png.*unreadable or corrupt"):
        cli("--image", tmp_path / "text.png", "--prompt", PROMPT)
    with pytest.raises(ValueError, match=r"LoRA file .*gone\.safetensors.* does not exist"):
        cli("--image", src, "--prompt", PROMPT, "--lora", tmp_path / "gone.safetensors")
    from safetensors.torch import save_file

    save_file({"transformer.nowhere.lora_A.weight": torch.zeros(2, 3), "transformer.nowhere.lora_B.weight":
               torch.zeros(3, 2)}, tmp_path / "mismatch.safetensors")
    with pytest.raises(ValueError, match=r"mismatch\.safetensors.*match no Linear.*transformer\.nowhere"):
        cli("--image", src, "--prompt", PROMPT, "--lora", tmp_path / "mismatch.safetensors")
    with pytest.raises(ValueError, match="unknown image extension"):
        cli("--image", src, "--prompt", PROMPT, "--out", tmp_path / "out.xyz")
    with pytest.raises(ValueError, match="needs a negative prompt"):
        cli("--image", src, "--prompt", PROMPT, "--sample.true-cfg-scale", 2.0)
    with pytest.raises(ValueError, match="size_mode='pipeline'"):
        cli("--image", src, "--prompt", PROMPT, "--height", 64)
    with pytest.raises(ValueError, match="--lora-scale"):
        cli("--image", src, "--prompt", PROMPT, "--lora", lora_files[0], lora_files[1], "--lora-scale", 0.5)


def test_cli_script_error_is_one_clean_line(tmp_path):
    r = subprocess.run([sys.executable, "sample.py", "--config", TINY_CONFIG, "--image", str(tmp_path / "nope.png"),
                        "--prompt", PROMPT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2  # a user error, as train.py
    assert r.stderr.startswith("sample.py: error: ") and "nope.png" in r.stderr and "Traceback" not in r.stderr
