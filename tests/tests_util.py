"""Helpers shared by tests (not a test module)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cache import scan_dataset


def edit_with_pipe(pipe, seed=0):
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    return torch.from_numpy(pipe(image=img, prompt="make the square red", height=48, width=64, max_area=48 * 64,
                                 num_inference_steps=4, guidance_scale=1.0, max_sequence_length=32,
                                 _auto_resize=False, output_type="np",
                                 generator=torch.Generator().manual_seed(seed)).images)


def mse_to_targets(pipe, cfg) -> float:
    """Mean squared error, in latent space, between the pipeline's edits of the held-out controls and the encoded
    targets. (The tiny VAE is random: decode(encode(x)) is far from x, so pixel error would measure the VAE.)"""
    from encode import encode_image, pack_latents, preprocess_image

    samples = scan_dataset(cfg.data)[-cfg.data.held_out:]
    errs = []
    for i, s in enumerate(samples):
        control, target = Image.open(s.control).convert("RGB"), Image.open(s.image).convert("RGB")
        out = pipe(image=control, prompt=s.prompt, height=control.height, width=control.width,
                   max_area=control.height * control.width, num_inference_steps=cfg.sample.num_inference_steps,
                   guidance_scale=1.0, max_sequence_length=cfg.data.max_sequence_length, _auto_resize=False,
                   output_type="latent", generator=torch.Generator().manual_seed(i)).images
        want = pack_latents(encode_image(pipe.vae, preprocess_image(target)))
        errs.append(float(((out - want) ** 2).mean()))
    return float(np.mean(errs))


def run_interpret_tests(test_file: str) -> subprocess.CompletedProcess:
    """Run test_file's `interpret` tests in a child process with TRITON_INTERPRET=1 (Triton reads it when it is
    imported, so it cannot be switched on inside this process)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k",
                           "interpret"], cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True,
                          text=True, timeout=600)
