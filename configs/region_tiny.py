"""The tiny twin of configs/region_depth.py (issue #12's recipe on the miniature model, no downloads): the tiny
Kontext, a tiny random IP-Adapter + CLIP image encoder in XLabs' / openai's layouts (fixtures.py) fed each pair's
depth map, a region token from the mask, the dual masked loss, on a synthetic masked edit
(tiny.write_masked_toy_dataset: a coloured square turned red, random grey cells outside it that must be kept). About a
minute on 2 CPU cores.

    python train.py --config configs/region_tiny.py
"""

from config import Config, DataConfig, IPAdapterConfig, ModelConfig, Part, SampleConfig, TrainConfig
from fixtures import ensure_tiny_ip_adapter
from tiny import ensure_masked_toy_dataset, ensure_tiny

cpu32 = lambda: Part(dtype="fp32", device="cpu")  # noqa: E731
ipa = str(ensure_tiny_ip_adapter())

config = Config(
    model=ModelConfig(path=str(ensure_tiny()), clip=cpu32(), t5=cpu32(), vae=cpu32(), transformer=cpu32(),
                      ip_adapter=IPAdapterConfig(path=ipa, image_encoder=ipa, image_encoder_subfolder="image_encoder",
                                                 dtype="fp32")),
    data=DataConfig(path=str(ensure_masked_toy_dataset()), max_sequence_length=32, held_out=2),
    train=TrainConfig(steps=800, batch_size=4, lr=1e-2, rank=8, alpha=8.0, warmup_steps=10, save_every=400,
                      validate_every=400, log_every=10, loss="dual_masked", region_token=True, region_grid=(4, 4),
                      target_modules=("to_k", "to_q", "to_v", "to_out.0", "proj_out", "proj_mlp")),
    sample=SampleConfig(num_inference_steps=8, guidance_scale=1.0, max_sequence_length=32),
    out_dir="runs/region_tiny",
)
