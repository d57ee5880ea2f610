"""The embedded default: the miniature FLUX.1 Kontext (written on first use: a near-inverse VAE, a transformer
pre-trained to copy its control image) and a synthetic edit dataset ("make the square red").

Runs on 2 CPU cores in fp32, about a minute. `python train.py --config configs/tiny.py`."""

from config import Config, DataConfig, ModelConfig, Part, SampleConfig, TrainConfig
from tiny import ensure_tiny, ensure_toy_dataset

cpu32 = lambda: Part(dtype="fp32", device="cpu")  # noqa: E731

config = Config(
    model=ModelConfig(path=str(ensure_tiny()), clip=cpu32(), t5=cpu32(), vae=cpu32(), transformer=cpu32()),
    data=DataConfig(path=str(ensure_toy_dataset()), max_sequence_length=32, held_out=2),
    # sampled error to fresh targets (tests/test_train.py's edit_errors): 0.088 after 1200 steps, 0.065 after 2000
    train=TrainConfig(steps=1500, batch_size=4, lr=1e-2, rank=8, alpha=8.0, warmup_steps=10, save_every=500,
                      validate_every=500, log_every=10,
                      target_modules=("to_k", "to_q", "to_v", "to_out.0", "proj_out", "proj_mlp")),
    sample=SampleConfig(num_inference_steps=8, guidance_scale=1.0, max_sequence_length=32),
    out_dir="runs/tiny",
)
