"""The LoRA's optimizer (train.optimizer), its learning-rate schedule, its state in checkpoints, and schedule-free's
evaluation weights. Every optimizer is a maintained library's (torch, bitsandbytes, prodigyopt, schedulefree,
transformers); this file only builds them from a TrainConfig. Full mode steps its own (full.py).

OPTIMIZERS (README "Optimizers" is this table): what each is for, the train.lr it expects, and its state in bytes per
trained parameter (fp32 LoRA weights; bitsandbytes' 8-bit states add one fp32 absmax per 256 values).
"""

import contextlib
import math

import torch

from config import TrainConfig

# train.optimizer (LoRA mode) -> (what it is for, the train.lr it expects, state bytes per trained parameter, what the
# state holds). Measured on a 256 x 256 fp32 weight by tests/test_optim.py: fp32 moments are 4 bytes each; bitsandbytes'
# 8-bit states 1 byte each plus one fp32 absmax per 256 values and a 256-entry qmap; Adafactor keeps a row and a column
# second moment per matrix (out + in values for an out x in weight) and no first moment (beta1 None).
OPTIMIZERS = {
    "adamw": ("the reference: torch's AdamW", "1e-4 (tiny: 1e-2)", 8, "exp_avg, exp_avg_sq"),
    "adamw8bit": ("AdamW with 8-bit moments (bitsandbytes)", "as adamw", 2, "8-bit exp_avg, exp_avg_sq"),
    "paged_adamw8bit": ("adamw8bit whose state can page out to host memory under GPU memory pressure (CUDA "
                        "unified memory; bitsandbytes)", "as adamw", 2, "as adamw8bit, paged"),
    "lion8bit": ("Lion (the sign of an interpolated momentum), 8-bit (bitsandbytes): the smallest state",
                 "3-10x below adamw's; weight_decay 3-10x above", 1, "8-bit momentum"),
    "prodigy": ("Prodigy: estimates its step size itself (prodigyopt)", "1.0 (a multiplier of its estimate)", 16,
                "exp_avg, exp_avg_sq, s, p0 (p0 one scalar for an all-zero start: lora_B's 12)"),
    "schedulefree_adamw": ("schedule-free AdamW: no decay schedule (train.scheduler constant); checkpoints, results "
                           "and validation use its averaged weights (schedulefree)", "1-10x adamw's", 8,
                           "z, exp_avg_sq"),
    "adafactor": ("Adafactor with an explicit lr: factored second moment, no first moment (transformers)",
                  "as adamw", 0, "row + column second moments"),
}

__all__ = ["OPTIMIZERS", "make_optimizer", "lr_factor", "eval_weights", "is_schedulefree", "flat_state",
           "unflat_state"]


def make_optimizer(params, tc: TrainConfig):
    """The optimizer train.optimizer names over `params` (the LoRA's, then the region token's), at train.lr,
    train.betas and train.weight_decay where it takes them. A library that cannot run here (bitsandbytes without its
    native library) fails with a ValueError naming the choice."""
    name, lr, betas, wd = tc.optimizer, tc.lr, tc.betas, tc.weight_decay
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd)
    if name == "prodigy":  # lr scales Prodigy's own step-size estimate d: 1.0 means "as estimated"
        from prodigyopt import Prodigy

        return Prodigy(params, lr=lr, betas=betas, weight_decay=wd)
    if name == "schedulefree_adamw":  # warmup: train.py's lr_factor sets the lr per step, as for every optimizer
        from schedulefree import AdamWScheduleFree

        opt = AdamWScheduleFree(params, lr=lr, betas=betas, weight_decay=wd)
        opt.train()  # it starts in eval mode and refuses to step there
        return opt
    if name == "adafactor":  # an explicit lr (train.py's schedule), not Adafactor's relative-step schedule
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=wd, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    if name in ("adamw8bit", "lion8bit", "paged_adamw8bit"):
        try:
            import bitsandbytes as bnb

            cls = {"adamw8bit": bnb.optim.AdamW8bit, "lion8bit": bnb.optim.Lion8bit,
                   "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]
            return cls(params, lr=lr, betas=betas, weight_decay=wd)
        except (ImportError, RuntimeError) as e:
            raise ValueError(f"train.optimizer={name!r} needs a working bitsandbytes: {e}") from e
    raise ValueError(f"train.optimizer: {name!r}; expected one of {' | '.join(OPTIMIZERS)}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based): linear warmup, then constant/linear/cosine."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.scheduler == "constant":
        return 1.0
    if cfg.scheduler == "linear":
        return max(0.0, 1 - p)
    if cfg.scheduler == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))
    raise ValueError(f"train.scheduler: {cfg.scheduler!r}; expected constant | linear | cosine")


@contextlib.contextmanager
def eval_weights(optimizer):
    """Schedule-free: the parameters hold the gradient point y while training; its result is the average x. Inside
    this block they hold x (optimizer.eval()), for checkpoints, the result file and validation, and y again after
    (optimizer.train()). The round trip y -> x -> y is not bit-exact, so train.py enters this block once per step that
    saves or validates, and a run resumed from a checkpoint (x, saved in eval mode) repeats the same train() the
    uninterrupted run did: resume stays exact. Other optimizers: nothing happens."""
    if not is_schedulefree(optimizer):
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()


def is_schedulefree(optimizer) -> bool:
    """Schedule-free optimizers mark their mode in each param group ("train_mode"); no other optimizer here does."""
    return "train_mode" in optimizer.param_groups[0]


# ---------------------------------------------------------------- state in checkpoints


def flat_state(opt_state: dict) -> tuple[dict, dict]:
    """optimizer.state_dict()["state"] as (tensors for safetensors, JSON-able scalars per parameter index). A tensor
    at state[i][k] is stored under "state.{i}.{k}" (the layout earlier checkpoints have); tensors nested deeper
    (bitsandbytes 0.50 packs its 8-bit state under "__bnb_optimizer_quant_state__") under "state.{i}.{k}.{sub}",
    their place in the scalars marked {"__tensor__": key}."""
    tensors, scalars = {}, {}

    def walk(v, key):
        if isinstance(v, torch.Tensor):
            tensors[key] = v.detach().to("cpu", copy=True)  # bitsandbytes shares its qmaps between parameters
            return {"__tensor__": key}
        if isinstance(v, dict):
            return {str(k): walk(x, f"{key}.{k}") for k, x in v.items()}
        return v

    for i, s in opt_state.items():
        scalars[str(i)] = {}
        for k, v in s.items():
            w = walk(v, f"state.{i}.{k}")
            if not isinstance(v, torch.Tensor):  # top-level tensors: by their key alone, as before
                scalars[str(i)][k] = w
    return tensors, scalars


def unflat_state(tensors: dict, scalars: dict) -> dict:
    """flat_state inverted: {parameter index: state}, for optimizer.load_state_dict."""

    def fill(v):
        if isinstance(v, dict):
            return tensors[v["__tensor__"]] if set(v) == {"__tensor__"} else {k: fill(x) for k, x in v.items()}
        return v

    out = {}
    for i, scal in scalars.items():
        s = {k: fill(v) for k, v in scal.items()}
        s.update({k.split(".", 2)[2]: v for k, v in tensors.items()
                  if k.startswith(f"state.{i}.") and "." not in k.split(".", 2)[2]})
        out[int(i)] = s
    return out
