"""convert.py: the comfyui / kohya / diffusers LoRA files against their readers (FluxKontextPipeline.load_lora_weights
and lora_state_dict, i.e. diffusers' _convert_kohya_flux_lora_to_diffusers; ComfyUI's delta alpha / rank * up @ down;
our lora.load_lora), the CLI, and train.py's TrainConfig.lora_format.

Tiny transformer in fp32 on the CPU (one double and one single block). diffusers' kohya converter splits linear1 at
FLUX.1's full size (3072 / 3072 / 3072 / 12288), so linear1 is checked on full-size LoRA tensors without a model.
"""

import dataclasses
import typing
from pathlib import Path

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert
from config import TrainConfig
from lora import load_lora, read_lora, save_lora
from test_lora import fresh_transformer, run, with_lora
from test_train import run as train, tiny_cfg

# every Linear of the tiny model that diffusers' kohya reader maps back on the tiny model: the double block's (q/k/v
# fused to img_attn_qkv; add_k_proj left out, so txt_attn_qkv has a zero block), the single block's linear2 and
# modulation (its q/k/v/proj_mlp form linear1: full size only, test_kohya_linear1_full_size)
BLOCKS = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
          "add_q_proj", "add_v_proj", "to_out.0", "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
          "ff_context.net.2", "norm1.linear", "norm1_context.linear", "single_transformer_blocks.0.proj_out",
          "norm.linear")
# outside the blocks (img_in, txt_in, time_in, vector_in, guidance_in, final_layer): diffusers' kohya reader drops
# these (their keys lack the 'transformer.' prefix, diffusers 0.42.1); ours and ComfyUI's read them
OUTSIDE = ("x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1",
           "time_text_embed.text_embedder.linear_2", "time_text_embed.guidance_embedder.linear_1", "proj_out",
           "norm_out.linear")


def peft_deltas(transformer) -> dict[str, torch.Tensor]:
    """{module: scaling * B @ A}, the weight delta of every LoRA layer, as peft applies it."""
    return {n: m.scaling["default"] * (m.lora_B["default"].weight @ m.lora_A["default"].weight)
            for n, m in transformer.named_modules() if isinstance(m, BaseTunerLayer) and "default" in m.lora_A}


def comfy_delta(sd: dict, key: str, down: str, up: str) -> torch.Tensor:
    """ComfyUI's calculate_weight for a "lora" patch: alpha / rank (rank = the down matrix's rows; 1.0 without an
    alpha tensor) times up @ down."""
    alpha = sd.get(f"{key}.alpha")
    scale = 1.0 if alpha is None else alpha.item() / sd[f"{key}.{down}"].shape[0]
    return scale * (sd[f"{key}.{up}"] @ sd[f"{key}.{down}"])


def pipe_output(pipe, path) -> torch.Tensor:
    pipe.load_lora_weights(str(path))
    try:
        return run(pipe.transformer)
    finally:
        pipe.unload_lora_weights()


def loaded_output(tiny_path, path) -> torch.Tensor:
    t = fresh_transformer(tiny_path)
    load_lora(t, path)
    return run(t)


def close(a, b):
    # kohya's scale is computed in the alpha tensor's fp32 and folded into the weights: fp32 rounding only
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank,alpha", [(4, 4.0), (3, 8.0)])
def test_kohya_loads_in_pipeline_like_diffusers(tmp_path, tiny_path, pipe, rank, alpha):
    t, _ = with_lora(tiny_path, rank=rank, alpha=alpha, targets=BLOCKS)
    want = run(t)
    save_lora(t, tmp_path / "d.safetensors")
    convert.convert_file(tmp_path / "d.safetensors", tmp_path / "k.safetensors", "kohya")
    sd = load_file(tmp_path / "k.safetensors")
    assert all(k.startswith("lora_unet_") for k in sd)
    qkv = "lora_unet_double_blocks_0_txt_attn_qkv"
    assert sd[f"{qkv}.lora_down.weight"].shape[0] == 3 * rank  # q, k, v blocks of rank r each
    assert sd[f"{qkv}.alpha"].item() == alpha * 3  # alpha / (3 r) == alpha / r: the strength is unchanged
    up = sd[f"{qkv}.lora_up.weight"]
    w = up.shape[0] // 3  # the inner dim: q, k, v rows stacked
    assert not up[w:2 * w].any() and not sd[f"{qkv}.lora_down.weight"][rank:2 * rank].any()  # k: zero blocks
    assert up[:w, :rank].any() and not up[:w, rank:].any()  # block-diagonal

    base = run(pipe.transformer)
    ours = pipe_output(pipe, tmp_path / "d.safetensors")
    assert close(ours, want) and not torch.allclose(ours, base)
    kohya = pipe_output(pipe, tmp_path / "k.safetensors")
    assert close(kohya, ours), (kohya - ours).abs().max()
    assert torch.equal(run(pipe.transformer), base)


@pytest.mark.parametrize("members", [("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), ("attn.to_q", "attn.to_v")])
def test_kohya_linear1_full_size(members):
    """linear1 (and a double block's qkv) at FLUX.1's sizes through FluxKontextPipeline.lora_state_dict (diffusers'
    kohya converter): each module gets back its own delta, an untrained member a zero one."""
    from diffusers import FluxKontextPipeline

    g = torch.Generator().manual_seed(0)
    dim, rank, alpha = 3072, 4, 16.0
    names = [f"single_transformer_blocks.0.{m}" for m in members] + ["transformer_blocks.0.attn.to_k"]
    mods = {n: (torch.randn(rank, dim, generator=g), torch.randn(4 * dim if "proj_mlp" in n else dim, rank,
                                                                 generator=g), alpha) for n in names}
    sd, _ = convert.to_kohya(mods)
    assert sd["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (7 * dim, 4 * rank)
    back = FluxKontextPipeline.lora_state_dict(sd)
    x = torch.randn(dim, 3, generator=g)
    for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"):
        key = f"transformer.single_transformer_blocks.0.{m}"
        got = back[f"{key}.lora_B.weight"] @ (back[f"{key}.lora_A.weight"] @ x)  # alpha folded in by diffusers
        if f"single_transformer_blocks.0.{m}" in mods:
            a, b, _ = mods[f"single_transformer_blocks.0.{m}"]
            assert close(got, alpha / rank * (b @ (a @ x)))
        else:
            assert not got.any()
    key = "transformer.transformer_blocks.0.attn"
    assert not (back[f"{key}.to_q.lora_B.weight"] @ back[f"{key}.to_q.lora_A.weight"]).any()
    a, b, _ = mods["transformer_blocks.0.attn.to_k"]
    assert close(back[f"{key}.to_k.lora_B.weight"] @ (back[f"{key}.to_k.lora_A.weight"] @ x),
                 alpha / rank * (b @ (a @ x)))


@pytest.mark.parametrize("rank,alpha", [(4, 16.0), (3, 8.0)])
def test_comfyui_file_alphas_deltas_and_both_loaders(tmp_path, tiny_path, pipe, rank, alpha):
    t, _ = with_lora(tiny_path, rank=rank, alpha=alpha, targets=BLOCKS + OUTSIDE)
    want = run(t)
    path = tmp_path / "c.safetensors"
    convert.save_lora_as(t, path, "comfyui")
    sd = load_file(path)
    with safe_open(path, "pt") as f:
        assert "lora_adapter_metadata" not in (f.metadata() or {})  # diffusers refuses it beside .alpha tensors
    deltas = peft_deltas(t)
    assert len(deltas) >= len(BLOCKS + OUTSIDE) and set(sd) == {
        f"transformer.{m}.{s}" for m in deltas for s in ("lora_A.weight", "lora_B.weight", "alpha")}
    for m, delta in deltas.items():
        a = sd[f"transformer.{m}.alpha"]
        assert a.ndim == 0 and a.dtype == torch.float32 and a.item() == alpha
        assert torch.equal(comfy_delta(sd, f"transformer.{m}", "lora_A.weight", "lora_B.weight"), delta), m

    # the one file serves diffusers and our loader too: the same layers, weights and scales as the diffusers file
    # (outputs to fp32 rounding: CPU GEMMs on equal weights differ in the last bits from one load to another)
    save_lora(t, tmp_path / "d.safetensors")
    pipe.load_lora_weights(str(path))
    try:
        # diffusers divides the fp32 alpha tensor: the scale rounded to fp32 (peft's own is a python float)
        assert {n: float(m.scaling["default_0"]) for n, m in pipe.transformer.named_modules()
                if isinstance(m, BaseTunerLayer)} == {m: pytest.approx(alpha / rank, rel=1e-7) for m in deltas}
        assert all(torch.equal(m.lora_A["default_0"].weight, sd[f"transformer.{n}.lora_A.weight"])
                   for n, m in pipe.transformer.named_modules() if isinstance(m, BaseTunerLayer))
        from_comfyui = run(pipe.transformer)
    finally:
        pipe.unload_lora_weights()
    assert close(from_comfyui, pipe_output(pipe, tmp_path / "d.safetensors"))
    assert close(from_comfyui, want), (from_comfyui - want).abs().max()
    assert close(loaded_output(tiny_path, path), want)
    _, meta = read_lora(path)
    assert meta["transformer.lora_alpha"] == alpha and meta["transformer.r"] == rank

    # the diffusers file carries no alpha tensor: ComfyUI would apply rank / alpha of the strength
    d = load_file(tmp_path / "d.safetensors")
    m = next(iter(deltas))
    assert torch.allclose(comfy_delta(d, f"transformer.{m}", "lora_A.weight", "lora_B.weight") * alpha / rank,
                          deltas[m], rtol=1e-6, atol=1e-7)


def test_load_lora_reads_kohya_like_diffusers(tmp_path, tiny_path):
    t, _ = with_lora(tiny_path, rank=4, alpha=8.0, targets=BLOCKS + OUTSIDE)
    save_lora(t, tmp_path / "d.safetensors")
    convert.convert_file(tmp_path / "d.safetensors", tmp_path / "k.safetensors", "kohya")
    assert {"lora_unet_img_in.alpha", "lora_unet_final_layer_linear.alpha",
            "lora_unet_final_layer_adaLN_modulation_1.alpha"} <= set(load_file(tmp_path / "k.safetensors"))
    ours = loaded_output(tiny_path, tmp_path / "d.safetensors")
    kohya = loaded_output(tiny_path, tmp_path / "k.safetensors")
    assert torch.equal(ours, run(t))
    assert close(kohya, ours), (kohya - ours).abs().max()
    # and back: kohya -> diffusers (the scale now folded into the weights by diffusers' converter, alpha = rank)
    convert.convert_file(tmp_path / "k.safetensors", tmp_path / "d2.safetensors", "diffusers")
    assert close(loaded_output(tiny_path, tmp_path / "d2.safetensors"), ours)


def test_tiny_linear1_kohya_fails_clearly(tmp_path, tiny_path):
    t, _ = with_lora(tiny_path, rank=2, alpha=2.0, targets=("to_q",))  # the single block's to_q: linear1
    save_lora(t, tmp_path / "d.safetensors")
    convert.convert_file(tmp_path / "d.safetensors", tmp_path / "k.safetensors", "kohya")
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in load_file(tmp_path / "k.safetensors")
    with pytest.raises(ValueError, match=r"k\.safetensors.*not in the supported format.*FLUX\.1's full size"):
        load_lora(fresh_transformer(tiny_path), tmp_path / "k.safetensors")


def test_cli(tmp_path, tiny_path, capsys):
    t, _ = with_lora(tiny_path, rank=4, alpha=16.0, targets=BLOCKS)
    save_lora(t, tmp_path / "d.safetensors")
    convert.main([str(tmp_path / "d.safetensors"), str(tmp_path / "k.safetensors"), "--format", "kohya"])
    assert "wrote" in capsys.readouterr().out
    convert.main([str(tmp_path / "k.safetensors"), str(tmp_path / "c.safetensors"), "--format", "comfyui"])
    assert close(loaded_output(tiny_path, tmp_path / "c.safetensors"), run(t))

    save_file({"transformer.foo.lora_A.weight": torch.zeros(2, 4), "transformer.foo.lora_B.weight": torch.zeros(4, 2)},
              tmp_path / "foo.safetensors")
    with pytest.raises(ValueError, match=r"'foo' has no name in kohya's FLUX\.1 layout"):
        convert.main([str(tmp_path / "foo.safetensors"), str(tmp_path / "x.safetensors"), "--format", "kohya"])
    save_file({"lora_unet_double_blocks_0_img_attn_qkvx.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_double_blocks_0_img_attn_qkvx.lora_up.weight": torch.zeros(4, 2)},
              tmp_path / "wrongkey.safetensors")
    with pytest.raises(ValueError, match=r"wrongkey\.safetensors.*not in the supported format.*Incompatible keys"):
        convert.main([str(tmp_path / "wrongkey.safetensors"), str(tmp_path / "x.safetensors"), "--format", "comfyui"])
    assert not (tmp_path / "x.safetensors").exists()

    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(4, 4)}, tmp_path / "model.safetensors")
    with pytest.raises(SystemExit) as exit_:
        convert.cli([str(tmp_path / "model.safetensors"), str(tmp_path / "x.safetensors"), "--format", "kohya"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.startswith("convert.py: error: LoRA file") and "model.safetensors" in err
    assert "are not LoRA weights" in err and "is it a LoRA file?" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_lora_format_choice():
    hint = typing.get_type_hints(TrainConfig)["lora_format"]
    assert set(typing.get_args(hint)) == set(convert.WRITERS) and TrainConfig().lora_format == "comfyui"


@pytest.mark.parametrize("fmt", ["comfyui", "kohya"])
def test_train_writes_lora_format(tmp_path, pipe, fmt):
    cfg = tiny_cfg(tmp_path, steps=2, batch_size=1, cached=False)  # encodes 2 samples, not the dataset
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lora_format=fmt))
    result = train(cfg)
    sd = load_file(result["lora"])
    deltas = peft_deltas(result["transformer"])
    ckpt = next((Path(cfg.out_dir) / "checkpoints").glob("lora-*"))
    assert all(".lora_A." in k or ".lora_B." in k for k in load_file(ckpt / "lora.safetensors"))  # ours, for resume
    if fmt == "comfyui":
        assert {k for k in sd if k.endswith(".alpha")} == {f"transformer.{m}.alpha" for m in deltas}
        assert torch.equal(pipe_output(pipe, result["lora"]), run(result["transformer"]))
        return
    # kohya: ComfyUI's delta of each BFL module = its diffusers modules' deltas stacked in BFL's row order
    assert all(k.startswith("lora_unet_") for k in sd)
    assert sd["lora_unet_single_blocks_0_linear1.alpha"].item() == cfg.train.alpha * 4  # rank 4 r
    fused = {"double_blocks_0_img_attn_qkv": [f"transformer_blocks.0.attn.to_{c}" for c in "qkv"],
             "single_blocks_0_linear1": [f"single_transformer_blocks.0.attn.to_{c}" for c in "qkv"] +
             ["single_transformer_blocks.0.proj_mlp"],
             "double_blocks_0_img_attn_proj": ["transformer_blocks.0.attn.to_out.0"],
             "single_blocks_0_linear2": ["single_transformer_blocks.0.proj_out"], "final_layer_linear": ["proj_out"]}
    assert {k.split(".")[0] for k in sd} == {f"lora_unet_{n}" for n in fused}
    for name, members in fused.items():
        got = comfy_delta(sd, f"lora_unet_{name}", "lora_down.weight", "lora_up.weight")
        assert close(got, torch.cat([deltas[m] for m in members])), name


# ---------------------------------------------------------------- --format comfyui-model (train.mode full's result)


def test_comfyui_model_round_trips_through_diffusers_key_map(tiny_path):
    """convert.to_bfl_model, then diffusers' own single-file converter (convert_flux_transformer_checkpoint_to_
    diffusers, what from_single_file runs on a BFL checkpoint) gives back every tensor exactly. That converter splits
    linear1 at FLUX.1's width (3072, hard-coded), so the tiny model's keys carry full-width rows here: each Linear's
    out_features x 24 (128 -> 3072, 512 -> 12288), 2 input columns; the RMS norms' scales as they are."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    tiny = load_file(next((tiny_path / "transformer").glob("*.safetensors")))
    g = torch.Generator().manual_seed(0)
    sd = {k: (v.clone() if ".norm_" in k else torch.randn(v.shape[0] * 24, *([2] if v.ndim == 2 else []), generator=g))
          for k, v in tiny.items()}
    bfl = convert.to_bfl_model(sd)
    assert "double_blocks.0.img_attn.qkv.weight" in bfl and "single_blocks.0.linear1.bias" in bfl
    assert "final_layer.adaLN_modulation.1.weight" in bfl and "double_blocks.0.img_attn.norm.key_norm.scale" in bfl
    back = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_comfyui_model_cli_writes_one_bfl_file(tiny_path, tmp_path, capsys):
    """`convert.py <transformer folder> OUT --format comfyui-model`: one safetensors, BFL names only, the tensors
    to_bfl_model gives; a folder without config.json and a LoRA inside the model are refused."""
    folder = tiny_path / "transformer"
    out = convert.main([str(folder), str(tmp_path / "m.safetensors"), "--format", "comfyui-model"])
    got = load_file(out)
    want = convert.to_bfl_model(load_file(next(folder.glob("*.safetensors"))))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not any(k.startswith(("transformer_blocks", "single_transformer_blocks", "x_embedder")) for k in got)
    assert got["double_blocks.0.img_attn.qkv.weight"].shape == (3 * 128, 128)
    with pytest.raises(ValueError, match="not a diffusers transformer folder"):
        convert.main([str(tmp_path), str(tmp_path / "x.safetensors"), "--format", "comfyui-model"])
    with pytest.raises(ValueError, match="have no BFL name"):
        convert.to_bfl_model({**want, "transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(1)})
