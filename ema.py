"""An exponential moving average of the trained weights (train.ema_decay, train.ema_start_step): the LoRA's and the
region token's parameters, averaged in fp32 after every optimizer step with torch's foreach lerp (what
torch.optim.swa_utils.get_ema_multi_avg_fn runs): ema += (1 - decay) * (w - ema). Until ema_start_step optimizer
steps are done it copies the weights instead (early weights are mostly initialisation).

Memory: one fp32 copy of the trained weights, 4 bytes per parameter (a rank-16 LoRA on FLUX.1's attention: 18.7M
parameters, 75 MB). Full mode would need 4 bytes per trained weight of the transformer (47 GB for all block Linears):
config.py refuses it.

train.py saves it as lora.ema.safetensors beside lora.safetensors (same format, `swapped` puts the average into the
model for the writers and the validation), and lora.py keeps it in checkpoints (ema.safetensors) for exact resume.
"""

import contextlib

import torch

__all__ = ["EMA"]


class EMA:
    """The average of `params` (a list of tensors the optimizer steps, in a fixed order)."""

    def __init__(self, params: list, decay: float, start_step: int = 0):
        if not 0 < decay < 1:
            raise ValueError(f"train.ema_decay: expected a value in (0, 1) for an EMA, got {decay!r}")
        self.params, self.decay, self.start_step = list(params), float(decay), int(start_step)
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, steps_done: int) -> None:
        """After optimizer step number `steps_done` (1-based): copy while steps_done <= start_step, then average."""
        current = [p.detach().float() for p in self.params]  # fp32 LoRA weights: the tensors themselves, no copy
        if steps_done <= self.start_step:
            torch._foreach_copy_(self.shadow, current)
        else:
            torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self):
        """Inside: the parameters hold the average (in their own dtype); after: exactly the trained weights again."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{i}": s.cpu().contiguous() for i, s in enumerate(self.shadow)}

    def load_state_dict(self, sd: dict[str, torch.Tensor], where: str = "EMA state") -> None:
        want = {f"ema.{i}": tuple(s.shape) for i, s in enumerate(self.shadow)}
        got = {k: tuple(v.shape) for k, v in sd.items()}
        if want != got:
            bad = sorted(set(want.items()) ^ set(got.items()))[:3]
            raise ValueError(f"{where}: its {len(got)} averaged tensors do not fit the {len(want)} trained ones "
                             f"(e.g. {bad}): trained with another rank, targets or region token?")
        for i, s in enumerate(self.shadow):
            s.copy_(sd[f"ema.{i}"])

    def bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.shadow)
