"""A bitsandbytes 4-bit (fp4) Kontext transformer with bf16 text encoders (a 4-bit T5 is known to drift)."""

from config import Config, DataConfig, ModelConfig, Part, TrainConfig

gpu = lambda: Part(dtype="bf16", device="cuda:0")  # noqa: E731

config = Config(
    model=ModelConfig(path="black-forest-labs/FLUX.1-Kontext-dev", clip=gpu(), t5=gpu(), vae=gpu(),
                      # a bnb fp4 transformer/ folder, by Hub id (fetched into the HF cache) or local path
                      transformer=Part(path="eramth/flux-kontext-4bit-fp4", dtype="bf16", device="cuda:0")),
    data=DataConfig(path="data/my_edits"),
    train=TrainConfig(steps=2000, lr=2e-5, save_every=250, validate_every=250, gradient_checkpointing=True),
    out_dir="runs/fp4",
)
