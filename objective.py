"""The training objective, written once, and the batches it is computed on (train.py's loop and validate.py's
held-out loss both call these).

The objective (the one place it is written):
    x_t = (1 - t) * x0 + t * noise,   target = noise - x0,   loss = mean((v(x_t, t) - target)^2)
with t in [0, 1] (t = 1 is pure noise; sampling runs t from 1 to 0), passed to the transformer as `timestep=t`
(the pipeline passes sigma * 1000 / 1000). The transformer sees cat([noisy target tokens, control tokens]) with
ids (0, row, col) and (1, row, col) (several references: side by side on the index-1 plane, encode.control_ids);
only the first N (target) outputs are scored. train.loss="dual_masked" (dual_masked_terms) keeps this convention
and scores the same prediction inside the mask against noise - x0, outside it as (noise - v) against the control.
train.region_token appends one token after the control tokens (region.py, ids (2, 0, 0)); an IP-Adapter
(model.ip_adapter) gets each sample's cached image embeddings; both condition the same prediction.

Batches: a shuffled epoch groups samples of one latent shape (a batch holds one size); noise, t and caption
dropout are drawn from (seed, step): a resumed run repeats exactly what the uninterrupted one would have done.
"""

import hashlib
import json
import math
from collections import Counter

import torch

from cache import control_latents_of
from config import TrainConfig
from encode import latent_ids, pack_controls, pack_latents, predict_velocity, token_mask
from region import append_region

# ---------------------------------------------------------------- the objective


def sample_timesteps(n: int, cfg: TrainConfig, n_tokens: int, generator: torch.Generator) -> torch.Tensor:
    """t in (0, 1): uniform, or logit-normal; optionally shifted toward noise for large images with the
    sampler's own shift (mu = calculate_shift(n_tokens), t' = e^mu t / (1 + (e^mu - 1) t))."""
    if cfg.timestep_sampling == "uniform":
        t = torch.rand(n, generator=generator)
    elif cfg.timestep_sampling == "logit_normal":
        t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator))
    else:
        raise ValueError(f"train.timestep_sampling: {cfg.timestep_sampling!r}; expected uniform | logit_normal")
    if cfg.resolution_shift:
        from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift

        s = math.exp(calculate_shift(n_tokens))
        t = s * t / (1 + (s - 1) * t)
    return t


def predicted_velocity(transformer, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                       control: torch.Tensor | None, prompt_embeds, pooled_prompt_embeds, img_ids, text_ids,
                       guidance: float, ip_embeds=None, region=None, tmask=None) -> torch.Tensor:
    """The transformer's velocity at x_t = (1 - t) x0 + t noise (the one place x_t is formed), [B, N, 64].
    Conditioning beyond the control tokens: ip_embeds, an IP-Adapter's image embeddings [B, 1, D]; region, the
    region-token module, appended after the control tokens from the token-grid mask tmask [B, 1, H', W']."""
    t_ = t.view(-1, 1, 1).to(x0.dtype)
    x_t = (1 - t_) * x0 + t_ * noise
    g = torch.full((x0.shape[0],), guidance, device=x0.device, dtype=torch.float32)
    control, img_ids = append_region(region, tmask, control, img_ids)
    return predict_velocity(transformer, x_t, control, t.to(x0.dtype), g, prompt_embeds, pooled_prompt_embeds,
                            text_ids, img_ids, ip_embeds)


def flow_matching_loss(transformer, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                       control: torch.Tensor | None, prompt_embeds, pooled_prompt_embeds, img_ids, text_ids,
                       guidance: float, weight: torch.Tensor | None = None, **cond) -> torch.Tensor:
    """Packed x0, noise [B, N, 64]; control [B, M, 64] or None; t [B]; weight [B, N, 1] or None; cond:
    predicted_velocity's ip_embeds / region / tmask."""
    pred = predicted_velocity(transformer, x0, noise, t, control, prompt_embeds, pooled_prompt_embeds, img_ids,
                              text_ids, guidance, **cond)
    err = (pred.float() - (noise - x0).float()) ** 2
    if weight is None:
        return err.mean()
    return (err * weight).sum() / (weight.sum() * err.shape[-1]).clamp_min(1e-8)


def dual_masked_terms(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, context: torch.Tensor,
                      mask: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The dual masked loss's two data terms, with the convention above (x_t = (1 - t) x0 + t noise, v = noise - x0):
    inside the mask (m = 1) the velocity error (v_pred - (noise - x0))^2; outside it the identity on the
    reconstructed latent, (noise - v_pred - context)^2. Both are normalised together by sum(weight) * C, as the
    plain weighted loss is, so an all-ones mask gives exactly the plain loss and an all-zeros one the identity term.
    pred, x0, noise, context [B, N, C]; mask, weight [B, N, 1]."""
    pred, x0, noise, context = pred.float(), x0.float(), noise.float(), context.float()
    den = (weight.sum() * pred.shape[-1]).clamp_min(1e-8)
    inside = ((pred - (noise - x0)) ** 2 * weight * mask).sum() / den
    outside = ((noise - pred - context) ** 2 * weight * (1 - mask)).sum() / den
    return {"loss_in": inside, "loss_out": outside}


def dual_masked_loss(transformer, x0, noise, t, control, prompt_embeds, pooled_prompt_embeds, img_ids, text_ids,
                     guidance: float, weight: torch.Tensor | None, mask: torch.Tensor | None, **cond) -> dict:
    """dual_masked_terms on the transformer's prediction. The outside term compares with the control token by token,
    so the (single) control must have the target's size. No mask: the whole image is editable (the plain loss).
    cond: predicted_velocity's ip_embeds / region / tmask."""
    if control is None or control.shape != x0.shape:
        raise ValueError(f"train.loss='dual_masked' needs one control image the size of the target (pixel-aligned "
                         f"pairs); got control tokens {None if control is None else tuple(control.shape)} for target "
                         f"tokens {tuple(x0.shape)}")
    if mask is None:
        mask = weight = torch.ones(*x0.shape[:2], 1, device=x0.device)
    pred = predicted_velocity(transformer, x0, noise, t, control, prompt_embeds, pooled_prompt_embeds, img_ids,
                              text_ids, guidance, **cond)
    return dual_masked_terms(pred, x0, noise, control, mask, weight)


def lora_l2(params) -> torch.Tensor:
    """The stabilisers' sum of squared parameters (fp32): the LoRA's (train.loss_l2), the region token's
    (train.region_l2)."""
    return sum(p.float().pow(2).sum() for p in params)


# ---------------------------------------------------------------- batches


def step_generator(seed: int, *key) -> torch.Generator:
    h = hashlib.sha256(json.dumps([seed, *key]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


def make_batches(shapes: list[tuple], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch of sample indices: shuffled (seed, epoch), grouped so a batch holds one latent shape."""
    order = torch.randperm(len(shapes), generator=step_generator(seed, "epoch", epoch)).tolist()
    buckets: dict[tuple, list[int]] = {}
    for i in order:
        buckets.setdefault(shapes[i], []).append(i)
    batches = [b[j:j + batch_size] for b in buckets.values() for j in range(0, len(b), batch_size)]
    perm = torch.randperm(len(batches), generator=step_generator(seed, "batches", epoch)).tolist()
    return [batches[i] for i in perm]


def global_batch(shapes: list[tuple], batch_size: int, seed: int, index: int, repeat: int = 1) -> list[int]:
    """The index-th batch of the endless stream of epochs. Every epoch has the same number of batches (shuffling
    moves samples within their shape bucket), so the epoch is index // that number: O(N) per step, not O(steps).
    repeat (DataConfig.repeat, DiffSynth's dataset_repeat): an epoch shuffles the list repeated that many times,
    so each sample comes `repeat` times per epoch (a batch may hold one sample twice)."""
    n, shapes = len(shapes), list(shapes) * repeat
    per_epoch = sum(math.ceil(k / batch_size) for k in Counter(shapes).values())
    return [i % n for i in make_batches(shapes, batch_size, seed, index // per_epoch)[index % per_epoch]]


def collate(entries: list[dict], empty: dict, cfg: TrainConfig, step_key: tuple, device, dtype, rank_slice: slice):
    """Stack cached tensors into the transformer's inputs for the whole global batch, draw its noise, t and
    caption dropout from (seed, step_key), then keep this rank's slice."""
    g = step_generator(cfg.seed, *step_key)
    x0 = pack_latents(torch.stack([e["image_latents"] for e in entries]).float())
    h, w = entries[0]["image_latents"].shape[1:]
    noise = torch.randn(x0.shape, generator=g)
    t = sample_timesteps(len(entries), cfg, x0.shape[1], g)
    drop = torch.rand(len(entries), generator=g) < cfg.caption_dropout
    embeds = torch.stack([empty["empty_prompt_embeds"] if d else e["prompt_embeds"] for e, d in zip(entries, drop)])
    pooled = torch.stack([empty["empty_pooled_prompt_embeds"] if d else e["pooled_prompt_embeds"]
                          for e, d in zip(entries, drop)])
    ids = [latent_ids(h, w, 0.0)]
    control = None
    refs = [control_latents_of(e) for e in entries]  # one shape bucket: the same number and sizes in every entry
    if len({len(r) for r in refs}) > 1:  # zip would drop the extra references silently
        raise ValueError(f"collate: entries with {sorted({len(r) for r in refs})} references in one batch")
    if refs[0]:
        control, control_ids = pack_controls([torch.stack(r).float() for r in zip(*refs)])
        ids.append(control_ids)
    weight = m = tmask = ip = None
    if "mask" in entries[0]:
        tmask = token_mask(torch.stack([e["mask"] for e in entries]).float())  # [B, 1, h/2, w/2]
        m = tmask.flatten(2).transpose(1, 2)  # [B, N, 1], in token order
        weight = cfg.mask_weight_bg + (cfg.mask_weight_fg - cfg.mask_weight_bg) * m
    if "ip_image_embeds" in entries[0]:
        ip = torch.stack([e["ip_image_embeds"] for e in entries]).float()  # [B, 1, D]
    to = lambda x: None if x is None else x[rank_slice].to(device=device, dtype=dtype)  # noqa: E731
    on = lambda x: None if x is None else x[rank_slice].to(device)  # noqa: E731  (fp32: weights, masks)
    return dict(x0=to(x0), noise=to(noise), t=t[rank_slice].to(device), control=to(control),
                prompt_embeds=to(embeds), pooled_prompt_embeds=to(pooled),
                img_ids=torch.cat(ids).to(device=device, dtype=dtype),
                text_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
                weight=on(weight), mask=on(m), tmask=on(tmask), ip_embeds=to(ip))
