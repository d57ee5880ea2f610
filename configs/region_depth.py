"""Mask-guided editing with depth (issue #12's recipe): FLUX.1 Kontext [dev] in bf16, the XLabs IP-Adapter fed each
pair's depth map through CLIP ViT-L/14, a learnable region token from the mask, and the dual masked loss (inside the
mask the edit, outside it the context kept). Data in the pairs layout (data.py (c)):

    data/masked_edits/target/<stem>.png    the edited image
    data/masked_edits/context/<stem>.png   the image to edit (pixel-aligned with its target)
    data/masked_edits/masks/<stem>.png     white = edit region, black = keep
    data/masked_edits/depth/<stem>.png     a depth map (any bit depth)
    data/masked_edits/prompts.txt          one prompt per line, for the targets in sorted order

    python train.py --config configs/region_depth.py
    python sample.py --config configs/region_depth.py --image in.png --mask mask.png --ip-image depth.png \
        --prompt "..." --lora runs/region_depth/lora.safetensors
"""

from config import Config, DataConfig, IPAdapterConfig, ModelConfig, Part, TrainConfig

gpu = lambda: Part(dtype="bf16", device="cuda:0")  # noqa: E731

config = Config(
    model=ModelConfig(path="black-forest-labs/FLUX.1-Kontext-dev", clip=gpu(), t5=gpu(), vae=gpu(), transformer=gpu(),
                      ip_adapter=IPAdapterConfig(path="XLabs-AI/flux-ip-adapter", device="cuda:0")),
    data=DataConfig(path="data/masked_edits"),
    train=TrainConfig(steps=2000, lr=1e-4, save_every=250, validate_every=250, gradient_checkpointing=True,
                      loss="dual_masked", region_token=True),
    out_dir="runs/region_depth",
)
