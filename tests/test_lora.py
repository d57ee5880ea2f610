"""lora.py: the saved file loads unchanged in FluxKontextPipeline.load_lora_weights (alpha kept), read/check errors,
training checkpoints (exact round trip, content-keyed names, latest.json, resume errors).

Tiny transformer in fp32 on the CPU: outputs are compared exactly.
"""

import copy
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from config import Config, TrainConfig
from lora import (add_lora, config_differences, load_checkpoint, load_lora, read_lora, resolve_resume,
                  save_checkpoint, save_lora, unload_lora)

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def fresh_transformer(tiny_path):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(tiny_path, subfolder="transformer").eval()


def with_lora(tiny_path, rank=4, alpha=8.0, seed=0, targets=TARGETS):
    """A tiny transformer with a training LoRA (lora.add_lora) whose B is random too (peft starts it at 0, which
    would make every output equal with or without the LoRA). alpha != rank: a lost alpha changes the outputs."""
    t = fresh_transformer(tiny_path)
    params = add_lora(t, TrainConfig(rank=rank, alpha=alpha, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in t.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return t, params


def inputs(transformer, seed=0):
    """Random transformer inputs: 6 target + 6 control tokens, 5 text tokens (FluxTransformer2DModel.forward)."""
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.zeros(6, 3), torch.ones(6, 3)]) * torch.arange(12)[:, None]
    return dict(hidden_states=torch.randn(1, 12, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, 5, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.7]), guidance=torch.tensor([2.0]), img_ids=ids, txt_ids=torch.zeros(5, 3))


def run(transformer, seed=0):
    return transformer(**inputs(transformer, seed), return_dict=False)[0]


# ---------------------------------------------------------------- the file format


def test_save_lora_loads_in_pipeline_and_load_lora(tmp_path, tiny_path, pipe):
    t, _ = with_lora(tiny_path)
    want = run(t)
    path = tmp_path / "lora.safetensors"
    save_lora(t, path)

    # keys: transformer.<module>.lora_A/B.weight for every targeted Linear, nothing else
    sd = load_file(path)
    targeted = {n for n, m in fresh_transformer(tiny_path).named_modules()
                if isinstance(m, torch.nn.Linear) and n.split(".attn.")[-1] in TARGETS and ".attn." in n}
    assert len(targeted) >= 4
    assert set(sd) == {f"transformer.{n}.lora_{ab}.weight" for n in targeted for ab in "AB"}
    assert all(v.dtype == torch.float32 for v in sd.values())
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 8.0
    assert sorted(meta["transformer.target_modules"]) == sorted(TARGETS)

    # ours: a fresh transformer with the file loaded gives the same outputs, and the LoRA matters
    fresh = fresh_transformer(tiny_path)
    base = run(fresh)
    load_lora(fresh, path)
    assert fresh.peft_config["default"].r == 4 and fresh.peft_config["default"].lora_alpha == 8.0
    assert torch.equal(run(fresh), want)
    assert not torch.allclose(base, want)
    unload_lora(fresh)
    assert torch.equal(run(fresh), base)

    # the pipeline's own loader reads the file unchanged (alpha from the metadata: scale 2, not 1)
    assert torch.equal(run(pipe.transformer), base)
    pipe.load_lora_weights(str(path))
    try:
        assert torch.equal(run(pipe.transformer), want)
    finally:
        pipe.unload_lora_weights()


def write_lora(path, transformer, targets, rank, alpha, seed):
    """A random LoRA (nonzero A and B) in FluxKontextPipeline.save_lora_weights' format, alpha in its metadata
    (written by diffusers, not by lora.py: what load_lora reads is checked against an independent writer)."""
    from diffusers import FluxKontextPipeline
    from peft import LoraConfig

    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".attn.")[-1] in targets:
            layers[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) * 0.2
            layers[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.2
    assert len(layers) >= 2 * len(targets)
    meta = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)).to_dict()
    FluxKontextPipeline.save_lora_weights(path.parent, transformer_lora_layers=layers, weight_name=path.name,
                                          transformer_lora_adapter_metadata=meta)
    return path


def two_lora_files(folder, tiny_path):
    """a.safetensors (r 4, alpha 8, q/k/v/out) and b.safetensors (r 2, alpha 2, q/v) in `folder` (test_sample.py's
    LoRA tests use them too)."""
    t = fresh_transformer(tiny_path)
    a = write_lora(folder / "a.safetensors", t, ("to_q", "to_k", "to_v", "to_out.0"), rank=4, alpha=8, seed=1)
    b = write_lora(folder / "b.safetensors", t, ("to_q", "to_v"), rank=2, alpha=2, seed=2)
    return a, b


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, tiny_path):
    return two_lora_files(tmp_path_factory.mktemp("lora"), tiny_path)


def test_read_lora(lora_files, tmp_path):
    sd, meta = read_lora(lora_files[0])
    # the tiny model: a double block (to_q, to_k, to_v, to_out.0) and a single block (no to_out), A and B each
    assert len(sd) == (4 + 3) * 2 and meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 8
    save_file({"transformer.x.lora_A.weight": torch.zeros(1, 1)}, tmp_path / "nometa.safetensors")
    assert read_lora(tmp_path / "nometa.safetensors")[1] is None
    with pytest.raises(ValueError, match=r"LoRA file .*missing\.safetensors.* does not exist"):
        read_lora(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match=r"junk\.safetensors.*not a readable safetensors"):
        read_lora(tmp_path / "junk.safetensors")
    save_file({"transformer.x.lora_A.weight": torch.zeros(1, 1)}, tmp_path / "badmeta.safetensors",
              metadata={"lora_adapter_metadata": "{r: 4"})
    with pytest.raises(ValueError, match=r"badmeta\.safetensors.*'lora_adapter_metadata' is not valid JSON"):
        read_lora(tmp_path / "badmeta.safetensors")


def test_lora_bad_files(components, lora_files, tmp_path):
    t = components.transformer
    good = load_file(lora_files[0])
    renamed = {k.replace("attn.to_q", "attn.to_query"): v for k, v in good.items()}
    save_file(renamed, tmp_path / "other_model.safetensors")
    with pytest.raises(ValueError, match=r"other_model\.safetensors.*match no Linear.*attn\.to_query\.lora_"):
        load_lora(t, tmp_path / "other_model.safetensors")

    wrong_shape = dict(good)
    key = next(k for k in good if k.endswith("to_k.lora_A.weight"))
    wrong_shape[key] = torch.zeros(4, 7)
    save_file(wrong_shape, tmp_path / "shape.safetensors")
    with pytest.raises(ValueError, match=r"shape\.safetensors.*to_k.*\(4, 7\)"):
        load_lora(t, tmp_path / "shape.safetensors")

    kohya = {"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(4, 32)}
    save_file(kohya, tmp_path / "kohya.safetensors")
    with pytest.raises(ValueError, match=r"kohya\.safetensors.*not in the supported format"):
        load_lora(t, tmp_path / "kohya.safetensors")

    half = {k: v for k, v in good.items() if "lora_B" not in k}
    save_file(half, tmp_path / "half.safetensors")
    with pytest.raises(ValueError, match=r"half\.safetensors.*but not lora_B"):
        load_lora(t, tmp_path / "half.safetensors")

    with pytest.raises(ValueError, match=r"missing\.safetensors.*does not exist"):
        load_lora(t, tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match=r"junk\.safetensors.*not a readable safetensors"):
        load_lora(t, tmp_path / "junk.safetensors")
    assert not getattr(t, "peft_config", None)  # checked before anything was loaded


# ---------------------------------------------------------------- training checkpoints


def adamw_steps(transformer, params, optimizer, n, seed=0):
    with torch.enable_grad():
        for i in range(n):
            optimizer.zero_grad()
            run(transformer, seed + i).square().mean().backward()
            optimizer.step()


def lora_weights(transformer) -> dict:
    return {n: p.detach().clone() for n, p in transformer.named_parameters() if "lora_" in n}


def test_checkpoint_round_trip_is_exact(tmp_path, tiny_path):
    t, params = with_lora(tiny_path)
    opt = torch.optim.AdamW(params, lr=1e-2)
    adamw_steps(t, params, opt, 2)
    out_dir = tmp_path / "run"
    saved = save_checkpoint(out_dir, t, opt, 2, Config(), keep=5, run="r1")
    weights, opt_state = lora_weights(t), copy.deepcopy(opt.state_dict())

    # content-keyed: the same weights give the same folder, other weights another one; latest.json follows
    assert re.fullmatch(r"lora-[0-9a-f]{16}", saved.name)
    assert save_checkpoint(out_dir, t, opt, 2, Config(), keep=5, run="r1") == saved
    assert len(list((out_dir / "checkpoints").glob("lora-*"))) == 1
    assert json.loads((out_dir / "checkpoints" / "latest.json").read_text()) == {"step": 2, "path": saved.name, "run": "r1"}
    assert resolve_resume("latest", out_dir) == saved
    adamw_steps(t, params, opt, 1, seed=2)
    later = save_checkpoint(out_dir, t, opt, 3, Config(), keep=5, run="r1")
    assert later != saved and resolve_resume("latest", out_dir) == later
    assert resolve_resume(str(saved), out_dir) == saved

    # restore into a fresh model whose LoRA starts elsewhere (other seed), and a fresh AdamW
    t2, params2 = with_lora(tiny_path, seed=5)
    opt2 = torch.optim.AdamW(params2, lr=1e-2)
    assert not torch.equal(next(iter(lora_weights(t2).values())), next(iter(weights.values())))
    assert load_checkpoint(saved, t2, opt2) == (2, "r1")
    got = lora_weights(t2)
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in weights)
    state2 = opt2.state_dict()
    # (state.json holds the param groups as JSON: betas come back as a list, which AdamW unpacks alike)
    assert state2["param_groups"] == json.loads(json.dumps(opt_state["param_groups"]))
    assert state2["state"].keys() == opt_state["state"].keys()
    for i, s in opt_state["state"].items():
        assert s.keys() == state2["state"][i].keys()
        assert all(torch.equal(s[k], state2["state"][i][k]) for k in s)
    # and the next step from the restored state is the step the original took (moments and step count restored)
    adamw_steps(t2, params2, opt2, 1, seed=2)
    after = lora_weights(t)
    assert all(torch.equal(lora_weights(t2)[k], after[k]) for k in after)


def test_resume_errors(tmp_path, tiny_path):
    assert resolve_resume("", tmp_path) is None
    with pytest.raises(ValueError, match=r"--resume latest: no .*latest\.json \(no checkpoint saved yet"):
        resolve_resume("latest", tmp_path / "empty")
    with pytest.raises(ValueError, match=r"--resume .*nowhere: expected a checkpoint folder"):
        resolve_resume(str(tmp_path / "nowhere"), tmp_path)


def test_load_checkpoint_with_other_targets_raises(tmp_path, tiny_path):
    t, params = with_lora(tiny_path)
    saved = save_checkpoint(tmp_path, t, torch.optim.AdamW(params), 1, Config(), keep=1, run="r1")
    t2, params2 = with_lora(tiny_path, targets=("to_q", "to_v"))
    with pytest.raises(ValueError, match=r"LoRA keys differ from the model's.*target_modules or rank"):
        load_checkpoint(saved, t2, torch.optim.AdamW(params2))


def test_load_checkpoint_with_other_rank_raises(tmp_path, tiny_path):
    t, params = with_lora(tiny_path, rank=4)
    saved = save_checkpoint(tmp_path, t, torch.optim.AdamW(params), 1, Config(), keep=1, run="r1")
    t2, params2 = with_lora(tiny_path, rank=2, alpha=2.0)
    with pytest.raises(ValueError, match=re.escape(str(saved)) + ".*saved \\(4, .*another train.rank"):
        load_checkpoint(saved, t2, torch.optim.AdamW(params2))


# ---------------------------------------------------------------- the run folder (nothing lost)


def test_pruning_keeps_other_runs_checkpoints(tmp_path, tiny_path):
    t, params = with_lora(tiny_path)
    opt = torch.optim.AdamW(params, lr=1e-2)
    old = []
    for step in (10, 20, 30):  # a longer, earlier run
        adamw_steps(t, params, opt, 1, seed=step)
        old.append(save_checkpoint(tmp_path, t, opt, step, Config(), keep=3, run="old"))
    new = []
    for step in (2, 4, 6):
        adamw_steps(t, params, opt, 1, seed=step + 100)
        new.append(save_checkpoint(tmp_path, t, opt, step, Config(), keep=2, run="new"))
    assert all(d.is_dir() for d in old) and not new[0].exists() and new[1].is_dir() and new[2].is_dir()
    assert resolve_resume("latest", tmp_path) == new[2]


def test_resume_latest_skips_a_truncated_checkpoint(tmp_path, tiny_path):
    t, params = with_lora(tiny_path)
    opt = torch.optim.AdamW(params, lr=1e-2)
    adamw_steps(t, params, opt, 1)
    good = save_checkpoint(tmp_path, t, opt, 1, Config(), keep=5, run="r")
    adamw_steps(t, params, opt, 1, seed=3)
    bad = save_checkpoint(tmp_path, t, opt, 2, Config(), keep=5, run="r")
    data = (bad / "lora.safetensors").read_bytes()
    (bad / "lora.safetensors").write_bytes(data[: len(data) // 2])  # a write cut short
    said = []
    assert resolve_resume("latest", tmp_path, said.append) == good
    assert len(said) == 1 and bad.name in said[0] and "lora.safetensors" in said[0] and good.name in said[0]
    (good / "optimizer.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"no readable checkpoint .*tried"):
        resolve_resume("latest", tmp_path, said.append)


def test_config_differences_name_the_fields(tmp_path, tiny_path):
    t, params = with_lora(tiny_path)
    saved = save_checkpoint(tmp_path, t, torch.optim.AdamW(params), 1, Config(), keep=1, run="r")
    now = Config(resume="latest", overwrite=True)
    assert config_differences(saved, now) == []
    now.train.lr, now.data.path = 3e-4, "other"
    assert config_differences(saved, now) == ["data.path: '' -> 'other'", "train.lr: 0.0001 -> 0.0003"]
