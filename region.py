"""The learnable region token: the edit mask, as one extra token in the transformer's image sequence.

The mask at the packed token grid (encode.token_mask, the rule the loss weights use too) [B, 1, H', W'] is average-
pooled to a fixed grid (TrainConfig.region_grid) and projected to one token of the transformer's input width:
MaskRegionToken: [B, 1, H', W'] -> [B, 1, c_in]. The token joins the image sequence after the target and control
tokens, hidden = cat([noisy target, control(s), region]) with ids (0, r, c), (1, r, c) and (2, 0, 0); only the first N
(target) outputs are scored or sampled, as always. Adaptive pooling is why one module serves every resolution and
aspect (a 64 x 64 token grid pools 4 x 4 cells per input, a 48 x 80 one uneven cells).

The module trains with the LoRA and is saved beside it: `lora.safetensors` -> `lora.region.safetensors` (its own
keys `region.proj.weight` / `region.proj.bias`, its grid and width in the header), so the LoRA file itself stays
what every other tool loads. No mask (or no module): nothing is appended and the output is today's exactly.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from cache import save_atomic

FORMAT = "kontext-lora-region-token/1"  # the header's "format": what load_region accepts
REGION_ID = 2.0  # the region token's id plane (0: target, 1: control references)


class MaskRegionToken(torch.nn.Module):
    """A mask at any token grid [B, 1, H', W'] (1 = edit region) -> one token [B, 1, c_in]."""

    def __init__(self, h_tok: int, w_tok: int, c_in: int):
        super().__init__()
        self.grid = (h_tok, w_tok)
        self.proj = torch.nn.Linear(h_tok * w_tok, c_in)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        m = F.adaptive_avg_pool2d(mask.float(), self.grid)  # the identity at the module's own grid
        return self.proj(m.flatten(1).to(self.proj.weight.dtype))[:, None]


def append_region(region, tmask: torch.Tensor | None, control: torch.Tensor | None,
                  img_ids: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(control tokens, image ids) with the region token appended: control [B, M, C] (or None: text-to-image)
    gains one token computed from the token-grid mask tmask [B, 1, H', W'], img_ids [N + M, 3] gains (2, 0, 0).
    region: a MaskRegionToken (or its DDP wrapper) on tmask's device. Unchanged when there is no module or no mask."""
    if region is None or tmask is None:
        return control, img_ids
    token = region(tmask).to((control if control is not None else img_ids).dtype)  # an fp32 module, a bf16 model
    rid = torch.tensor([[REGION_ID, 0.0, 0.0]], device=img_ids.device, dtype=img_ids.dtype)
    return token if control is None else torch.cat([control, token], dim=1), torch.cat([img_ids, rid], dim=0)


# ---------------------------------------------------------------- beside the LoRA


def region_path(lora_path) -> Path:
    """Where the region token of a LoRA file lives: lora.safetensors -> lora.region.safetensors."""
    p = Path(lora_path)
    return p.with_name(p.stem + ".region.safetensors")


def save_region(region: MaskRegionToken, path) -> None:
    """Atomically, fp32, with the grid and width in the header (what load_region needs to rebuild the module)."""
    tensors = {f"region.{k}": v.detach().float().cpu().contiguous() for k, v in region.state_dict().items()}
    save_atomic(tensors, Path(path), {"format": FORMAT, "grid": json.dumps(list(region.grid)),
                                      "c_in": str(region.proj.out_features)})


def load_region(path, c_in: int | None = None) -> MaskRegionToken:
    """The module saved by save_region (fp32, on the CPU). c_in: the transformer's in_channels, checked when given.
    Errors name the file and what was expected."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: cannot read the region token ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a region-token file (header format {meta.get('format')!r}, expected {FORMAT!r}"
                         f", as train.py writes beside lora.safetensors)")
    try:
        h, w = json.loads(meta["grid"])
        width = int(meta["c_in"])
    except (KeyError, ValueError, TypeError):
        raise ValueError(f"{path}: the header's grid / c_in are missing or malformed ({meta})") from None
    if c_in is not None and width != c_in:
        raise ValueError(f"{path}: the region token is {width} wide but the transformer takes {c_in} input channels "
                         f"(trained for another model?)")
    module = MaskRegionToken(h, w, width)
    expected = {f"region.{k}" for k in module.state_dict()}
    if set(tensors) != expected:
        raise ValueError(f"{path}: keys {sorted(tensors)}; expected {sorted(expected)}")
    try:
        module.load_state_dict({k.removeprefix("region."): v for k, v in tensors.items()})
    except RuntimeError as e:  # shapes that disagree with the header
        raise ValueError(f"{path}: tensors do not match the header's grid {h}x{w} and width {width} ({e})") from None
    return module
