"""FLUX.1 Kontext [dev] with the transformer's block Linears in fp8 (e4m3, per-row scales), quantized at load from
the bf16 repo (by Hub id or a local folder). A pre-quantized export works as the transformer's path, by id or folder,
detected from its files: e.g. transformer=Part(path="AlekseyCalvin/Flux_Kontext_Dev_fp8_scaled_diffusers", ...) with
quant="none"; that repo dropped its scales, so it is refused until `fp8_scales` names a file of them."""

from config import Config, DataConfig, ModelConfig, Part, TrainConfig

gpu = lambda: Part(dtype="bf16", device="cuda:0")  # noqa: E731

config = Config(
    model=ModelConfig(path="black-forest-labs/FLUX.1-Kontext-dev", clip=gpu(), t5=gpu(), vae=gpu(), transformer=gpu(),
                      quant="fp8"),
    data=DataConfig(path="data/my_edits"),
    # fp8 input gradient: 0.737 vs 0.807 s/step, 63 vs 52 GiB (H200, BENCHMARKS.md); set False on a smaller card
    train=TrainConfig(steps=2000, lr=1e-4, save_every=250, validate_every=250, fp8_backward=True),
    out_dir="runs/fp8",
)
