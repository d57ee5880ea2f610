"""merge.py through convert.py: adapters merged into the tiny base equal diffusers' fused model; a LoRA extracted from
a fine-tune reproduces its delta at full rank and has exactly the SVD's error at low rank; quantized bases refused."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert
from config import TrainConfig
from lora import add_lora, load_lora
from merge import layer_kind

TARGETS_A = ("to_q", "to_k", "to_v", "to_out.0", "proj_mlp")
TARGETS_B = ("to_q", "proj_out")


def base_transformer(tiny_path):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(tiny_path, subfolder="transformer", dtype=torch.float32)


def random_lora(tiny_path, path, targets, rank, alpha, seed):
    """A LoRA file (train.py's default comfyui format) with random A and B (B = 0 would merge to nothing)."""
    t = base_transformer(tiny_path)
    params = add_lora(t, TrainConfig(rank=rank, alpha=alpha, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.data = 0.2 * torch.randn(p.shape, generator=g)
    convert.save_lora_as(t, path, "comfyui")
    return path


def inputs(t, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = t.config
    n, txt = 16, 5
    return dict(hidden_states=torch.randn(1, n, c.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, txt, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.5]), guidance=torch.tensor([1.0]),
                img_ids=torch.cat([torch.zeros(n, 1), torch.arange(n).float()[:, None].expand(n, 2)], 1),
                txt_ids=torch.zeros(txt, 3), return_dict=False)


def test_merge_equals_diffusers_fused_model(tmp_path, tiny_path, capsys):
    """One file at strength 1: every tensor torch.equal to FluxKontextPipeline.load_lora_weights + fuse_lora +
    unload_lora_weights (diffusers' own fusing). Two files at (1.0, 0.5): each merged weight is W + sum s * alpha/r *
    B @ A (fp32 rounding), and the merged model's output equals the model running both adapters unfused (fp32
    rounding: W x + B (A x) against (W + B A) x). --format comfyui-model writes that model under BFL names."""
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel

    a = random_lora(tiny_path, tmp_path / "a.safetensors", TARGETS_A, 4, 8.0, 0)
    b = random_lora(tiny_path, tmp_path / "b.safetensors", TARGETS_B, 2, 2.0, 1)
    convert.main([str(a), str(tmp_path / "one"), "--merge", "--base", str(tiny_path)])
    merged = load_file(tmp_path / "one" / "transformer" / "diffusion_pytorch_model.safetensors")
    pipe = FluxKontextPipeline.from_pretrained(tiny_path, dtype=torch.float32)
    pipe.load_lora_weights(str(a), adapter_name="a")
    pipe.fuse_lora(lora_scale=1.0, adapter_names=["a"])
    pipe.unload_lora_weights()
    fused = pipe.transformer.state_dict()
    assert merged.keys() == fused.keys() and all(torch.equal(merged[k], fused[k]) for k in merged)
    base = base_transformer(tiny_path).state_dict()
    assert not torch.equal(merged["transformer_blocks.0.attn.to_q.weight"], base["transformer_blocks.0.attn.to_q.weight"])

    convert.main([str(a), str(b), str(tmp_path / "two"), "--merge", "--base", str(tiny_path), "--strength", "1", "0.5"])
    assert "2 adapter(s) merged at strength 1.0, 0.5" in capsys.readouterr().out
    two = FluxTransformer2DModel.from_pretrained(tmp_path / "two", subfolder="transformer", dtype=torch.float32)
    sd = two.state_dict()
    expect = {k: v.clone() for k, v in base.items()}
    for f, s in ((a, 1.0), (b, 0.5)):
        lora = load_file(f)
        for k in lora:
            if k.endswith(".alpha"):
                m = k.removeprefix("transformer.").removesuffix(".alpha")
                A, B = lora[f"transformer.{m}.lora_A.weight"], lora[f"transformer.{m}.lora_B.weight"]
                expect[f"{m}.weight"] += s * float(lora[k]) / A.shape[0] * B @ A
    for k in sd:
        torch.testing.assert_close(sd[k], expect[k], rtol=1e-6, atol=1e-6)
    targeted = {k.removeprefix("transformer.").removesuffix(".alpha") + ".weight"
                for f in (a, b) for k in load_file(f) if k.endswith(".alpha")}
    assert {k for k in sd if not torch.equal(sd[k], base[k])} == targeted
    live = base_transformer(tiny_path)
    load_lora(live, a, "a", 1.0)
    load_lora(live, b, "b", 0.5)
    out_live, out_merged = live(**inputs(live))[0], two(**inputs(two))[0]
    torch.testing.assert_close(out_merged, out_live, rtol=1e-5, atol=1e-5)
    assert (out_live - base_transformer(tiny_path)(**inputs(live))[0]).abs().max() > 1e-2

    convert.main([str(a), str(b), str(tmp_path / "two.safetensors"), "--merge", "--base", str(tiny_path),
                  "--strength", "1", "0.5", "--format", "comfyui-model"])
    bfl, ref = load_file(tmp_path / "two.safetensors"), convert.to_bfl_model(sd)
    assert bfl.keys() == ref.keys() and all(torch.equal(bfl[k], ref[k]) for k in bfl)


def fine_tune(tiny_path, out, seed=0):
    """A "full fine-tune" of the tiny transformer: random deltas on a few Linears (full rank on two, rank 1 on one),
    one bias changed too. Returns (folder, {module: delta})."""
    t = base_transformer(tiny_path)
    g = torch.Generator().manual_seed(seed)
    mods = dict(t.named_modules())
    deltas = {}
    for name, rank in (("transformer_blocks.0.attn.to_q", None), ("single_transformer_blocks.0.proj_mlp", None),
                       ("transformer_blocks.0.ff.net.2", 1)):
        w = mods[name].weight
        d = (0.05 * torch.randn(w.shape, generator=g) if rank is None else
             torch.randn(w.shape[0], 1, generator=g) @ torch.randn(1, w.shape[1], generator=g) * 0.01)
        with torch.no_grad():
            w += d
        deltas[name] = d
    with torch.no_grad():
        mods["transformer_blocks.0.attn.to_q"].bias += 0.1
    t.save_pretrained(out)
    return out, deltas


def test_extract_full_rank_reproduces_the_delta_and_low_rank_has_the_svd_error(tmp_path, tiny_path, capsys):
    tuned, deltas = fine_tune(tiny_path, tmp_path / "tuned")
    big = 10_000
    convert.main([str(tuned), str(tmp_path / "full.safetensors"), "--extract", str(big), "--base", str(tiny_path)])
    printed = capsys.readouterr().out
    assert "transformer_blocks.*.attn.to_q" in printed and "1 Linears' biases changed" in printed
    mods = convert.modules_of(*convert.read_lora(tmp_path / "full.safetensors"))
    assert set(mods) == set(deltas)
    for m, (A, B, alpha) in mods.items():
        assert alpha == A.shape[0] == min(deltas[m].shape)
        torch.testing.assert_close(alpha / A.shape[0] * B @ A, deltas[m], rtol=0, atol=2e-6)

    convert.main([str(tuned), str(tmp_path / "r2.safetensors"), "--extract", "2", "--base", str(tiny_path)])
    lines = capsys.readouterr().out.splitlines()
    low = convert.modules_of(*convert.read_lora(tmp_path / "r2.safetensors"))
    for m, (A, B, alpha) in low.items():
        s = torch.linalg.svdvals(deltas[m].double())
        err = float(((deltas[m].double() - (B @ A).double()) ** 2).sum())
        assert A.shape[0] == 2
        assert err == pytest.approx(float((s[2:] ** 2).sum()), rel=1e-4, abs=1e-9), m
        kept = float((s[:2] ** 2).sum() / (s ** 2).sum())
        line = next(ln for ln in lines if ln.strip().startswith(layer_kind(m)))
        assert f"{100 * kept:7.3f} %" in line, (line, kept)
    assert float(((deltas["transformer_blocks.0.attn.to_q"] - low["transformer_blocks.0.attn.to_q"][1] @
                   low["transformer_blocks.0.attn.to_q"][0]) ** 2).sum()) > 1e-3  # rank 2 < full: an error remains

    # the extracted LoRA, merged back into the base at full rank, gives the fine-tune's weights (biases aside)
    convert.main([str(tmp_path / "full.safetensors"), str(tmp_path / "back"), "--merge", "--base", str(tiny_path)])
    back = load_file(tmp_path / "back" / "transformer" / "diffusion_pytorch_model.safetensors")
    ref = load_file(tuned / "diffusion_pytorch_model.safetensors")
    for k in ref:
        if k != "transformer_blocks.0.attn.to_q.bias":
            torch.testing.assert_close(back[k], ref[k], rtol=0, atol=5e-6)


def quantized_copy(tiny_path, out):
    """The tiny transformer folder with its weights stored as float8 (what quant.is_quantized_checkpoint detects)."""
    out.mkdir()
    shutil.copy(tiny_path / "transformer" / "config.json", out / "config.json")
    sd = load_file(tiny_path / "transformer" / "diffusion_pytorch_model.safetensors")
    save_file({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in sd.items()},
              out / "diffusion_pytorch_model.safetensors")
    return out


def test_quantized_bases_and_bad_arguments_refused(tmp_path, tiny_path):
    q = quantized_copy(tiny_path, tmp_path / "q")
    a = random_lora(tiny_path, tmp_path / "a.safetensors", TARGETS_B, 2, 2.0, 0)
    with pytest.raises(ValueError, match="quantized checkpoint"):
        convert.main([str(a), str(tmp_path / "m"), "--merge", "--base", str(q)])
    with pytest.raises(ValueError, match="quantized checkpoint"):
        convert.main([str(tiny_path / "transformer"), str(tmp_path / "x.safetensors"), "--extract", "4", "--base", str(q)])
    with pytest.raises(ValueError, match="--strength: give one value .* 2 adapter files"):
        convert.main([str(a), str(a), str(tmp_path / "m"), "--merge", "--base", str(tiny_path), "--strength", "1", "2",
                      "3"])
    with pytest.raises(ValueError, match="same Linear weights: nothing to extract"):
        convert.main([str(tiny_path), str(tmp_path / "x.safetensors"), "--extract", "4", "--base", str(tiny_path)])
    with pytest.raises(SystemExit):
        convert.main([str(a), str(tmp_path / "m"), "--merge"])  # no --base
    assert not (tmp_path / "m").exists() and not (tmp_path / "x.safetensors").exists()
    assert json.loads((tiny_path / "transformer" / "config.json").read_text())["_class_name"] == "FluxTransformer2DModel"
