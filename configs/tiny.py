"""The embedded default: the tiny random FLUX.1 Kontext (written on first use) and a synthetic edit dataset.

Runs on 2 CPU cores in fp32. `python train.py --config configs/tiny.py`."""

from config import Config, DataConfig, ModelConfig, Part, SampleConfig, TrainConfig
from tiny import ensure_tiny, ensure_toy_dataset

cpu32 = lambda: Part(dtype="fp32", device="cpu")  # noqa: E731

config = Config(
    model=ModelConfig(path=str(ensure_tiny()), clip=cpu32(), t5=cpu32(), vae=cpu32(), transformer=cpu32()),
    data=DataConfig(path=str(ensure_toy_dataset()), max_sequence_length=32, held_out=2),
    train=TrainConfig(steps=600, batch_size=4, lr=1e-2, rank=8, alpha=8.0, warmup_steps=10, save_every=200,
                      validate_every=200, log_every=10,
                      target_modules=("to_k", "to_q", "to_v", "to_out.0", "proj_out", "proj_mlp")),
    sample=SampleConfig(num_inference_steps=8, guidance_scale=1.0, max_sequence_length=32),
    out_dir="runs/tiny",
)
