"""Write a miniature, randomly initialised FLUX.1 Kontext checkpoint in the exact diffusers folder layout.

Nothing is downloaded: the CLIP tokenizer (byte-level BPE) and the T5 tokenizer (Unigram) are trained on
the spot with the `tokenizers` library from a small built-in corpus, and every model is built from a config
and a seed. The folder loads unchanged with `FluxKontextPipeline.from_pretrained(path)`.

    python tiny.py --out checkpoints/tiny            # write it
    from tiny import ensure_tiny; path = ensure_tiny()  # write once, reuse (keyed by spec + library versions)
"""

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# The two-word vocabulary an edit instruction uses, plus filler, so both tokenizers learn merges for real words.
_CORPUS = """
make the sky red. turn the cat into a dog. add a hat to the person. remove the background.
change the colour of the car to blue. make it night. make it snowy winter. add sunglasses.
replace the text with hello world. turn the photo into a watercolor painting. invert the colours.
draw a red square in the middle. make the image brighter. make the image darker. flip it upside down.
a photo of a cat sitting on a red chair in a sunny garden with green trees and blue sky.
a portrait of a woman with long hair wearing a yellow dress, studio lighting, high detail.
the quick brown fox jumps over the lazy dog while the small bird sings on the old wooden fence.
zero one two three four five six seven eight nine ten hundred thousand million.
une photo d'un chat. ein foto von einer katze. un gato en la playa. cafe, naive, uber, resume.
"""


@dataclass(frozen=True)
class TinySpec:
    """Every size of the miniature model in one place; `wide()` gives a larger variant for tests."""

    seed: int = 0
    clip_merges: int = 300
    clip_hidden: int = 32
    clip_layers: int = 2
    clip_heads: int = 2
    t5_d_model: int = 32
    t5_layers: int = 2
    t5_heads: int = 2
    vae_channels: tuple = (8, 16, 16, 16)  # four blocks -> vae_scale_factor 8, as in FLUX
    vae_groups: int = 4
    flux_layers: int = 1
    flux_single_layers: int = 1
    flux_heads: int = 2
    flux_head_dim: int = 16
    flux_rope: tuple = (4, 6, 6)  # sums to flux_head_dim
    latent_channels: int = 16  # the VAE's; the transformer takes 4x (2x2 packing), as FLUX's 16 -> 64

    def wide(self) -> "TinySpec":
        return dataclasses.replace(self, clip_hidden=64, t5_d_model=64, flux_heads=4, flux_head_dim=32,
                                   flux_rope=(8, 12, 12), flux_layers=2, flux_single_layers=2)

    def key(self) -> str:
        import diffusers
        import transformers

        blob = json.dumps([dataclasses.asdict(self), diffusers.__version__, transformers.__version__], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _corpus_lines() -> list[str]:
    lines = [l.strip() for l in _CORPUS.strip().splitlines() if l.strip()]
    return lines * 4


def _words(pre_tokenizer) -> Counter:
    words = Counter()
    for line in _corpus_lines():
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(line.lower()))
    return words


def train_clip_tokenizer(n_merges: int):
    """Byte-level BPE with CLIP's pre-tokenizer, learnt from the corpus; returns a transformers CLIPTokenizer.

    The merges are learnt here rather than with tokenizers' BpeTrainer, whose tie-breaking between equally
    frequent pairs varies from run to run: the same spec must always write the same checkpoint."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import CLIPTokenizer

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    words = _words(pre)
    splits = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in words}
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, count in words.items():
            s = splits[w]
            for p in zip(s, s[1:]):
                pairs[p] += count
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]  # ties broken by the pair itself
        merges.append(best)
        for w, s in splits.items():
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == best:
                    s[i:i + 2] = [s[i] + s[i + 1]]
                i += 1
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokens = sorted(alphabet) + [c + "</w>" for c in sorted(alphabet)] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    # transformers 5: vocab=/merges= (a vocab_file= kwarg is silently ignored and gives a 3-token tokenizer).
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def train_t5_tokenizer(extra_ids: int = 100):
    """Unigram with T5's layout (<pad>=0, </s>=1, <unk>=2): every corpus word and character is a piece scored by
    its log frequency (deterministic, unlike a trainer's pruning); returns a transformers T5 fast tokenizer."""
    from tokenizers import pre_tokenizers
    from transformers import T5TokenizerFast

    words = _words(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"))
    chars = Counter()
    for w, c in words.items():
        chars.update({ch: c for ch in w})
    total = sum(words.values()) + sum(chars.values())
    pieces = sorted(words.items()) + sorted((ch, c) for ch, c in chars.items() if ch not in words)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, math.log(c / total) - (len(p) == 1) * 5.0) for p, c in pieces]  # prefer whole words
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1)]
    return T5TokenizerFast(vocab=vocab, extra_ids=extra_ids, model_max_length=512)


def build_components(spec: TinySpec) -> dict:
    """All pipeline components, randomly initialised from spec.seed (deterministic)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = train_clip_tokenizer(spec.clip_merges)
    tokenizer_2 = train_t5_tokenizer()
    torch.manual_seed(spec.seed)
    clip_cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=spec.clip_hidden,
                              intermediate_size=2 * spec.clip_hidden, num_hidden_layers=spec.clip_layers,
                              num_attention_heads=spec.clip_heads, max_position_embeddings=77,
                              projection_dim=spec.clip_hidden, hidden_act="quick_gelu",
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(clip_cfg)
    t5_cfg = T5Config(vocab_size=len(tokenizer_2), d_model=spec.t5_d_model, d_kv=spec.t5_d_model // spec.t5_heads,
                      d_ff=2 * spec.t5_d_model, num_layers=spec.t5_layers, num_heads=spec.t5_heads,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                      tie_word_embeddings=False)
    text_encoder_2 = T5EncoderModel(t5_cfg)
    n = len(spec.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=spec.vae_channels,
                        layers_per_block=1, latent_channels=spec.latent_channels, norm_num_groups=spec.vae_groups, sample_size=64,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                        use_post_quant_conv=False)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * spec.latent_channels, num_layers=spec.flux_layers, num_single_layers=spec.flux_single_layers,
        attention_head_dim=spec.flux_head_dim, num_attention_heads=spec.flux_heads,
        joint_attention_dim=spec.t5_d_model, pooled_projection_dim=spec.clip_hidden, guidance_embeds=True,
        axes_dims_rope=spec.flux_rope)
    # FLUX.1-dev's scheduler config (dynamic shifting; mu comes from the pipeline).
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
    return dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Put a fully written temp folder in place of `out` (rename on the same filesystem)."""
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def write_tiny(out: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Write the checkpoint folder atomically (temp dir + rename) and return its path."""
    from diffusers import FluxKontextPipeline

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:
        FluxKontextPipeline(**build_components(spec)).save_pretrained(tmp, safe_serialization=True)
        (tmp / "tiny_spec.json").write_text(json.dumps(dataclasses.asdict(spec)))
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_root() -> Path:
    return Path(os.environ.get("KONTEXT_LORA_HOME", Path(__file__).resolve().parent / ".kontext_lora"))


def ensure_tiny(spec: TinySpec = TinySpec(), root: str | Path | None = None) -> Path:
    """Path of the tiny checkpoint for `spec`, writing it first if absent (keyed by content, not by name)."""
    path = Path(root or default_root()) / f"tiny-{spec.key()}"
    if not (path / "model_index.json").exists():
        write_tiny(path, spec)
    return path


def write_toy_dataset(out: str | Path, n: int = 24, size: int = 64, seed: int = 0) -> Path:
    """A synthetic edit dataset in the folder layout: control = a coloured square on a plain background,
    target = the same picture with the square painted red, caption "make the square red"."""
    import numpy as np
    from PIL import Image

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)  # the temp folder must be on out's filesystem for the rename
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:
        (tmp / "images").mkdir()
        (tmp / "control").mkdir()
        rng = np.random.default_rng(seed)
        for i in range(n):
            img = np.empty((size, size, 3), np.uint8)
            img[:] = rng.integers(40, 200, 3)
            side = int(rng.integers(size // 4, size // 2))
            y, x = rng.integers(0, size - side, 2)
            img[y:y + side, x:x + side] = rng.integers(0, 256, 3)
            Image.fromarray(img).save(tmp / "control" / f"{i:03d}.png")
            img[y:y + side, x:x + side] = (230, 20, 20)
            Image.fromarray(img).save(tmp / "images" / f"{i:03d}.png")
            (tmp / "images" / f"{i:03d}.txt").write_text("make the square red")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_toy_dataset(n: int = 24, size: int = 64, seed: int = 0, root: str | Path | None = None) -> Path:
    path = Path(root or default_root()) / f"toy-edit-{n}-{size}-{seed}"
    if not (path / "images").is_dir():
        write_toy_dataset(path, n, size, seed)
    return path


# ---------------------------------------------------------------- random models and data for bench and GPU tests

# FLUX.1 Kontext's transformer (black-forest-labs/FLUX.1-Kontext-dev transformer/config.json): 12B parameters.
FLUX_KONTEXT_DIMS = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                         num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                         guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# The same layout at toy width, for running bench.py's code paths on a CPU.
MINI_DIMS = dict(FLUX_KONTEXT_DIMS, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


def full_size_transformer(device, dtype=None, **dims):
    """A randomly initialised FluxTransformer2DModel (FLUX_KONTEXT_DIMS updated by `dims`), frozen, built directly on
    `device` in `dtype` (default bf16): no fp32 copy of 12B weights on the host. Speed does not depend on the values."""
    import torch
    from diffusers import FluxTransformer2DModel

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.bfloat16)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**dict(FLUX_KONTEXT_DIMS, **dims))
    finally:
        torch.set_default_dtype(prev)
    return model.requires_grad_(False)


def random_entries(n: int, res: int, text_tokens: int, dims: dict = FLUX_KONTEXT_DIMS, control: bool = True,
                   seed: int = 0) -> list[dict]:
    """n cache entries as cache.py stores them (image_latents / control_latents [C, res/8, res/8], prompt_embeds
    [text_tokens, joint_attention_dim], pooled_prompt_embeds [pooled_projection_dim]), random, fp32 on the CPU."""
    import torch

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
    import torch

    return dict(empty_prompt_embeds=torch.zeros(text_tokens, dims["joint_attention_dim"]),
                empty_pooled_prompt_embeds=torch.zeros(dims["pooled_projection_dim"]))



def full_size_components(device, dtype=None, seed: int = 0) -> dict:
    """FLUX.1 Kontext's pipeline components at full size with random weights, built directly on `device` in `dtype`
    (default bf16): CLIP-L (123M), the T5-XXL encoder (4.7B), the FLUX VAE and full_size_transformer() (12B). Keys
    as FluxKontextPipeline's arguments (no scheduler). The tokenizers are the tiny ones (trained here, no download):
    their ids are valid in the full vocabularies, and speed and a same-modules parity check do not depend on them.
    CLIP pools at the tokenizer's own end-of-text id, as CLIP-L pools at its own."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = train_clip_tokenizer(TinySpec().clip_merges), train_t5_tokenizer()
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.bfloat16)
    try:
        with torch.device(device):
            # openai/clip-vit-large-patch14's text config; T5-XXL's encoder (google/t5-v1_1-xxl); FLUX.1's VAE
            clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                                num_hidden_layers=12, num_attention_heads=12,
                                                max_position_embeddings=77, hidden_act="quick_gelu",
                                                projection_dim=768, bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id))
            t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                         num_heads=64, feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                                         use_cache=False))
            vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                                layers_per_block=2, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                                use_quant_conv=False, use_post_quant_conv=False)
    finally:
        torch.set_default_dtype(prev)
    return dict(text_encoder=clip.eval().requires_grad_(False), tokenizer=tokenizer,
                text_encoder_2=t5.eval().requires_grad_(False), tokenizer_2=tokenizer_2,
                vae=vae.eval().requires_grad_(False), transformer=full_size_transformer(device, dtype).eval())


# ---------------------------------------------------------------- tiny random captioners (caption.py's tests)

# Bump when a builder below changes what it writes (the folder name is keyed by this and the library versions).
CAPTIONER_VERSION = 1


def _bpe_merges(words: Counter, splits: dict, n_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE merges over the corpus words (splits: word -> its symbols, merged in place), ties broken by the
    pair itself: the same corpus always gives the same merges (train_clip_tokenizer's rule)."""
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, count in words.items():
            s = splits[w]
            for p in zip(s, s[1:]):
                pairs[p] += count
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        for s in splits.values():
            i = 0
            while i < len(s) - 1:
                if (s[i], s[i + 1]) == best:
                    s[i:i + 2] = [s[i] + s[i + 1]]
                i += 1
    return merges


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
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_tiny_blip(out: str | Path, seed: int = 0) -> Path:
    """A randomly initialised BlipForConditionalGeneration + BlipProcessor folder (Salesforce/blip-image-captioning-*
    layout: config.json, model.safetensors, generation_config.json, processor and tokenizer files); 32x32 input.
    Weights are drawn wider than BLIP's init so that captions differ from image to image."""
    import torch
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
    import torch
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


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder to write (default: the cached tiny folder)")
    ap.add_argument("--wide", action="store_true", help="write the wider test variant")
    args = ap.parse_args()
    spec = TinySpec().wide() if args.wide else TinySpec()
    print(write_tiny(args.out, spec) if args.out else ensure_tiny(spec))
