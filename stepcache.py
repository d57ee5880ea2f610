"""Faster sampling by reusing work across denoising steps: SampleConfig.cache ("METHOD:VALUE", config.parse_cache).

    first_block:T  diffusers' FirstBlockCache (ParaAttention's FBCache): run the first block; when its residual changed
                   by less than T (relative mean abs) since the last full step, skip the other blocks and add their
                   cached residual. FLUX.1-dev: 0.08 (ParaAttention's default), ~1.5-2x.
    mag:T          diffusers' MagCache with its FLUX.1-dev magnitude ratios (FLUX_MAG_RATIOS, interpolated to the step
                   count): skip all blocks while the accumulated ratio error stays <= T, at most 3 steps in a row,
                   never in the first 20% of steps. A step whose ratio is exactly 1 adds no error, so even mag:0
                   skips some. FLUX: 0.06 (diffusers' default), ~2-2.8x.
    taylorseer:N   diffusers' TaylorSeer: every attention module computes on the first 3 steps and then every N-th,
                   and predicts its output on the others from a first-order Taylor expansion (factors in the model's
                   dtype). N=1 computes every step.
    faster:N       diffusers' FasterCache, attention part only (FLUX is guidance-distilled: is_guidance_distilled):
                   below timestep 681 each attention module computes every N-th call and extrapolates
                   (t + 0.5 (t - t_2)) on the others. N=1 computes every step. Not with true CFG (below).
    tea:T          TeaCache for FLUX (ali-vilab/TeaCache, TeaCache4FLUX), written here on diffusers' hook machinery:
                   the relative L1 change of the first double block's modulated input (norm1(hidden, temb)), mapped
                   through FLUX's polynomial (FLUX_TEA_COEFFICIENTS), accumulates; while the sum stays < T all blocks
                   are skipped and the last computed residual (blocks' output - input) is added. The first and last
                   steps always compute. 0.25 / 0.4 / 0.6 / 0.8: ~1.5x / 1.8x / 2.0x / 2.25x on FLUX.1-dev (TeaCache's
                   table). The polynomial is >= 0.18, so T below that never skips.

`step_cache(...)` enables one for a sample() call and removes it afterwards, on errors too; `cache_context(...)` wraps
each transformer call as FluxPipeline.__call__ does (`cache_context("cond")`, true CFG's negative call "uncond"), so
each branch keeps its own state. (FluxKontextPipeline in diffusers 0.42 sets no cache context: FirstBlockCache and
TaylorSeer raise there, and its two CFG calls would share one cache.)
"""

import functools
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from config import parse_cache

# TeaCache4FLUX's rescaling polynomial (np.poly1d order, highest power first): relative L1 change of the modulated
# input -> estimated relative change of the model output, fitted on FLUX.1-dev.
FLUX_TEA_COEFFICIENTS = (4.98651651e+02, -2.83781631e+02, 5.58554382e+01, -3.82021401e+00, 2.64230861e-01)
_TEA_HEAD_HOOK = "tea_cache_head"
_TEA_BLOCK_HOOK = "tea_cache_block"


# ---------------------------------------------------------------- TeaCache: the rule, then the hooks


def rescaled_l1(modulated: torch.Tensor, previous: torch.Tensor,
                coefficients: tuple[float, ...] = FLUX_TEA_COEFFICIENTS) -> float:
    """TeaCache's distance between two steps: poly(mean|modulated - previous| / mean|previous|)."""
    rel = ((modulated - previous).abs().mean() / previous.abs().mean()).item()
    return float(np.polyval(coefficients, rel))


def tea_decide(step: int, num_steps: int, accumulated: float, distance: float,
               threshold: float) -> tuple[bool, float]:
    """(compute this step?, the new accumulated distance). Step 0 and the last step always compute; otherwise the
    distance accumulates and the step is skipped while the sum is below the threshold; a computed step resets it."""
    if step == 0 or step == num_steps - 1:
        return True, 0.0
    accumulated += distance
    return (False, accumulated) if accumulated < threshold else (True, 0.0)


@dataclass
class TeaCacheConfig:
    threshold: float  # rel_l1_thresh
    num_inference_steps: int  # the first and last of these always compute
    coefficients: tuple[float, ...] = FLUX_TEA_COEFFICIENTS


@functools.cache
def _hooks():
    """diffusers' hook machinery and our two hooks on it, built on first use (every diffusers import here is lazy:
    importing diffusers takes seconds)."""
    from diffusers.hooks import HookRegistry, ModelHook
    from diffusers.hooks._helpers import TransformerBlockRegistry
    from diffusers.hooks.hooks import BaseState, StateManager

    class TeaCacheState(BaseState):
        def __init__(self):
            self.reset()

        def reset(self):
            self.step, self.accumulated, self.should_compute = 0, 0.0, True
            self.previous_modulated = self.head_input = self.residual = None

    class _BlockHook(ModelHook):
        def __init__(self, state_manager):
            super().__init__()
            self.state_manager = state_manager

        def initialize_hook(self, module):
            self._metadata = TransformerBlockRegistry.get(type(module))  # argument names, output order
            return module

        def _passed(self, args, kwargs, hidden):
            """The block's output with hidden_states replaced and encoder_hidden_states passed through."""
            m = self._metadata
            out = [None, None]
            out[m.return_hidden_states_index] = hidden
            out[m.return_encoder_hidden_states_index] = m._get_parameter_from_args_kwargs("encoder_hidden_states",
                                                                                          args, kwargs)
            return tuple(out)

    class TeaHeadHook(_BlockHook):
        """On the first double block: decides, per step and per cache context, whether the blocks run."""

        _is_stateful = True

        def __init__(self, state_manager, config: TeaCacheConfig):
            super().__init__(state_manager)
            self.config = config

        def new_forward(self, module, *args, **kwargs):
            get = self._metadata._get_parameter_from_args_kwargs
            hidden = get("hidden_states", args, kwargs)
            s, c = self.state_manager.get_state(), self.config
            modulated = module.norm1(hidden, emb=get("temb", args, kwargs))[0]  # TeaCache4FLUX's modulated_inp
            distance = 0.0 if s.previous_modulated is None else rescaled_l1(modulated, s.previous_modulated,
                                                                            c.coefficients)
            s.should_compute, s.accumulated = tea_decide(s.step, c.num_inference_steps, s.accumulated, distance,
                                                         c.threshold)
            s.should_compute |= s.residual is None
            s.previous_modulated = modulated
            s.step = (s.step + 1) % c.num_inference_steps
            if s.should_compute:
                s.head_input = hidden
                return self.fn_ref.original_forward(*args, **kwargs)
            return self._passed(args, kwargs, hidden + s.residual)

        def reset_state(self, module):
            self.state_manager.reset()
            return module

    class TeaBlockHook(_BlockHook):
        """On every other block: runs it on computed steps (the last one records the residual), else passes through."""

        def __init__(self, state_manager, is_tail: bool):
            super().__init__(state_manager)
            self.is_tail = is_tail

        def new_forward(self, module, *args, **kwargs):
            s = self.state_manager.get_state()
            if not s.should_compute:
                return self._passed(args, kwargs, self._metadata._get_parameter_from_args_kwargs("hidden_states",
                                                                                                 args, kwargs))
            out = self.fn_ref.original_forward(*args, **kwargs)
            if self.is_tail:
                s.residual = out[self._metadata.return_hidden_states_index] - s.head_input
            return out

    return HookRegistry, StateManager, TeaCacheState, TeaHeadHook, TeaBlockHook


def apply_tea_cache(transformer, config: TeaCacheConfig) -> None:
    """Register TeaCache's hooks on a FluxTransformer2DModel's blocks (as diffusers' apply_first_block_cache does)."""
    HookRegistry, StateManager, TeaCacheState, TeaHeadHook, TeaBlockHook = _hooks()
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    if len(transformer.transformer_blocks) == 0 or len(blocks) < 2:
        raise ValueError("tea: needs a FLUX transformer with at least one double block and two blocks in all")
    state_manager = StateManager(TeaCacheState)
    HookRegistry.check_if_exists_or_initialize(blocks[0]).register_hook(TeaHeadHook(state_manager, config),
                                                                       _TEA_HEAD_HOOK)
    for i, block in enumerate(blocks[1:], 1):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(
            TeaBlockHook(state_manager, is_tail=i == len(blocks) - 1), _TEA_BLOCK_HOOK)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()


def remove_tea_cache(transformer) -> None:
    registry = _hooks()[0].check_if_exists_or_initialize(transformer)
    registry.remove_hook(_TEA_HEAD_HOOK, recurse=True)
    registry.remove_hook(_TEA_BLOCK_HOOK, recurse=True)
    registry.invalidate_child_registries_cache()


def has_tea_cache(transformer) -> bool:
    hook = getattr(transformer.transformer_blocks[0], "_diffusers_hook", None) if len(
        transformer.transformer_blocks) else None
    return hook is not None and hook.get_hook(_TEA_HEAD_HOOK) is not None


# ---------------------------------------------------------------- spec -> config, enable for one call


def check_cache(spec: str, true_cfg: bool) -> tuple[str, float | int] | None:
    """parse_cache, plus what only the call can tell: FasterCache keeps one state per attention module for every
    call, so true CFG's two calls per step would extrapolate one branch from the other."""
    parsed = parse_cache(spec)
    if parsed and parsed[0] == "faster" and true_cfg:
        raise ValueError(f"cache {spec!r}: diffusers' FasterCache shares its per-module state between true CFG's "
                         f"two transformer calls (it expects batched CFG); use first_block, mag, taylorseer or tea "
                         f"with true_cfg_scale > 1")
    return parsed


def cache_config(spec: str, num_inference_steps: int, dtype: torch.dtype, current_timestep, true_cfg: bool = False):
    """The hook config for `spec` (None for ""): a diffusers config class, or our TeaCacheConfig.
    current_timestep: a callable giving the step's timestep (0-1000 scale, the pipeline's `current_timestep`)."""
    parsed = check_cache(spec, true_cfg)
    if parsed is None:
        return None
    from diffusers.hooks import FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    method, value = parsed
    if method == "first_block":
        return FirstBlockCacheConfig(threshold=value)
    if method == "mag":
        return MagCacheConfig(threshold=value, num_inference_steps=num_inference_steps, mag_ratios=FLUX_MAG_RATIOS)
    if method == "taylorseer":
        return TaylorSeerCacheConfig(cache_interval=value, taylor_factors_dtype=dtype)
    if method == "faster":
        return FasterCacheConfig(spatial_attention_block_skip_range=value, is_guidance_distilled=True,
                                 current_timestep_callback=current_timestep,
                                 attention_weight_callback=lambda _: 0.5)  # diffusers' default, said explicitly
    return TeaCacheConfig(threshold=value, num_inference_steps=num_inference_steps)


@contextmanager
def step_cache(transformer, spec: str, num_inference_steps: int, dtype: torch.dtype, current_timestep,
               true_cfg: bool = False):
    """Enable the cache `spec` on `transformer` for the block's duration, then remove its hooks (also on an error):
    the model is left as it was. With spec "" a cache the caller enabled (transformer.enable_cache) stays, and its
    state is reset at the end, as the pipeline's maybe_free_model_hooks does."""
    config = cache_config(spec, num_inference_steps, dtype, current_timestep, true_cfg)
    if config is None:
        try:
            yield
        finally:
            if transformer.is_cache_enabled:
                transformer._reset_stateful_cache()
        return
    if transformer.is_cache_enabled or has_tea_cache(transformer):
        raise ValueError(f"cache {spec!r}: the transformer already has a cache enabled; disable it first "
                         f"(transformer.disable_cache()) or pass cache=''")
    tea = isinstance(config, TeaCacheConfig)
    apply_tea_cache(transformer, config) if tea else transformer.enable_cache(config)
    try:
        yield
    finally:
        remove_tea_cache(transformer) if tea else transformer.disable_cache()


def cache_context(transformer, name: str, **fields):
    """transformer.cache_context(name, ...) when a cache is on (FluxPipeline's "cond" / "uncond"), else nothing:
    an uncached model is not touched."""
    if transformer.is_cache_enabled or has_tea_cache(transformer):
        return transformer.cache_context(name, **fields)
    return nullcontext()
