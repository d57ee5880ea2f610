"""stepcache.py and sample(cache=...) (tiny model, fp32, CPU: exact).

diffusers' hooks: sample(cache=spec) against FluxKontextPipeline.__call__ with the same diffusers config enabled on
the same transformer. FluxKontextPipeline (diffusers 0.42) sets no cache_context, which FirstBlockCache and
TaylorSeer require, so the reference runs each of its transformer calls in FluxPipeline's contexts ("cond", and
"uncond" for true CFG's second call); FluxPipeline itself (text-to-image) is compared without that help.
TeaCache: its rule on hand-made numbers, and what a sample skips.
"""

import itertools
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline, FluxPipeline
from diffusers.hooks import FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

from config import Config, DataConfig, SampleConfig, parse_cache, validate
from sample import flux_scheduler, main, parse_args, sample
from stepcache import FLUX_TEA_COEFFICIENTS, cache_config, rescaled_l1, tea_decide
from test_sample import PROMPT, rand_image

STEPS = 5  # TaylorSeer computes the first 3 steps whatever its interval
SMALL = dict(height=48, width=80, max_area=48 * 80, num_inference_steps=STEPS, max_sequence_length=32)
CFG = dict(negative_prompt="make it night", true_cfg_scale=2.0)


@pytest.fixture(scope="module")
def kontext(components):
    """FluxKontextPipeline over the very modules sample() gets (one transformer for both sides)."""
    c = components
    p = FluxKontextPipeline(scheduler=flux_scheduler(), vae=c.vae, text_encoder=c.clip, tokenizer=c.clip_tokenizer,
                            text_encoder_2=c.t5, tokenizer_2=c.t5_tokenizer, transformer=c.transformer)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def uncached(components):
    """sample() without a cache, by (image seed, true CFG), each computed once."""
    done = {}

    def get(seed: int, true_cfg: bool):
        if (seed, true_cfg) not in done:
            done[seed, true_cfg] = ours(components, rand_image(48, 80, seed), **(CFG if true_cfg else {}))
        return done[seed, true_cfg]

    return get


@pytest.fixture
def block_runs(components):
    """How many times the last block's attention ran: every hook here skips it on a reused step."""
    n = [0]
    h = components.transformer.single_transformer_blocks[-1].attn.to_q.register_forward_hook(
        lambda *_: n.__setitem__(0, n[0] + 1))
    yield n
    h.remove()


def ours(components, image, cache="", **kw):
    return sample(components, image, PROMPT, generator=torch.Generator().manual_seed(0), auto_resize=False,
                  output_type="latent", size_mode="pipeline", progress=False, cache=cache, **SMALL, **kw).latents


def diffusers_config(spec: str, pipe):
    """The diffusers config for `spec`, written here from diffusers' classes (not through stepcache.cache_config,
    whose mapping is under test)."""
    method, value = spec.split(":")
    if method == "first_block":
        return FirstBlockCacheConfig(threshold=float(value))
    if method == "mag":
        return MagCacheConfig(threshold=float(value), num_inference_steps=STEPS, mag_ratios=FLUX_MAG_RATIOS)
    if method == "taylorseer":
        return TaylorSeerCacheConfig(cache_interval=int(value), taylor_factors_dtype=torch.float32)
    return FasterCacheConfig(spatial_attention_block_skip_range=int(value), is_guidance_distilled=True,
                             current_timestep_callback=lambda: pipe.current_timestep,
                             attention_weight_callback=lambda _: 0.5)


@contextmanager
def contexts_per_call(transformer, names):
    """Each transformer call inside transformer.cache_context(names[k % len(names)]), k counting calls: what
    FluxPipeline.__call__'s loop does ("cond", then "uncond" for true CFG), for a pipeline that does not."""
    calls, entered = itertools.count(), []

    def pre(module, args, kwargs):
        entered.append(module.cache_context(names[next(calls) % len(names)]))
        entered[-1].__enter__()

    def post(module, args, kwargs, out):
        entered.pop().__exit__(None, None, None)

    hooks = [transformer.register_forward_pre_hook(pre, with_kwargs=True),
             transformer.register_forward_hook(post, with_kwargs=True)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def theirs(pipe, spec, image, contexts=None, **kw):
    """FluxKontextPipeline.__call__ (or FluxPipeline's, image None) with spec's diffusers hook on its transformer;
    contexts: FluxPipeline's by default (true CFG's second call in "uncond")."""
    contexts = contexts or (("cond", "uncond") if kw.get("true_cfg_scale", 1.0) > 1 else ("cond",))
    pipe.transformer.enable_cache(diffusers_config(spec, pipe))
    try:
        with contexts_per_call(pipe.transformer, contexts):
            return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent",
                        **pipe_kw(pipe, image), **kw).images
    finally:
        pipe.transformer.disable_cache()


def pipe_kw(pipe, image) -> dict:
    """SMALL for this pipeline: FluxPipeline has no image, max_area or _auto_resize."""
    if isinstance(pipe, FluxKontextPipeline):
        return dict(SMALL, image=image, _auto_resize=False)
    return {k: v for k, v in SMALL.items() if k != "max_area"}


def hooks_left(transformer) -> list:
    return [(name, list(m._diffusers_hook.hooks)) for name, m in transformer.named_modules()
            if hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks]


# ---------------------------------------------------------------- diffusers' hooks, against the pipeline

DIFFUSERS_SPECS = ["first_block:0.3", "mag:0.06", "taylorseer:2", "faster:2"]


@pytest.mark.parametrize("true_cfg", [False, True], ids=["no-cfg", "true-cfg"])
@pytest.mark.parametrize("spec", DIFFUSERS_SPECS)
def test_diffusers_hooks_equal_pipeline(components, kontext, uncached, block_runs, spec, true_cfg):
    img = rand_image(48, 80)
    kw = CFG if true_cfg else {}
    calls = 2 * STEPS if true_cfg else STEPS
    ref = uncached(0, true_cfg)
    if spec.startswith("faster") and true_cfg:  # one FasterCache state would serve both CFG calls
        with pytest.raises(ValueError, match="FasterCache shares its per-module state between true CFG"):
            ours(components, img, cache=spec, **kw)
        assert hooks_left(components.transformer) == []
        return
    block_runs[0] = 0
    out = ours(components, img, cache=spec, **kw)
    assert 0 < block_runs[0] < calls  # steps were reused ...
    assert not torch.equal(out, ref)  # ... and that shows
    assert torch.equal(out, theirs(kontext, spec, img, **kw))
    # the hooks are gone: the next uncached call is the uncached one, and no hook is left on any module
    assert hooks_left(components.transformer) == [] and not components.transformer.is_cache_enabled
    block_runs[0] = 0
    assert torch.equal(ours(components, img, **kw), ref) and block_runs[0] == calls


@pytest.mark.parametrize("spec", ["first_block:0.3", "taylorseer:2"])  # one shared state / one per module
def test_true_cfg_caches_per_branch_as_flux_pipeline(components, spec):
    """FluxPipeline (text-to-image) runs its calls in cache_context("cond") / ("uncond") itself: sample() does the
    same. One shared cache for both branches gives another result."""
    c = components
    flux = FluxPipeline(scheduler=flux_scheduler(), vae=c.vae, text_encoder=c.clip, tokenizer=c.clip_tokenizer,
                        text_encoder_2=c.t5, tokenizer_2=c.t5_tokenizer, transformer=c.transformer)
    flux.set_progress_bar_config(disable=True)
    out = ours(components, None, cache=spec, **CFG)
    c.transformer.enable_cache(diffusers_config(spec, flux))
    try:
        ref = flux(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent",
                   **pipe_kw(flux, None), **CFG).images
    finally:
        c.transformer.disable_cache()
    assert torch.equal(out, ref)
    kontext = FluxKontextPipeline(**flux.components)
    kontext.set_progress_bar_config(disable=True)
    assert not torch.equal(out, theirs(kontext, spec, None, contexts=("cond",), **CFG))


@pytest.mark.parametrize("spec", ["first_block:0", "taylorseer:1", "faster:1", "tea:0"])
def test_zero_threshold_is_uncached(components, uncached, block_runs, spec):
    for true_cfg in [False] if spec.startswith("faster") else [False, True]:
        ref = uncached(1, true_cfg)
        block_runs[0] = 0
        out = ours(components, rand_image(48, 80, seed=1), cache=spec, **(CFG if true_cfg else {}))
        assert torch.equal(out, ref) and block_runs[0] == STEPS * (2 if true_cfg else 1)


def test_empty_cache_is_todays_sample(components, kontext):
    img = rand_image(48, 80, seed=2)
    ref = kontext(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output_type="latent",
                  **pipe_kw(kontext, img)).images
    assert torch.equal(ours(components, img, cache=""), ref)


def test_hooks_removed_after_an_error(components, uncached):
    img = rand_image(48, 80)

    def boom(*_):
        raise RuntimeError("boom")

    h = components.transformer.single_transformer_blocks[-1].attn.register_forward_pre_hook(boom)
    try:
        for spec in ("first_block:0.3", "tea:0.25"):
            with pytest.raises(RuntimeError, match="boom"):
                ours(components, img, cache=spec)
            assert hooks_left(components.transformer) == [] and not components.transformer.is_cache_enabled
    finally:
        h.remove()
    assert torch.equal(ours(components, img), uncached(0, False))


def test_a_cache_the_caller_enabled(components, kontext):
    """cache="" keeps a cache the caller enabled on the transformer (run in cache contexts, as FluxPipeline does,
    and reset after the call); asking for another one on top is refused."""
    img = rand_image(48, 80)
    t = components.transformer
    t.enable_cache(FirstBlockCacheConfig(threshold=0.3))
    try:
        first = ours(components, img)
        assert torch.equal(ours(components, img), first)  # state reset between calls
        with pytest.raises(ValueError, match="already has a cache enabled"):
            ours(components, img, cache="tea:0.25")
        assert t.is_cache_enabled
    finally:
        t.disable_cache()
    assert torch.equal(first, theirs(kontext, "first_block:0.3", img))


# ---------------------------------------------------------------- TeaCache


def test_rescaled_l1_is_the_teacache_polynomial():
    prev = torch.tensor([[1.0, -2.0], [4.0, 1.0]])
    cur = prev + torch.tensor([[0.1, 0.1], [-0.2, 0.0]])
    rel = 0.4 / 8.0  # mean |cur - prev| / mean |prev|
    want = sum(c * rel ** (4 - i) for i, c in enumerate(FLUX_TEA_COEFFICIENTS))
    assert rescaled_l1(cur, prev) == pytest.approx(want, rel=1e-6)
    assert rescaled_l1(cur, prev) == pytest.approx(float(np.poly1d(FLUX_TEA_COEFFICIENTS)(rel)), rel=1e-6)
    assert rescaled_l1(prev, prev) == pytest.approx(FLUX_TEA_COEFFICIENTS[-1])  # no change still counts 0.26
    assert rescaled_l1(cur, prev, coefficients=(1.0, 0.0)) == pytest.approx(rel)


def test_tea_decide_accumulates_against_the_threshold():
    # 7 steps, distance 0.1 each, threshold 0.25: skip while the running sum (reset on compute) stays below 0.25
    acc, got = 0.0, []
    for step in range(7):
        compute, acc = tea_decide(step, 7, acc, 0.1, 0.25)
        got.append((compute, round(acc, 6)))
    assert got == [(True, 0.0), (False, 0.1), (False, 0.2), (True, 0.0), (False, 0.1), (False, 0.2), (True, 0.0)]
    assert tea_decide(3, 7, 0.2, 0.05, 0.25) == (True, 0.0)  # 0.25 is not below 0.25
    assert tea_decide(3, 7, 0.0, 1e9, 0.0)[0] and tea_decide(6, 7, 0.0, 0.0, 1e9) == (True, 0.0)  # the last step


def test_tea_skips_steps(components, uncached, block_runs):
    img = rand_image(48, 80)
    for true_cfg in (False, True):
        kw, calls, ref = CFG if true_cfg else {}, STEPS * (2 if true_cfg else 1), uncached(0, true_cfg)
        block_runs[0] = 0
        some = ours(components, img, cache="tea:0.25", **kw)
        assert 0 < block_runs[0] < calls and not torch.equal(some, ref)
        block_runs[0] = 0
        most = ours(components, img, cache="tea:1000", **kw)
        assert block_runs[0] == calls // STEPS * 2  # only the first and the last step compute, in each branch
        err = lambda x: float((x - ref).norm() / ref.norm())  # noqa: E731
        assert 0 < err(some) < err(most)
        assert hooks_left(components.transformer) == []


# ---------------------------------------------------------------- specs, config and CLI


def test_cache_config_maps_each_method(kontext):
    now = lambda: 500  # noqa: E731
    assert cache_config("", 28, torch.float32, now) is None
    assert cache_config("first_block:0.08", 28, torch.float32, now).threshold == 0.08
    mag = cache_config("mag:0.1", 10, torch.float32, now)
    assert (mag.threshold, mag.num_inference_steps, len(mag.mag_ratios)) == (0.1, 10, 10)
    ts = cache_config("taylorseer:4", 28, torch.bfloat16, now)
    assert (ts.cache_interval, ts.taylor_factors_dtype) == (4, torch.bfloat16)
    fc = cache_config("faster:3", 28, torch.float32, now)
    assert (fc.spatial_attention_block_skip_range, fc.is_guidance_distilled, fc.current_timestep_callback()) == \
        (3, True, 500)
    tea = cache_config("tea:0.4", 12, torch.float32, now)
    assert (tea.threshold, tea.num_inference_steps) == (0.4, 12)


@pytest.mark.parametrize("spec, message", [
    ("nope:1", "unknown method 'nope'"), ("first_block", "takes a threshold >= 0 after the colon"),
    ("tea:abc", "got 'abc'"), ("mag:-0.1", "takes a threshold >= 0, got -0.1"), ("tea:nan", "got nan"),
    ("taylorseer:0", "an integer >= 1, got 0"), ("faster:2.5", "an integer >= 1 after the colon")])
def test_bad_specs(components, spec, message):
    with pytest.raises(ValueError, match=message):
        parse_cache(spec)
    with pytest.raises(ValueError, match=message):
        ours(components, rand_image(48, 80), cache=spec)
    problems = str(pytest.raises(ValueError, validate, Config(data=DataConfig(path="d"),
                                                              sample=SampleConfig(cache=spec))).value)
    assert problems.startswith("sample.cache: expected a string, '' (off) or METHOD:VALUE (first_block:0.08")
    assert parse_cache("tea:0.25") == ("tea", 0.25) and parse_cache("taylorseer:5") == ("taylorseer", 5)


def test_cli_flag(tmp_path):
    assert parse_args(["--prompt", PROMPT, "--sample.cache", "first_block:0.08"]).sample.cache == "first_block:0.08"
    src = tmp_path / "in.png"
    rand_image(48, 80).save(src)
    # checked before the model loads (a bad path in model would fail later, not first)
    for flags, message in ((["--sample.cache", "tea"], "tea takes a threshold"),
                           (["--sample.cache", "faster:2", "--sample.negative-prompt", "x",
                             "--sample.true-cfg-scale", "2"], "FasterCache shares")):
        with pytest.raises(ValueError, match=message):
            main(parse_args(["--image", str(src), "--prompt", PROMPT, *flags]))
