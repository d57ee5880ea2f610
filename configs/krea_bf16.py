"""FLUX.1-Krea-dev, text-to-image (no control images), bf16."""

from config import Config, DataConfig, ModelConfig, Part, SampleConfig, TrainConfig

gpu = lambda: Part(dtype="bf16", device="cuda:0")  # noqa: E731

config = Config(
    model=ModelConfig(path="black-forest-labs/FLUX.1-Krea-dev", clip=gpu(), t5=gpu(), vae=gpu(), transformer=gpu()),
    data=DataConfig(path="data/my_images", text_to_image=True),
    train=TrainConfig(steps=2000, lr=1e-4, save_every=250, validate_every=250, gradient_checkpointing=True),
    sample=SampleConfig(guidance_scale=4.5),
    out_dir="runs/krea_bf16",
)
