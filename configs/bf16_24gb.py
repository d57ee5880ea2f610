"""FLUX.1 Kontext [dev] LoRA on a 24 GB card (RTX 4090 / 3090): configs/bf16.py with the transformer's block weights
streamed from host memory (offload.py; needs ~24 GB of pinned host RAM) and 24 of the 57 blocks kept on the GPU.
H200 (BENCHMARKS.md): 18.6 GiB peak, 1.56 s/step, 18.7 GB over the host link per step; all blocks streamed
(--model.resident-blocks 0): 5.3 GiB, 1.64 s, 47.3 GB (a 25 GB/s PCIe 4.0 link needs >= 1.9 s for that). The text
encoders and VAE only run while caching, before the transformer loads. T5 stays bf16 and the VAE untiled: a whole
sample.py call with both on the GPU beside the streamed transformer peaked at 12.4 GiB (1024^2), and both options
change the embeddings / latents (--model.t5-quant fp8 and --model.vae-tile 512 are there for smaller cards).
train.memory_budget stays 0 (full recompute): the streamed blocks must recompute whole, and the 22 GiB of bf16 weights
leave no room for kept activations on 24 GB (recompute.py's curve starts at 26.5 GiB with every block resident)."""

from config import Config, DataConfig, ModelConfig, Part, TrainConfig

gpu = lambda: Part(dtype="bf16", device="cuda:0")  # noqa: E731

config = Config(
    model=ModelConfig(path="black-forest-labs/FLUX.1-Kontext-dev", clip=gpu(), t5=gpu(), vae=gpu(), transformer=gpu(),
                      offload=True, resident_blocks=24),
    data=DataConfig(path="data/my_edits"),
    train=TrainConfig(steps=2000, lr=1e-4, save_every=250, validate_every=250, gradient_checkpointing=True),
    out_dir="runs/bf16_24gb",
)
