"""Random models beyond the tiny default (tiny.py), for bench.py, the tests and configs/region_tiny.py: FLUX.1
Kontext's transformer, text encoders and VAE at full size with random weights (speed does not depend on the
values), random cache entries of their shapes, XLabs-format IP-Adapter weights (random, or a tiny IP-Adapter with its
image encoder written to a folder), the stock bitsandbytes nf4 transformer, and tiny random BLIP / Florence-2
captioners (caption.py's tests). Nothing is downloaded; each folder writer is keyed by content, as tiny.py's are.

    from fixtures import full_size_transformer; model = full_size_transformer("cuda")   # 12B, random, bf16
"""

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

import torch

from atomic import temp_dir_beside, user_mode_tree
import quant
from encode import latent_ids
from tiny import TinySpec, _bpe_merges, _replace_dir, _words, default_root, train_clip_tokenizer, train_t5_tokenizer


# ---------------------------------------------------------------- random full-size models and data (bench.py, GPU tests)

# FLUX.1 Kontext's transformer (black-forest-labs/FLUX.1-Kontext-dev transformer/config.json): 12B parameters.
FLUX_KONTEXT_DIMS = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                         guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# The same layout at toy width, for running bench.py's code paths on a CPU.
MINI_DIMS = dict(FLUX_KONTEXT_DIMS, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
T5_XXL_DIMS = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)  # google/t5-v1_1-xxl's encoder


@contextlib.contextmanager
def built_on(device, dtype=None):
    """Modules created inside are built directly on `device` in `dtype` (default bf16): no fp32 copy of their weights
    on the host. Torch's default dtype is restored after."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.bfloat16)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(prev)


def full_size_transformer(device, dtype=None, **dims):
    """A randomly initialised FluxTransformer2DModel (FLUX_KONTEXT_DIMS updated by `dims`), frozen, built directly on
    `device` in `dtype` (default bf16): no fp32 copy of 12B weights on the host. Speed does not depend on the values."""
    from diffusers import FluxTransformer2DModel

    with built_on(device, dtype):
        model = FluxTransformer2DModel(**dict(FLUX_KONTEXT_DIMS, **dims))
    return model.requires_grad_(False)


def full_size_t5(device, dtype=None, **dims):
    """A randomly initialised T5EncoderModel in eval mode (T5-XXL's encoder: T5_XXL_DIMS updated by `dims`), built
    directly on `device` in `dtype` (default bf16), its weights drawn from the global generator."""
    from transformers import T5Config, T5EncoderModel

    with built_on(device, dtype):
        return T5EncoderModel(T5Config(vocab_size=32128, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                       use_cache=False, **dict(T5_XXL_DIMS, **dims))).eval()


def stock_int4(model):
    """diffusers' bitsandbytes path, for bench.py's stock nf4 rows: every Linear quant.py would quantize as
    bnb.nn.Linear4bit nf4, bf16 compute, quantized on the GPU."""
    import bitsandbytes as bnb

    for _, parent, attr, mod in quant.quantized_linears(model):
        new = bnb.nn.Linear4bit(mod.in_features, mod.out_features, mod.bias is not None,
                                compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
        # quantized on the GPU where the weight lies (a CPU round trip copies 12B weights twice)
        new.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, quant_type="nf4").cuda()
        if mod.bias is not None:
            new.bias = torch.nn.Parameter(mod.bias.data, requires_grad=False)
        setattr(parent, attr, new)
    return model



def random_image(res: int, seed: int = 0):
    """A res x res RGB PIL image of random pixels (seeded)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (res, res, 3), dtype=np.uint8))


def random_entries(n: int, res: int, text_tokens: int, dims: dict = FLUX_KONTEXT_DIMS, control: bool = True,
                   seed: int = 0) -> list[dict]:
    """n cache entries as cache.py stores them (image_latents / control_latents [C, res/8, res/8], prompt_embeds
    [text_tokens, joint_attention_dim], pooled_prompt_embeds [pooled_projection_dim]), random, fp32 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    c, hw = dims["in_channels"] // 4, res // 8
    out = []
    for _ in range(n):
        e = dict(image_latents=torch.randn(c, hw, hw, generator=g),
                 prompt_embeds=torch.randn(text_tokens, dims["joint_attention_dim"], generator=g),
                 pooled_prompt_embeds=torch.randn(dims["pooled_projection_dim"], generator=g))
        if control:
            e["control_latents"] = torch.randn(c, hw, hw, generator=g)
        out.append(e)
    return out


def random_empty(text_tokens: int, dims: dict = FLUX_KONTEXT_DIMS) -> dict:
    """The empty-prompt embeddings entry (caption dropout), zeros of the cached shapes."""
    return dict(empty_prompt_embeds=torch.zeros(text_tokens, dims["joint_attention_dim"]),
                empty_pooled_prompt_embeds=torch.zeros(dims["pooled_projection_dim"]))


def random_inputs(res: int, text_tokens: int, dims: dict, device) -> dict:
    """One Kontext call's packed inputs at res x res with a control of the same size, random (seeded), bf16 on
    `device`: x0, noise, control [1, (res/16)^2, 64], prompt_embeds [1, text_tokens, joint_attention_dim], pooled
    [1, pooled_projection_dim], img_ids (target then control, encode.latent_ids), txt_ids (zeros)."""
    n = (res // 16) ** 2  # target tokens; the control image has the same size
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(device, torch.bfloat16)  # noqa: E731
    ids = torch.cat([latent_ids(res // 8, res // 8, 0.0), latent_ids(res // 8, res // 8, 1.0)])
    return dict(x0=r(1, n, 64), noise=r(1, n, 64), control=r(1, n, 64),
                prompt_embeds=r(1, text_tokens, dims["joint_attention_dim"]), pooled=r(1, dims["pooled_projection_dim"]),
                img_ids=ids.to(device, torch.bfloat16),
                txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=torch.bfloat16))


def full_size_components(device, dtype=None, seed: int = 0) -> dict:
    """FLUX.1 Kontext's pipeline components at full size with random weights, built directly on `device` in `dtype`
    (default bf16): CLIP-L (123M), the T5-XXL encoder (4.7B), the FLUX VAE and full_size_transformer() (12B). Keys
    as FluxKontextPipeline's arguments (no scheduler). The tokenizers are the tiny ones (trained here, no download):
    their ids are valid in the full vocabularies, and speed and a same-modules parity check do not depend on them.
    CLIP pools at the tokenizer's own end-of-text id, as CLIP-L pools at its own."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, tokenizer_2 = train_clip_tokenizer(TinySpec().clip_merges), train_t5_tokenizer()
    torch.manual_seed(seed)
    with built_on(device, dtype):
        # openai/clip-vit-large-patch14's text config; T5-XXL's encoder (google/t5-v1_1-xxl); FLUX.1's VAE
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12,
                                            max_position_embeddings=77, hidden_act="quick_gelu",
                                            projection_dim=768, bos_token_id=tokenizer.bos_token_id,
                                            eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=tokenizer.pad_token_id))
        t5 = full_size_t5(device, dtype)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                            layers_per_block=2, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                            use_quant_conv=False, use_post_quant_conv=False)
    return dict(text_encoder=clip.eval().requires_grad_(False), tokenizer=tokenizer,
                text_encoder_2=t5.eval().requires_grad_(False), tokenizer_2=tokenizer_2,
                vae=vae.eval().requires_grad_(False), transformer=full_size_transformer(device, dtype).eval())


# ---------------------------------------------------------------- IP-Adapter: tiny files, random full-size weights

# Bump when a writer below changes what it writes (the folder name is keyed by it, the spec and the library versions).
IP_ADAPTER_VERSION = 1
# The image encoder's projection_dim: openai/clip-vit-large-patch14 projects to 768 (XLabs' proj.weight [16384, 768]);
# the tiny one to 24, a width no other tiny model has, so that a swapped dimension fails loudly.
TINY_IP_PROJECTION = 24


def ip_adapter_state(num_layers: int, inner_dim: int, joint_attention_dim: int, projection_dim: int,
                     num_tokens: int = 4, seed: int = 0, device="cpu", dtype=None) -> dict:
    """Random IP-Adapter weights under XLabs-AI/flux-ip-adapter's key names (ip_adapter.safetensors):
    ip_adapter_proj_model.proj.weight [num_tokens * joint_attention_dim, projection_dim] and .bias, .norm.weight/.bias
    [joint_attention_dim], double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.weight
    [inner_dim, joint_attention_dim] and .bias [inner_dim] for each of the num_layers double blocks. Seeded, drawn on
    `device` in `dtype` (default fp32). Linear weights have std 1/sqrt(fan_in) and the norm's weight is about 1, so
    the image tokens and their keys/values have about unit variance and the adapter visibly changes a forward (XLabs
    initialise k/v to zero: a fresh adapter would change nothing)."""
    dtype = dtype or torch.float32
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, std):
        return (torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * std).to(dtype)

    joint = joint_attention_dim
    out = {"ip_adapter_proj_model.proj.weight": rand(num_tokens * joint, projection_dim, std=projection_dim ** -0.5),
           "ip_adapter_proj_model.proj.bias": rand(num_tokens * joint, std=0.1),
           "ip_adapter_proj_model.norm.weight": 1 + rand(joint, std=0.1),
           "ip_adapter_proj_model.norm.bias": rand(joint, std=0.1)}
    for i in range(num_layers):
        for kv in "kv":
            name = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj"
            out[f"{name}.weight"] = rand(inner_dim, joint, std=joint ** -0.5)
            out[f"{name}.bias"] = rand(inner_dim, std=0.1)
    return out


def random_ip_adapter_state(transformer, projection_dim: int = 768, num_tokens: int = 4, seed: int = 0) -> dict:
    """ip_adapter_state sized for `transformer` (a FluxTransformer2DModel: its double blocks, inner_dim and
    joint_attention_dim; XLabs' sizes for FLUX_KONTEXT_DIMS with the defaults), on its device in its compute dtype
    (x_embedder's): no file, for bench.py and GPU tests. Load it with load.add_ip_adapter."""
    w = transformer.x_embedder.weight
    return ip_adapter_state(transformer.config.num_layers, transformer.inner_dim,
                            transformer.config.joint_attention_dim, projection_dim, num_tokens, seed, w.device, w.dtype)


def write_tiny_image_encoder(out: str | Path, projection_dim: int = TINY_IP_PROJECTION, seed: int = 0) -> Path:
    """A random CLIP folder in openai/clip-vit-large-patch14's layout: config.json (model_type "clip", a CLIPModel),
    model.safetensors (text_model.*, vision_model.*, visual_projection.*, text_projection, logit_scale) and
    preprocessor_config.json; no tokenizer files (only the vision tower is read). 32x32 input, patches of 8.
    CLIPVisionModelWithProjection.from_pretrained(out) reads its vision tower and projection; it needs
    projection_dim inside vision_config too (transformers 5 does not copy CLIPConfig.projection_dim into it; the
    real config.json has it there). Vision weights are drawn wider than CLIP's init (initializer_range 0.2) so that
    embeddings differ from image to image."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, projection_dim=projection_dim, bos_token_id=62, eos_token_id=63,
                pad_token_id=63)  # the text tower is never run: ids inside its 64-token vocabulary
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8, projection_dim=projection_dim, initializer_range=0.2)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim))
    # the processor diffusers' load_ip_adapter builds from the encoder's image_size (and openai's file holds)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return _write_captioner(out, model, processor)


def _ip_dims(spec: TinySpec) -> tuple[int, int, int]:
    """(double blocks, inner_dim, joint_attention_dim) of build_components' transformer."""
    return spec.flux_layers, spec.flux_heads * spec.flux_head_dim, spec.t5_d_model


def write_tiny_ip_adapter(out: str | Path, spec: TinySpec = TinySpec(), seed: int = 0) -> Path:
    """An IP-Adapter for the tiny transformer of `spec`, written atomically (temp dir + rename):

        out/ip_adapter.safetensors     XLabs-AI/flux-ip-adapter's keys (ip_adapter_state), fp32
        out/image_encoder/             write_tiny_image_encoder (openai/clip-vit-large-patch14's layout)

    Load it with IPAdapterConfig(path=out, image_encoder=out, image_encoder_subfolder="image_encoder") or with
    FluxKontextPipeline.load_ip_adapter(out, "ip_adapter.safetensors", image_encoder_pretrained_model_name_or_path=out,
    image_encoder_subfolder="image_encoder")."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out)
    try:
        write_tiny_image_encoder(tmp / "image_encoder", seed=seed)
        save_file(ip_adapter_state(*_ip_dims(spec), TINY_IP_PROJECTION, seed=seed), tmp / "ip_adapter.safetensors")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_tiny_ip_adapter(spec: TinySpec = TinySpec(), root: str | Path | None = None) -> Path:
    """Path of write_tiny_ip_adapter's folder for the tiny checkpoint of `spec`, writing it first if absent (keyed
    by spec.key() and IP_ADAPTER_VERSION; the tiny checkpoint itself is not touched)."""
    blob = json.dumps([spec.key(), IP_ADAPTER_VERSION])
    path = Path(root or default_root()) / f"tiny-ip-adapter-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
    if not (path / "ip_adapter.safetensors").exists():
        write_tiny_ip_adapter(path, spec)
    return path


# ---------------------------------------------------------------- tiny random captioners (caption.py's tests)

# Bump when a builder below changes what it writes (the folder name is keyed by this and the library versions).
CAPTIONER_VERSION = 1


def tiny_bert_tokenizer():
    """WordPiece with BLIP's layout (BERT's [PAD]=0 ... specials, [DEC] as the bos token that starts a caption):
    every corpus word is a piece, every character a piece and a ##continuation; a transformers BertTokenizer."""
    from tokenizers import pre_tokenizers
    from transformers import BertTokenizer

    words = _words(pre_tokenizers.BertPreTokenizer())
    chars = sorted({c for w in words for c in w})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + sorted(words) + chars + ["##" + c for c in chars]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return BertTokenizer(vocab=vocab, bos_token="[DEC]", model_max_length=512)


def tiny_bart_tokenizer(n_merges: int = 200):
    """Byte-level BPE with BART's layout (<s>=0, <pad>=1, </s>=2, <unk>=3) plus Florence-2's <image> token, merges
    learnt from the corpus; a transformers BartTokenizer (RoBERTa's, as Florence-2 checkpoints name it)."""
    from tokenizers import pre_tokenizers
    from transformers import BartTokenizer

    words = _words(pre_tokenizers.ByteLevel(add_prefix_space=False))
    merges = _bpe_merges(words, {w: list(w) for w in words}, n_merges)
    tokens = ["<s>", "<pad>", "</s>", "<unk>"] + sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens += ["".join(m) for m in merges] + ["<mask>", "<image>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return BartTokenizer(vocab=vocab, merges=merges, extra_special_tokens={"image_token": "<image>"},
                         model_max_length=1024)


def _write_captioner(out: str | Path, model, processor) -> Path:
    """model + processor via save_pretrained into a temp folder, renamed onto `out` when complete."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out)
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        user_mode_tree(tmp)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_tiny_blip(out: str | Path, seed: int = 0) -> Path:
    """A randomly initialised BlipForConditionalGeneration + BlipProcessor folder (Salesforce/blip-image-captioning-*
    layout: config.json, model.safetensors, generation_config.json, processor and tokenizer files); 32x32 input.
    Weights are drawn wider than BLIP's init so that captions differ from image to image."""
    from transformers import (BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor,
                              BlipTextConfig, BlipVisionConfig)

    tok = tiny_bert_tokenizer()
    torch.manual_seed(seed)
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32, initializer_range=0.2)
    text = BlipTextConfig(vocab_size=len(tok), hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                          projection_dim=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=512,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.sep_token_id, sep_token_id=tok.sep_token_id,
                          pad_token_id=tok.pad_token_id, initializer_range=0.2)
    model = BlipForConditionalGeneration(BlipConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                                    projection_dim=32, image_text_hidden_size=32))
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    return _write_captioner(out, model, processor)


def write_tiny_florence2(out: str | Path, seed: int = 0) -> Path:
    """A randomly initialised Florence2ForConditionalGeneration + Florence2Processor folder (the layout of
    florence-community/Florence-2-*, transformers' native class): a 4-stage DaViT vision tower (64x64 input ->
    2x2 features + 1 pooled = 5 image tokens), a 1+1-layer BART, a byte-level BPE tokenizer with <image>."""
    from transformers import (BartConfig, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor, Florence2VisionConfig)

    tok = tiny_bart_tokenizer()
    torch.manual_seed(seed)
    vision = Florence2VisionConfig(depths=(1, 1, 1, 1), embed_dim=(8, 16, 16, 32), num_heads=(1, 2, 2, 2),
                                   num_groups=(1, 2, 2, 2), window_size=2, projection_dim=32,
                                   max_position_embeddings=8, max_temporal_embeddings=4, drop_path_rate=0.0,
                                   initializer_range=0.5)
    text = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=1024,
                      bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
                      init_std=0.2)
    config = Florence2Config(vision_config=vision.to_dict(), text_config=text.to_dict(),
                             image_token_id=tok.image_token_id)
    model = Florence2ForConditionalGeneration(config)
    # image_seq_length: the vision tower's tokens for a 64x64 input (the processor inserts that many <image>);
    # post_processor_config: only the parse rule caption.py uses (the real one also has ocr, grounding, boxes).
    images = CLIPImageProcessor(size={"height": 64, "width": 64}, do_center_crop=False, image_seq_length=5)
    processor = Florence2Processor(image_processor=images, tokenizer=tok, post_processor_config={"pure_text": {}})
    return _write_captioner(out, model, processor)


TINY_CAPTIONERS = {"blip": write_tiny_blip, "florence2": write_tiny_florence2}


def ensure_tiny_captioner(kind: str = "blip", root: str | Path | None = None) -> Path:
    """Path of the tiny `kind` captioner ("blip" | "florence2"), writing it first if absent."""
    import tokenizers
    import transformers

    if kind not in TINY_CAPTIONERS:
        raise ValueError(f"unknown tiny captioner {kind!r}; expected one of {', '.join(TINY_CAPTIONERS)}")
    blob = json.dumps([kind, CAPTIONER_VERSION, transformers.__version__, tokenizers.__version__])
    path = Path(root or default_root()) / f"tiny-{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"
    if not (path / "config.json").exists():
        TINY_CAPTIONERS[kind](path)
    return path
