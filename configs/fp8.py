"""FLUX.1 Kontext [dev] with the transformer's block Linears in fp8 (e4m3, per-row scales), quantized at load from
a local bf16 folder, or read from a ComfyUI fp8-scaled / plain-cast export (detected from its files)."""

from config import Config, DataConfig, ModelConfig, Part, TrainConfig

gpu = lambda: Part(dtype="bf16", device="cuda:0")  # noqa: E731

config = Config(
    model=ModelConfig(path="checkpoints/FLUX.1-Kontext-dev", clip=gpu(), t5=gpu(), vae=gpu(), transformer=gpu(),
                      quant="fp8"),
    data=DataConfig(path="data/my_edits"),
    # fp8 input gradient: 0.745 vs 0.816 s/step, 63 vs 52 GiB (H200, BENCHMARKS.md); set False on a smaller card
    train=TrainConfig(steps=2000, lr=1e-4, save_every=250, validate_every=250, fp8_backward=True),
    out_dir="runs/fp8",
)
