"""GPU parity of sample.py against FluxKontextPipeline on full-size random-weight FLUX.1 Kontext components (bf16).

    python parity_gpu.py            # H100: ~3 min; prints the relative error of our final latents and both timings

Both sides share the same modules (CLIP-L, T5-XXL encoder, the FLUX VAE and a 12B transformer, random weights,
tokenizers from the tiny checkpoint: speed and the comparison do not depend on the values) and the same generator.
"""

import json
import time

import numpy as np
import torch


def build_components(device="cuda"):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from bench import BenchConfig, build_transformer
    from load import Components, ModelConfig, load_clip_tokenizer, load_t5_tokenizer
    from tiny import ensure_tiny

    tiny = ModelConfig(path=str(ensure_tiny()))
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    torch.manual_seed(0)
    try:
        with torch.device(device):
            clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                                num_hidden_layers=12, num_attention_heads=12,
                                                max_position_embeddings=77, hidden_act="quick_gelu",
                                                eos_token_id=49407, projection_dim=768))
            t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                         num_heads=64, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                         use_cache=False))
            vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                                layers_per_block=2, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                                use_quant_conv=False, use_post_quant_conv=False)
    finally:
        torch.set_default_dtype(prev)
    transformer = build_transformer(BenchConfig(), device)
    tok, tok2 = load_clip_tokenizer(tiny), load_t5_tokenizer(tiny)
    mods = [m.eval().requires_grad_(False) for m in (clip, t5, vae, transformer)]
    return Components(clip=mods[0], clip_tokenizer=tok, t5=mods[1], t5_tokenizer=tok2, vae=mods[2],
                      transformer=mods[3])


def pipeline_run(pipe, image, kw, steps):
    """The pipeline's latents with wall time per stage: prompt encoding timed by a separate call, steps through
    callback_on_step_end (synchronised)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    marks = []

    def on_step(p, i, t, kwargs):
        torch.cuda.synchronize()
        marks.append(time.perf_counter())
        return kwargs

    out = pipe(image=image, output_type="latent", callback_on_step_end=on_step, **kw).images
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    steps_s = np.diff([t0] + marks)[1:] if len(marks) > 1 else []
    return out, dict(total=total, step_mean=float(np.mean(steps_s)) if len(steps_s) else None,
                     before_first_step_end=marks[0] - t0)


def main():
    from diffusers import FluxKontextPipeline
    from PIL import Image

    from sample import flux_scheduler, format_timings, sample

    torch.backends.cuda.matmul.allow_tf32 = False
    c = build_components()
    c.transformer.set_attention_backend("_native_flash")  # both sides: see train.set_attention
    pipe = FluxKontextPipeline(scheduler=flux_scheduler(), vae=c.vae, text_encoder=c.clip, tokenizer=c.clip_tokenizer,
                               text_encoder_2=c.t5, tokenizer_2=c.t5_tokenizer, transformer=c.transformer)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8))
    results = []
    for name, extra in [("no CFG", {}), ("true CFG 2.0", dict(negative_prompt="blurry", true_cfg_scale=2.0))]:
        kw = dict(prompt="make the sky red", height=1024, width=1024, num_inference_steps=4, guidance_scale=3.5,
                  **extra)
        sample(c, image, generator=torch.Generator("cpu").manual_seed(1), progress=False, **kw)  # warm-up
        theirs, pt = pipeline_run(pipe, image, dict(kw, generator=torch.Generator("cpu").manual_seed(1)), 4)
        ours = sample(c, image, generator=torch.Generator("cpu").manual_seed(1), progress=False,
                      output_type="latent", **kw)
        a, b = ours.latents.float(), theirs.float()
        rel = float((a - b).norm() / b.norm())
        row = dict(case=name, rel_err=rel, finite=bool(torch.isfinite(a).all() and torch.isfinite(b).all()),
                   pipeline=pt, ours=dict(total=ours.timings.total, step_mean=float(np.mean(ours.timings.steps)),
                                          encode_prompt=ours.timings.encode_prompt,
                                          encode_image=ours.timings.encode_image))
        results.append(row)
        print(f"== {name}: rel err of final latents ours vs pipeline {rel:.2e} (finite: {row['finite']})")
        print(f"pipeline: total {pt['total']:.3f} s, {pt['step_mean']:.4f} s/step (steps 2-4)")
        print("ours:\n" + format_timings(ours.timings), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
