"""FLUX.1 Kontext [dev] in bf16 on one GPU; text encoders and VAE only for caching (cached mode)."""

from config import Config, DataConfig, ModelConfig, Part, TrainConfig

gpu = lambda: Part(dtype="bf16", device="cuda:0")  # noqa: E731

config = Config(
    model=ModelConfig(path="black-forest-labs/FLUX.1-Kontext-dev", clip=gpu(), t5=gpu(), vae=gpu(), transformer=gpu()),
    data=DataConfig(path="data/my_edits"),
    train=TrainConfig(steps=2000, lr=1e-4, save_every=250, validate_every=250, gradient_checkpointing=True),
    out_dir="runs/bf16",
)
