"""Full fine-tune of FLUX.1 Kontext [dev]'s transformer in bf16 (train.mode="full", full.py): every block Linear trains,
torchao's 8-bit AdamW with bf16 stochastic rounding steps each weight inside the backward, gradients checkpointed.
One H200 (README "Full fine-tune": ~50 GiB by the memory model), or sharded with FSDP2:
`torchrun --nproc_per_node 8 train.py --config configs/full_bf16.py`. Writes runs/full_bf16/transformer/
(FluxTransformer2DModel.from_pretrained; `convert.py ... --format comfyui-model` for ComfyUI)."""

from config import Config, DataConfig, ModelConfig, Part, TrainConfig

gpu = lambda: Part(dtype="bf16", device="cuda:0")  # noqa: E731

config = Config(
    model=ModelConfig(path="black-forest-labs/FLUX.1-Kontext-dev", clip=gpu(), t5=gpu(), vae=gpu(), transformer=gpu()),
    data=DataConfig(path="data/my_edits"),
    # lr 1e-5: full fine-tunes of FLUX run 1e-6 .. 2e-5 (a LoRA's 1e-4 moves every weight too far); no clipping
    # (the optimizer steps inside the backward, full.py)
    train=TrainConfig(mode="full", full_modules="all", optimizer="torchao_adamw8bit", steps=2000, lr=1e-5,
                      warmup_steps=50, grad_clip=0.0, save_every=250, validate_every=250, gradient_checkpointing=True),
    out_dir="runs/full_bf16",
)
