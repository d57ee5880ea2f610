"""FLUX.1 Kontext [dev] in bf16 on one GPU (80 GB cards); text encoders and VAE only for caching (cached mode).

train.memory_budget 0.34 (recompute.py): every block keeps its q, k, v and attention outputs and recomputes its MLP's
hidden; H100, 1024^2 + one control: 0.983 s/step at 38.8 GiB, against full checkpointing's 1.209 s / 26.5 GiB and no
recompute's 0.890 s / 62.9 GiB (BENCHMARKS.md). Activations grow with the tokens: for bigger or more reference images
lower the budget (0: full checkpointing)."""

from config import Config, DataConfig, ModelConfig, Part, TrainConfig

gpu = lambda: Part(dtype="bf16", device="cuda:0")  # noqa: E731

config = Config(
    model=ModelConfig(path="black-forest-labs/FLUX.1-Kontext-dev", clip=gpu(), t5=gpu(), vae=gpu(), transformer=gpu()),
    data=DataConfig(path="data/my_edits"),
    train=TrainConfig(steps=2000, lr=1e-4, save_every=250, validate_every=250, gradient_checkpointing=True,
                      memory_budget=0.34),
    out_dir="runs/bf16",
)
