"""Write a miniature FLUX.1 Kontext checkpoint in the exact diffusers folder layout.

Nothing is downloaded: the CLIP tokenizer (byte-level BPE) and the T5 tokenizer (Unigram) are trained on
the spot with the `tokenizers` library from a small built-in corpus, and every model is built from a config
and a seed: random text encoders, a VAE set to be near-inverse (near_inverse_vae), a transformer pre-trained
to copy its control image (fit_copy), so that a LoRA on the toy dataset has an edit to learn. The folder loads unchanged with `FluxKontextPipeline.from_pretrained(path)`.

    python tiny.py --out checkpoints/tiny            # write it
    from tiny import ensure_tiny; path = ensure_tiny()  # write once, reuse (keyed by spec + library versions)

Also the toy datasets the tiny configs train on (write_toy_dataset, write_masked_toy_dataset). Random models beyond
the tiny default (full-size builders, IP-Adapters, captioners) are fixtures.py's.
"""

import dataclasses
import hashlib
import json
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from atomic import lock, temp_dir_beside, user_mode_tree

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


# Bump when a builder of the tiny checkpoint changes what it writes (the folder name is keyed by it, the spec and the
# library versions). 2: the VAE is built near-inverse and the transformer is pre-trained to copy its control.
TINY_VERSION = 2


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
    vae_groups: int = 1  # near_inverse_vae's last GroupNorms need one group (its constant channels balance the mean)
    flux_layers: int = 1
    flux_single_layers: int = 1
    # 4 heads of 32, 12 rope dims each for rows and columns (a target token finds its control token): after
    # copy_steps the sampled copy misses by 0.2% of the latent's energy; 2 heads of 32 by 27%, 2 of 16 by over 100%
    flux_heads: int = 4
    flux_head_dim: int = 32
    flux_rope: tuple = (8, 12, 12)  # sums to flux_head_dim
    latent_channels: int = 16  # the VAE's; the transformer takes 4x (2x2 packing), as FLUX's 16 -> 64
    # fit_copy: the base learns to copy its control (as the real Kontext base can), so a LoRA only learns the edit
    # (0: the transformer stays random); ~50 s on 2 CPU cores, once per spec
    copy_steps: int = 1000
    copy_batch: int = 8
    copy_lr: float = 5e-3

    def wide(self) -> "TinySpec":
        return dataclasses.replace(self, clip_hidden=64, t5_d_model=64, flux_heads=8, flux_layers=2,
                                   flux_single_layers=2, copy_steps=0)

    def key(self) -> str:
        import diffusers
        import transformers

        blob = json.dumps([dataclasses.asdict(self), TINY_VERSION, diffusers.__version__, transformers.__version__],
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _corpus_lines() -> list[str]:
    lines = [l.strip() for l in _CORPUS.strip().splitlines() if l.strip()]
    return lines * 4


def _words(pre_tokenizer) -> Counter:
    words = Counter()
    for line in _corpus_lines():
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(line.lower()))
    return words


def _bpe_merges(words: Counter, splits: dict, n_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE merges over the corpus words (splits: word -> its symbols, merged in place), ties broken by the
    pair itself: the same corpus always gives the same merges."""
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
    merges = _bpe_merges(words, splits, n_merges)
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
    near_inverse_vae(vae)
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


def near_inverse_vae(vae, gain: float = 4.0, big: float = 32.0, lift: float = 8.0) -> None:
    """Set an AutoencoderKL's weights so that its latent is each 8x8 cell's mean colour c (RGB in [-1, 1]) spread
    over all latent channels, gain * Q c with Q's 3 columns the first DCT-II basis vectors (orthonormal; latents of
    random colours have unit variance, as FLUX's do), and decode(encode(x)) is x for images constant on 8x8 cells
    (the toy images), 8x8 blocks otherwise.

    A random tiny VAE decodes to noise, and fitting one on two CPU cores took minutes to learn even flat colours (the
    GroupNorms before conv_out drop each image's mean and scale). Here every residual branch is zeroed (resnet conv2,
    attention to_out: exact identities), the down/up-sampling convs average / copy, and the two GroupNorm + SiLU
    pairs are made linear: channels carry (c, -c, +big, -big), so the group's mean is 0 and its std ~ big * sqrt(2 / C)
    whatever the image, and SiLU(lift + x) - SiLU(lift - x) ~ 2 x SiLU'(lift) for |x| <~ 1."""
    import torch

    enc, dec = vae.encoder, vae.decoder
    lat, sf, shift = vae.config.latent_channels, vae.config.scaling_factor, vae.config.shift_factor
    if lat < 3 or min(vae.config.block_out_channels) < 8 or vae.config.norm_num_groups != 1:
        raise ValueError(f"near_inverse_vae needs latent_channels >= 3, block_out_channels >= 8 and norm_num_groups 1; "
                         f"got {lat}, {vae.config.block_out_channels}, {vae.config.norm_num_groups}")
    rgb, neg = range(3), range(3, 6)
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for name, m in vae.named_modules():
            if name.endswith(("norm1", "norm2", "group_norm")):
                m.weight.fill_(1.0)  # inside zeroed branches: any finite value; 1 keeps them well defined

        def carry(conv, taps, signal=1.0, consts=True):
            """conv maps (c, -c) to `signal` * the mean over `taps` of the same channels; +-big into channels 6, 7."""
            for ch in (*rgb, *neg):
                for dy, dx in taps:
                    conv.weight[ch, ch, dy, dx] = signal / len(taps)
            if consts:
                conv.bias[6], conv.bias[7] = big, -big

        def linear_norm(norm):  # GroupNorm -> SiLU: (c, -c) -> lift +- c (up to std's tiny image dependence)
            norm.weight[:6] = big * (2 / norm.num_channels) ** 0.5
            norm.bias.fill_(lift)

        centre = [(1, 1)]
        for i in rgb:  # encoder.conv_in: pixels -> (c, -c, +big, -big)
            enc.conv_in.weight[i, i, 1, 1], enc.conv_in.weight[i + 3, i, 1, 1] = 1.0, -1.0
        enc.conv_in.bias[6], enc.conv_in.bias[7] = big, -big
        for block in enc.down_blocks:
            for r in block.resnets:
                if r.conv_shortcut is not None:
                    r.conv_shortcut.weight[:8, :8, 0, 0] = torch.eye(8)
            for d in block.downsamplers or []:
                carry(d.conv, [(0, 0), (0, 1), (1, 0), (1, 1)])  # pad (0,1,0,1), stride 2: taps 0-1 are the 2x2 cell
        linear_norm(enc.conv_norm_out)
        k = torch.arange(lat, dtype=torch.float64)[:, None] + 0.5
        q = (torch.cos(torch.pi * k * torch.arange(3) / lat) * (2 / lat) ** 0.5)
        q[:, 0] /= 2 ** 0.5  # DCT-II's first basis vector is constant, scaled to unit length
        q = q.float()
        slope = float(torch.nn.functional.silu(torch.tensor(lift + 1.0)) -
                      torch.nn.functional.silu(torch.tensor(lift - 1.0)))  # = 2 SiLU'(lift), to <1e-3
        # mean = gain Q (silu(lift + c) - silu(lift - c)) / slope / sf + shift, so (mean - shift) * sf = gain Q c
        enc.conv_out.weight[:lat, :3, 1, 1] = gain * q / (slope * sf)
        enc.conv_out.weight[:lat, 3:6, 1, 1] = -gain * q / (slope * sf)
        enc.conv_out.bias[:lat] = shift
        enc.conv_out.bias[lat:] = -20.0  # logvar: a near-deterministic posterior (the pipelines take its mode)
        # decoder.conv_in: z = gain Q c / sf + shift -> (c, -c, +big, -big), c = Q^T (z - shift) sf / gain
        dec.conv_in.weight[:3, :, 1, 1] = q.T * sf / gain
        dec.conv_in.weight[3:6, :, 1, 1] = -q.T * sf / gain
        dec.conv_in.bias[:3] = -(q.T * sf / gain).sum(1) * shift
        dec.conv_in.bias[3:6] = (q.T * sf / gain).sum(1) * shift
        dec.conv_in.bias[6], dec.conv_in.bias[7] = big, -big
        for block in dec.up_blocks:
            for r in block.resnets:
                if r.conv_shortcut is not None:
                    r.conv_shortcut.weight[:8, :8, 0, 0] = torch.eye(8)
            for u in block.upsamplers or []:
                carry(u.conv, centre)  # nearest x2, then the centre tap copies
        linear_norm(dec.conv_norm_out)
        for i in rgb:
            dec.conv_out.weight[i, i, 1, 1], dec.conv_out.weight[i, i + 3, 1, 1] = 1 / slope, -1 / slope


def _cell_pictures(rng, n: int, size: int):
    """n pictures [n, 3, size, size] in [-1, 1]: a random background and one or two rectangles of random colours on
    the 8-pixel grid (what near_inverse_vae reconstructs exactly)."""
    import numpy as np
    import torch

    out = np.empty((n, size, size, 3), np.uint8)
    cells = size // 8
    for img in out:
        img[:] = rng.integers(0, 256, 3)
        for _ in range(int(rng.integers(1, 3))):
            h, w = rng.integers(1, cells // 2 + 1, 2)
            y, x = rng.integers(0, cells - h + 1), rng.integers(0, cells - w + 1)
            img[8 * y:8 * (y + h), 8 * x:8 * (x + w)] = rng.integers(0, 256, 3)
    return torch.from_numpy(out).permute(0, 3, 1, 2).float() / 127.5 - 1


def fit_copy(c: dict, spec: TinySpec, size: int = 64, max_sequence_length: int = 32) -> None:
    """Pre-train c["transformer"] (full weights, in place) for spec.copy_steps AdamW steps to return its control
    image: flow matching with target = control, on _cell_pictures and random corpus prompts. The real Kontext base
    can copy its context image; this gives the miniature that ability, so that a LoRA trained on the toy dataset
    has an edit to learn and a copy-the-control baseline to beat.

    A fixed fitting recipe for a test fixture, not a second trainer: tiny.py is the bottom layer and may not import
    objective.py, so the two lines of FLUX's convention (x_t = (1 - t) x0 + t noise, target noise - x0) are written
    here too; tests/test_tiny.py checks with objective.flow_matching_loss that the written model copies under the
    training objective. Packing and ids are diffusers' (FluxKontextPipeline._pack_latents, _prepare_latent_image_ids)."""
    import numpy as np
    import torch
    from diffusers import FluxKontextPipeline

    if spec.copy_steps <= 0:
        return
    pipe, model, vae = FluxKontextPipeline(**c), c["transformer"], c["vae"]
    prompts = sorted({w for line in _corpus_lines() for w in line.replace(",", ".").split(".") if w.strip()})
    rng, g = np.random.default_rng(spec.seed), torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None,
                                                      max_sequence_length=max_sequence_length)
    hw = size // 8
    ids = FluxKontextPipeline._prepare_latent_image_ids(1, hw // 2, hw // 2, "cpu", torch.float32)
    control_ids = ids.clone()
    control_ids[:, 0] = 1  # FluxKontextPipeline.prepare_latents: the context image's ids carry 1 in channel 0
    img_ids = torch.cat([ids, control_ids])
    opt = torch.optim.AdamW(model.parameters(), lr=spec.copy_lr, weight_decay=0.0)
    model.train()
    with torch.enable_grad():
        # ~50 s once on 2 CPU cores, before a first run's first line of its own: say what the wait is
        for step in tqdm(range(spec.copy_steps), desc="writing the tiny model (once)", unit="step",
                         mininterval=1.0):
            b = spec.copy_batch
            with torch.no_grad():
                z = vae.encode(_cell_pictures(rng, b, size)).latent_dist.mode()
                x0 = FluxKontextPipeline._pack_latents((z - vae.config.shift_factor) * vae.config.scaling_factor,
                                                       b, z.shape[1], hw, hw)
            noise, t = torch.randn(x0.shape, generator=g), torch.rand(b, generator=g)
            which = torch.randint(len(prompts), (b,), generator=g)
            x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise
            pred = model(hidden_states=torch.cat([x_t, x0], 1), timestep=t, guidance=torch.ones(b),
                         pooled_projections=pooled[which], encoder_hidden_states=embeds[which], txt_ids=text_ids,
                         img_ids=img_ids, return_dict=False)[0][:, :x0.shape[1]]
            loss = ((pred - (noise - x0)) ** 2).mean()
            for group in opt.param_groups:  # warm up, then decay linearly to 0
                group["lr"] = spec.copy_lr * min(1.0, (step + 1) / 20) * (1 - step / spec.copy_steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval().zero_grad(set_to_none=True)


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
    tmp = temp_dir_beside(out)
    try:
        components = build_components(spec)
        fit_copy(components, spec)
        FluxKontextPipeline(**components).save_pretrained(tmp, safe_serialization=True)
        (tmp / "tiny_spec.json").write_text(json.dumps(dataclasses.asdict(spec)))
        user_mode_tree(tmp)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def default_root() -> Path:
    return Path(os.environ.get("KONTEXT_LORA_HOME", Path(__file__).resolve().parent / ".kontext_lora"))


def ensure_tiny(spec: TinySpec = TinySpec(), root: str | Path | None = None) -> Path:
    """Path of the tiny checkpoint for `spec`, writing it first if absent (keyed by content, not by name)."""
    path = Path(root or default_root()) / f"tiny-{spec.key()}"
    if (path / "model_index.json").exists():
        return path
    # one writer: processes started together (two first runs, test workers) wait for it instead of each spending the
    # minute and replacing the others' folder under them
    held, _ = lock(path.parent / f".{path.name}.lock", blocking=False)
    if held is None:
        print(f"waiting for another process writing the tiny model {path} ...", flush=True)
        held, _ = lock(path.parent / f".{path.name}.lock", blocking=True)
    with held:
        if not (path / "model_index.json").exists():
            write_tiny(path, spec)
    return path


# Bump when write_toy_dataset changes what it writes (the folder name carries it). 2: grey backgrounds, coloured
# squares on the 8-pixel grid (near_inverse_vae reconstructs them exactly).
TOY_VERSION = 2
MASKED_TOY_VERSION = 1  # write_masked_toy_dataset


def _toy_square(rng, cells: int, red):
    """The toy edit's square: (top, left) in pixels, side in 8-pixel cells (2-4 of 8), a saturated colour far from
    red; drawn from `rng` in this order (the toy datasets' contents depend on it)."""
    import numpy as np

    side = int(rng.integers(max(1, cells // 4), cells // 2 + 1))
    y, x = 8 * rng.integers(0, cells - side + 1, 2)
    colour = rng.integers(0, 256, 3)
    while colour.max() - colour.min() < 100 or np.abs(colour - red).sum() < 250:
        colour = rng.integers(0, 256, 3)
    return y, x, side, colour


def write_toy_dataset(out: str | Path, n: int = 24, size: int = 64, seed: int = 0) -> Path:
    """A synthetic edit dataset in the folder layout: control = a coloured square (side 2-4 cells of 8 pixels, on the
    8-pixel grid, a saturated colour far from red) on a grey background, target = the same picture with the square
    painted red, caption "make the square red". The control is needed (where the square is, the grey level), and
    copying it is a real but beatable baseline (right everywhere but the square)."""
    import numpy as np
    from PIL import Image

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)  # the temp folder must be on out's filesystem for the rename
    tmp = temp_dir_beside(out)
    red = np.array([230, 20, 20])
    try:
        (tmp / "images").mkdir()
        (tmp / "control").mkdir()
        rng = np.random.default_rng(seed)
        cells = size // 8
        for i in range(n):
            img = np.empty((size, size, 3), np.uint8)
            img[:] = rng.integers(40, 201)
            y, x, side, colour = _toy_square(rng, cells, red)
            img[y:y + 8 * side, x:x + 8 * side] = colour
            Image.fromarray(img).save(tmp / "control" / f"{i:03d}.png")
            img[y:y + 8 * side, x:x + 8 * side] = red
            Image.fromarray(img).save(tmp / "images" / f"{i:03d}.png")
            (tmp / "images" / f"{i:03d}.txt").write_text("make the square red")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_toy_dataset(n: int = 24, size: int = 64, seed: int = 0, root: str | Path | None = None) -> Path:
    path = Path(root or default_root()) / f"toy-edit-v{TOY_VERSION}-{n}-{size}-{seed}"
    if not (path / "images").is_dir():
        write_toy_dataset(path, n, size, seed)
    return path


def write_masked_toy_dataset(out: str | Path, n: int = 24, size: int = 64, seed: int = 0) -> Path:
    """A synthetic masked edit in the pairs layout (data.py (c)): context = a coloured square on a background of
    random grey cells (8-pixel cells: the tiny VAE's latent is each cell's colour), target = the same with the
    square painted red, mask = the square (white), depth = a 16-bit grayscale map (the square near, the background
    far), prompts.txt "make the square red" per pair. Outside the mask target and context are the same pixels, so
    the dual masked loss's outside term has an exact answer: copy the context."""
    import numpy as np
    from PIL import Image

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out)
    red = np.array([230, 20, 20])
    try:
        for d in ("target", "context", "masks", "depth"):
            (tmp / d).mkdir()
        rng = np.random.default_rng(seed)
        cells = size // 8
        for i in range(n):
            grey = rng.integers(40, 201, (cells, cells))
            img = np.repeat(np.repeat(grey, 8, 0), 8, 1)[..., None].repeat(3, 2).astype(np.uint8)
            y, x, side, colour = _toy_square(rng, cells, red)
            mask = np.zeros((size, size), np.uint8)
            mask[y:y + 8 * side, x:x + 8 * side] = 255
            img[mask > 0] = colour
            Image.fromarray(img).save(tmp / "context" / f"{i:03d}.png")
            img[mask > 0] = red
            Image.fromarray(img).save(tmp / "target" / f"{i:03d}.png")
            Image.fromarray(mask).save(tmp / "masks" / f"{i:03d}.png")
            depth = np.where(mask > 0, 60000, 12000 + 800 * np.arange(size)[:, None]).astype(np.uint16)
            Image.fromarray(depth).save(tmp / "depth" / f"{i:03d}.png")  # mode I;16
        (tmp / "prompts.txt").write_text("make the square red\n" * n)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_masked_toy_dataset(n: int = 24, size: int = 64, seed: int = 0, root: str | Path | None = None) -> Path:
    path = Path(root or default_root()) / f"masked-toy-v{MASKED_TOY_VERSION}-{n}-{size}-{seed}"
    if not (path / "target").is_dir():
        write_masked_toy_dataset(path, n, size, seed)
    return path


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="folder to write (default: the cached tiny folder)")
    ap.add_argument("--wide", action="store_true", help="write the wider test variant")
    args = ap.parse_args()
    spec = TinySpec().wide() if args.wide else TinySpec()
    print(write_tiny(args.out, spec) if args.out else ensure_tiny(spec))
