"""Prompts, images, latents, packing and ids: FluxKontextPipeline's math as plain functions over loaded modules.

Every function here is compared with the pipeline method of the same name in tests/test_encode.py; the ids of
several references (reference_offsets, control_ids), which the pipeline lacks, follow ComfyUI (tests/test_multiref.py).
Results land on `device` (default: the encoder's own device), so encoders and transformer may live on different
devices.
"""

import numpy as np
import torch

# (width, height) pairs FLUX.1 Kontext was trained on (diffusers' PREFERRED_KONTEXT_RESOLUTIONS).
PREFERRED_KONTEXT_RESOLUTIONS = [
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
]
VAE_SCALE = 8  # FLUX's VAE downsamples by 8; packing 2x2 patches makes pixel sizes multiples of 16
MULTIPLE = 2 * VAE_SCALE
LATENT_CHANNELS = 16


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _as_list(prompt: str | list[str]) -> list[str]:
    return [prompt] if isinstance(prompt, str) else list(prompt)


# ---------------------------------------------------------------- prompts


@torch.no_grad()  # as in the pipeline's __call__ (grad mode changes which SDPA kernel runs)
def get_clip_prompt_embeds(text_encoder, tokenizer, prompt, num_images_per_prompt: int = 1, device=None):
    """CLIP pooled output, [B * n, hidden] (pipeline._get_clip_prompt_embeds; 77 tokens, truncated)."""
    prompt = _as_list(prompt)
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    pooled = text_encoder(ids.to(_device_of(text_encoder)), output_hidden_states=False).pooler_output
    pooled = pooled.to(dtype=text_encoder.dtype, device=device or _device_of(text_encoder))
    return pooled.repeat_interleave(num_images_per_prompt, dim=0)


@torch.no_grad()
def get_t5_prompt_embeds(text_encoder_2, tokenizer_2, prompt, num_images_per_prompt: int = 1,
                         max_sequence_length: int = 512, device=None):
    """T5 last hidden state, [B * n, max_sequence_length, d_model] (pipeline._get_t5_prompt_embeds)."""
    prompt = _as_list(prompt)
    ids = tokenizer_2(prompt, padding="max_length", max_length=max_sequence_length, truncation=True,
                      return_tensors="pt").input_ids
    embeds = text_encoder_2(ids.to(_device_of(text_encoder_2)), output_hidden_states=False)[0]
    embeds = embeds.to(dtype=text_encoder_2.dtype, device=device or _device_of(text_encoder_2))
    return embeds.repeat_interleave(num_images_per_prompt, dim=0)


def encode_prompt(text_encoder, tokenizer, text_encoder_2, tokenizer_2, prompt, prompt_2=None,
                  num_images_per_prompt: int = 1, max_sequence_length: int = 512, device=None):
    """(prompt_embeds [B*n, L, 4096], pooled_prompt_embeds [B*n, 768], text_ids [L, 3] zeros), as
    FluxKontextPipeline.encode_prompt: CLIP reads `prompt`, T5 reads `prompt_2` (default: `prompt`)."""
    if max_sequence_length > 512:
        raise ValueError(f"max_sequence_length cannot be greater than 512 but is {max_sequence_length}")
    device = device or _device_of(text_encoder_2)
    pooled = get_clip_prompt_embeds(text_encoder, tokenizer, prompt, num_images_per_prompt, device)
    embeds = get_t5_prompt_embeds(text_encoder_2, tokenizer_2, prompt_2 or prompt, num_images_per_prompt,
                                  max_sequence_length, device)
    text_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=text_encoder.dtype)
    return embeds, pooled, text_ids


# ---------------------------------------------------------------- images


def image_size(image) -> tuple[int, int]:
    """(height, width) of a PIL image, an HWC/BHWC ndarray or a CHW/BCHW tensor."""
    if isinstance(image, np.ndarray):
        return image.shape[-3], image.shape[-2]
    if isinstance(image, torch.Tensor):
        return image.shape[-2], image.shape[-1]
    return image.size[1], image.size[0]  # PIL: (width, height)


def kontext_size(height: int, width: int, auto_resize: bool) -> tuple[int, int]:
    """Input-image size the pipeline encodes: the preferred resolution nearest in aspect (auto_resize) or the
    image's own size, floored to a multiple of 16."""
    height, width = height // MULTIPLE * MULTIPLE, width // MULTIPLE * MULTIPLE
    if auto_resize:
        aspect = width / height
        _, width, height = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return height // MULTIPLE * MULTIPLE, width // MULTIPLE * MULTIPLE


def output_size(height: int, width: int, max_area: int) -> tuple[int, int]:
    """The pipeline's generation size: height x width rescaled to max_area at the same aspect, floored to 16."""
    aspect = width / height
    w, h = round((max_area * aspect) ** 0.5), round((max_area / aspect) ** 0.5)
    return h // MULTIPLE * MULTIPLE, w // MULTIPLE * MULTIPLE


def preprocess_image(image, height: int | None = None, width: int | None = None, auto_resize: bool = False):
    """PIL / ndarray / tensor -> float32 [B, 3, H, W] in [-1, 1], resized (Lanczos, as the pipeline) to
    (height, width) or, when not given, to `kontext_size` of the image. H and W are multiples of 16."""
    from diffusers.image_processor import VaeImageProcessor

    if hasattr(image, "mode") and image.mode != "RGB":
        image = image.convert("RGB")  # RGBA / L / P inputs: FLUX's VAE takes 3 channels
    if isinstance(image, np.ndarray) and image.ndim == 3:
        image = image[None]  # HWC -> BHWC (diffusers reads a 3-d array as a batch of grey images)
    if height is None or width is None:
        height, width = kontext_size(*image_size(image), auto_resize)
    if height < MULTIPLE or width < MULTIPLE:
        raise ValueError(f"image of size {image_size(image)} is too small: it must be at least {MULTIPLE}x{MULTIPLE} "
                         f"pixels to encode")
    proc = VaeImageProcessor(vae_scale_factor=MULTIPLE)
    return proc.preprocess(proc.resize(image, height, width), height, width)


@torch.no_grad()
def encode_image(vae, image: torch.Tensor, device=None, dtype=None) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, 16, H/8, W/8] = (mode of the VAE posterior - shift) * scale
    (pipeline._encode_vae_image, which uses argmax/mode, not a sample)."""
    x = image.to(device=_device_of(vae), dtype=vae.dtype)
    latents = vae.encode(x).latent_dist.mode()
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    return latents.to(device=device or latents.device, dtype=dtype or latents.dtype)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Inverse of encode_image: [B, 16, h, w] -> [B, 3, 8h, 8w] in about [-1, 1]."""
    x = latents.to(device=_device_of(vae), dtype=vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(x, return_dict=False)[0]


@torch.no_grad()
def encode_ip_image(image_encoder, feature_extractor, image) -> torch.Tensor:
    """One IP-Adapter image -> its CLIP image_embeds [1, 1, projection_dim] on the encoder's device, in its dtype
    (pipeline.encode_image + prepare_ip_adapter_image_embeds for one image, one adapter, one image per prompt).
    image: a PIL image or an HWC uint8 ndarray (the pipeline's negative image is np.zeros((width, height, 3),
    np.uint8)), read by the feature extractor; a tensor is taken as its pixel_values already, as the pipeline does.
    Compared with the pipeline in tests/test_ip_adapter.py."""
    if not isinstance(image, torch.Tensor):
        image = feature_extractor(image, return_tensors="pt").pixel_values
    pixels = image.to(device=_device_of(image_encoder), dtype=next(image_encoder.parameters()).dtype)
    return image_encoder(pixels).image_embeds[None]


# ---------------------------------------------------------------- packing and ids


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]; token (i, j) holds the 2x2 patch, channel order c*4 + dy*2 + dx."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def token_mask(mask: torch.Tensor) -> torch.Tensor:
    """A mask at latent resolution [B, 1, h, w] -> the packed token grid [B, 1, h/2, w/2] (nearest: each token's
    top-left latent cell). The one rule for both uses: the loss's per-token weight and the region token."""
    return mask[..., ::2, ::2]


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of pack_latents; height and width are the latent (not pixel) sizes."""
    b, _, d = packed.shape
    x = packed.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_ids(height: int, width: int, marker: float = 0.0, device=None, dtype=torch.float32,
               offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """[(H/2)(W/2), 3] position ids for a latent of size H x W: (marker, row, col). marker 0 marks the target /
    noise tokens, 1 the control (context) tokens (pipeline.prepare_latents sets image_ids[..., 0] = 1).
    offset: (rows, cols) in tokens added to row and col (a reference placed beside others: control_ids)."""
    rows = torch.arange(height // 2).repeat_interleave(width // 2) + offset[0]
    cols = torch.arange(width // 2).repeat(height // 2) + offset[1]
    ids = torch.stack([torch.full_like(rows, 0), rows, cols], dim=1).to(dtype)
    ids[:, 0] = marker
    return ids.to(device)


def reference_offsets(sizes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Where each of several references sits on the one control plane (index 1), as ComfyUI's default "offset"
    method (comfy/ldm/flux/model.py, Flux._forward; SimpleTuner's build_kontext_inputs follows it, so LoRAs trained
    on several references behave the same there). sizes: latent (h, w) per reference, in order. Returns (h_offset,
    w_offset) per reference in latent pixels: a reference goes to the right of the canvas covered so far when
    h + canvas_h > w + canvas_w (below would make it the taller side), else below it; the canvas grows to cover it.
    The first is always (0, 0), so one reference has the pipeline's ids. The target's own tokens (index 0) are not
    part of the canvas: references overlap its rows and columns, told apart by the index."""
    canvas_h = canvas_w = 0
    offsets = []
    for h, w in sizes:
        off = (0, canvas_w) if h + canvas_h > w + canvas_w else (canvas_h, 0)
        canvas_h, canvas_w = max(canvas_h, h + off[0]), max(canvas_w, w + off[1])
        offsets.append(off)
    return offsets


def control_ids(sizes: list[tuple[int, int]], device=None, dtype=torch.float32) -> torch.Tensor:
    """[sum (h/2)(w/2), 3] ids of the control tokens of references of latent sizes `sizes`, in order:
    (1, row + h_offset, col + w_offset) with reference_offsets in tokens, rounded as ComfyUI's process_img does:
    (offset + 1) // 2. One reference: latent_ids(h, w, marker=1.0), the pipeline's control ids."""
    return torch.cat([latent_ids(h, w, 1.0, device, dtype, ((oh + 1) // 2, (ow + 1) // 2))
                      for (h, w), (oh, ow) in zip(sizes, reference_offsets(sizes))])


def pack_controls(control_latents: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """References [B, C, h_i, w_i], in order -> (control tokens [B, M, 4C], each packed and concatenated in that
    order, as ComfyUI appends reference_latents; their ids [M, 3] from control_ids, in the latents' dtype and
    device). objective.py's collate and prepare_latents both call it."""
    x = control_latents[0]
    ids = control_ids([tuple(c.shape[2:]) for c in control_latents], device=x.device, dtype=x.dtype)
    return torch.cat([pack_latents(c) for c in control_latents], dim=1), ids


def prepare_latents(image_latents, batch_size: int, height: int, width: int, dtype, device, generator=None,
                    latents: torch.Tensor | None = None, num_channels_latents: int = LATENT_CHANNELS):
    """Noise and control tokens for the transformer, as pipeline.prepare_latents (after VAE encoding).

    image_latents: [b, C, h, w] control latents from encode_image, a list of them (several references, each of
    its own size, placed by reference_offsets), or None (text-to-image); each repeated to batch_size.
    height/width: output size in pixels. num_channels_latents: C of the noise, the pipeline's
    transformer.config.in_channels // 4 (16 for FLUX). Returns (latents [B, N, 64] packed noise,
    control_latents [B, M, 64] or None, latent_ids [N, 3], control_ids [M, 3] or None)."""
    from diffusers.utils.torch_utils import randn_tensor

    h, w = 2 * (height // MULTIPLE), 2 * (width // MULTIPLE)
    control = control_ids = None
    if image_latents is not None:
        refs = [image_latents] if isinstance(image_latents, torch.Tensor) else list(image_latents)
        for x in refs:
            if batch_size % x.shape[0]:
                raise ValueError(f"cannot repeat {x.shape[0]} control images to a batch of {batch_size}")
        control, control_ids = pack_controls([x.to(device=device, dtype=dtype).repeat(batch_size // x.shape[0], 1, 1, 1)
                                              for x in refs])
    if latents is None:
        latents = pack_latents(randn_tensor((batch_size, num_channels_latents, h, w), generator=generator,
                                            device=torch.device(device), dtype=dtype))
    else:
        latents = latents.to(device=device, dtype=dtype)
    return latents, control, latent_ids(h, w, device=device, dtype=dtype), control_ids


def predict_velocity(transformer, latents, control_latents, timestep, guidance, prompt_embeds, pooled_prompt_embeds,
             text_ids, img_ids, ip_embeds=None) -> torch.Tensor:
    """Velocity for the noise tokens [B, N, 64]: the transformer sees cat([noise tokens, control tokens]) and the
    prediction is its first N tokens (pipeline.__call__'s denoising loop; objective.py's loss and sample.py's loop
    both call it). ip_embeds: an IP-Adapter's image embeddings [B, n, D] (one adapter), passed as the pipeline passes
    them (joint_attention_kwargs["ip_adapter_image_embeds"], a list with one tensor per adapter)."""
    hidden = latents if control_latents is None else torch.cat([latents, control_latents], dim=1)
    kw = None if ip_embeds is None else {"ip_adapter_image_embeds": [ip_embeds]}
    out = transformer(hidden_states=hidden, timestep=timestep, guidance=guidance,
                      pooled_projections=pooled_prompt_embeds, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                      img_ids=img_ids, joint_attention_kwargs=kw, return_dict=False)[0]
    return out[:, :latents.shape[1]]
