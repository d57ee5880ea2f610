"""quant.py: fp8 checkpoints in each format written here from the tiny transformer, loaded and compared with the
fp32 model (diffusers' FluxTransformer2DModel.from_pretrained on the same folder); LoRA on top via add_adapter.

Error bounds (relative L2 of the transformer output on the same inputs, tiny model, fp32 compute on CPU):
- loaded fp8 model vs a dense model holding the same dequantized weights: < 1e-5 (same numbers, same math);
- vs the original fp32 weights: every Linear per-tensor e4m3 (comfy-scaled, and plain-cast) < 6e-2, measured 3.5%
  (e4m3 rounds each weight by ~2.6% RMS); quantize at load (block Linears per row, the ends kept) < 2e-2, measured
  0.3% in fp32 and 0.6% in bf16 (the tiny random model's output leans on its ends more than on its blocks, so the
  exact-dequant comparison and the per-weight rounding bound are the sharp checks).
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fixtures
import quant
from conftest import tiny_config
from kontext_kernels.fp8 import E4M3, FP8Linear, _FP8LinearFn
from kontext_kernels.int4 import Linear4bit
from load import load_transformer

E4M3_MAX = 448.0


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def fp32_state(tiny_path):
    return load_file(tiny_path / "transformer" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def reference(tiny_path):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(tiny_path, subfolder="transformer").eval()


def inputs(seed=0, tokens=24, text=8, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    kw = dict(hidden_states=torch.randn(1, tokens, 64, generator=g),
              encoder_hidden_states=torch.randn(1, text, 32, generator=g),
              pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.7]),
              img_ids=torch.randint(0, 6, (tokens, 3), generator=g).float(), txt_ids=torch.zeros(text, 3),
              guidance=torch.tensor([1.0]))
    return {k: v.to(device, dtype if k not in ("img_ids", "txt_ids") else torch.float32) for k, v in kw.items()}


def run(model, **kw):
    return model(**inputs(**kw), return_dict=False)[0]


def write(root, tiny_path, tensors, name="diffusion_pytorch_model.safetensors"):
    """A checkpoint folder laid out as a diffusers model folder: root/transformer/{config.json, weights}."""
    folder = root / "transformer"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_path / "transformer" / "config.json", folder / "config.json")
    save_file(tensors, folder / name)
    return root


def comfy_scaled(state, scale_key="scale_weight", peak=E4M3_MAX):
    """Every Linear weight as e4m3 codes with one fp32 scale per layer (peak code `peak`), the rest bf16, plus the
    `scale_input` and `scaled_fp8` extras ComfyUI writes. Returns (tensors, dequantized fp32 state)."""
    out, dense = {"scaled_fp8": torch.zeros(0, dtype=E4M3)}, {}
    for k, v in state.items():
        if v.dim() == 2:
            s = v.abs().max() / peak
            out[k] = (v / s).to(E4M3)
            out[k.removesuffix(".weight") + "." + scale_key] = s.reshape(())
            out[k.removesuffix(".weight") + ".scale_input"] = torch.ones(())
            dense[k] = out[k].float() * s
        else:
            out[k] = v.bfloat16()
            dense[k] = out[k].float()
    return out, dense


def dense_model(tiny_path, state):
    from diffusers import FluxTransformer2DModel

    config = json.loads((tiny_path / "transformer" / "config.json").read_text())
    m = FluxTransformer2DModel.from_config(config).eval()
    m.load_state_dict(state)
    return m


def check_fp8_layout(model, dtype=torch.float32):
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            in_blocks = name.startswith(("transformer_blocks.", "single_transformer_blocks."))
            assert isinstance(m, FP8Linear) == in_blocks, name
            if in_blocks:
                assert m.weight.dtype == E4M3 and m.weight_scale.dtype == torch.float32
                assert m.weight_scale.shape == (m.out_features,) and m.bias.dtype == dtype
            else:
                assert m.weight.dtype == dtype, name
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


@pytest.mark.parametrize("scale_key", ["scale_weight", "weight_scale"])
def test_comfy_scaled(tiny_path, tmp_path, fp32_state, reference, scale_key):
    tensors, dense = comfy_scaled(fp32_state, scale_key)
    model = load_transformer(tiny_config(write(tmp_path, tiny_path, tensors)))  # quant="none": detected from files
    check_fp8_layout(model)
    out, ref = run(model), run(reference)
    assert rel(out, run(dense_model(tiny_path, dense))) < 1e-5
    assert rel(out, ref) < 6e-2, rel(out, ref)


def test_plain_cast_e4m3(tiny_path, tmp_path, fp32_state, reference):
    tensors = {k: v.to(E4M3) for k, v in fp32_state.items()}  # model.to(float8): everything, biases and norms too
    model = load_transformer(tiny_config(write(tmp_path, tiny_path, tensors)))
    check_fp8_layout(model)
    out = run(model)
    assert rel(out, run(dense_model(tiny_path, {k: v.float() for k, v in tensors.items()}))) < 1e-5
    assert rel(out, run(reference)) < 1e-1, rel(out, run(reference))


def test_missing_scales_refused_then_loaded_with_scales_file(tiny_path, tmp_path, fp32_state):
    # The AlekseyCalvin-style export: scaled codes (peak ~416) with every scale dropped.
    tensors, dense = comfy_scaled(fp32_state, peak=416.0)
    scales = {k: v for k, v in tensors.items() if k.endswith(".scale_weight")}
    codes = {k: v for k, v in tensors.items() if not k.endswith((".scale_weight", ".scale_input", "scaled_fp8"))}
    root = write(tmp_path / "export", tiny_path, codes)
    cfg = tiny_config(root)
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.safetensors.*'context_embedder\.weight' is "
                                         r"float8_e4m3fn with \|w\| up to 416 and no scale.*fp8_scales"):
        load_transformer(cfg)
    save_file(scales, tmp_path / "scales.safetensors")
    cfg.fp8_scales = str(tmp_path / "scales.safetensors")
    model = load_transformer(cfg)
    check_fp8_layout(model)
    assert rel(run(model), run(dense_model(tiny_path, dense))) < 1e-5
    # the same numbers as the file that kept its scales
    full = load_transformer(tiny_config(write(tmp_path / "full", tiny_path, tensors)))
    a, b = model.state_dict(), full.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_quantize_at_load_fp8(tiny_path, fp32_state, reference, dtype):
    cfg = tiny_config(tiny_path, dtype=dtype)
    cfg.quant = "fp8"
    model = load_transformer(cfg)
    check_fp8_layout(model, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    if dtype == "bf16":
        assert rel(run(model, dtype=torch.bfloat16), run(reference)) < 2e-2  # + bf16 activations
        return
    dense = dict(fp32_state)
    for name, m in model.named_modules():
        if isinstance(m, FP8Linear):
            dense[name + ".weight"] = m.weight.float() * m.weight_scale[:, None]
            w, s = fp32_state[name + ".weight"], m.weight_scale[:, None]
            assert torch.allclose(s[:, 0], w.abs().amax(1) / E4M3_MAX)  # per row
            # e4m3 rounding: half an ulp, 2^-4 relative for normals, 2^-10 of the scale for subnormals
            assert ((m.weight.float() * s - w).abs() <= 2**-4 * w.abs() + 2**-10 * s + 1e-12).all()
    out = run(model)
    assert rel(out, run(dense_model(tiny_path, dense))) < 1e-5
    assert rel(out, run(reference)) < 2e-2, rel(out, run(reference))


def test_quantize_transformer_in_memory(tiny_path, reference):
    cfg = tiny_config(tiny_path)
    cfg.quant = "fp8"
    loaded = load_transformer(cfg).state_dict()
    model = quant.quantize_transformer(load_transformer(tiny_config(tiny_path)), "fp8")
    check_fp8_layout(model)
    ours = model.state_dict()
    assert ours.keys() == loaded.keys() and all(torch.equal(ours[k].float(), loaded[k].float()) for k in ours)
    with pytest.raises(ValueError, match="unknown quant 'int8'"):
        quant.quantize_transformer(model, "int8")


def test_quantized_linears_rule(reference):
    """The one rule every quantize path uses: the plain Linears of the blocks, with the parent and attribute that
    hold each; the embedders, norm_out and the top-level proj_out are left out."""
    found = quant.quantized_linears(reference)
    names = [n for n, _, _, _ in found]
    every = [n for n, m in reference.named_modules() if type(m) is nn.Linear]
    assert names == [n for n in every if n.startswith(("transformer_blocks.", "single_transformer_blocks."))]
    assert {"transformer_blocks.0.attn.to_out.0", "single_transformer_blocks.0.proj_mlp"} <= set(names)
    assert {"proj_out", "x_embedder", "context_embedder", "norm_out.linear"}.isdisjoint(names)
    for name, parent, attr, linear in found:
        assert getattr(parent, attr) is linear is reference.get_submodule(name), name
    with pytest.raises(ValueError, match="no nn.Linear under transformer_blocks / single_transformer_blocks"):
        quant.quantized_linears(nn.Sequential(nn.Linear(2, 2)))


def test_format_sniffing(tiny_path, tmp_path, fp32_state):
    folder = tiny_path / "transformer"
    assert quant.read_config(folder)["_class_name"] == "FluxTransformer2DModel"
    assert not quant.is_quantized_checkpoint(folder)
    tensors, _ = comfy_scaled(fp32_state)
    assert quant.is_quantized_checkpoint(write(tmp_path / "fp8", tiny_path, tensors) / "transformer")
    with pytest.raises(ValueError, match=r"vae: .*empty.* has no config.json \(expected a diffusers AutoencoderKL"):
        quant.read_config(tmp_path / "empty", "vae", "AutoencoderKL")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"transformer: .*broken/config.json.* is not valid JSON"):
        quant.read_config(tmp_path / "broken")
    (tmp_path / "broken" / "w.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match=r"w.safetensors.* is not a safetensors file"):
        quant.safetensors_header(tmp_path / "broken" / "w.safetensors")


def test_saved_fp8_model_reloads(tiny_path, tmp_path):
    cfg = tiny_config(tiny_path)
    cfg.quant = "fp8"
    model = load_transformer(cfg)
    again = load_transformer(tiny_config(write(tmp_path, tiny_path, model.state_dict())))
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


def test_to_dtype_moves_but_keeps_codes(tiny_path):
    cfg = tiny_config(tiny_path)
    cfg.quant = "fp8"
    model = load_transformer(cfg)
    codes = model.transformer_blocks[0].attn.to_q.weight.clone()
    model.to(torch.bfloat16)
    check_fp8_layout(model, torch.bfloat16)
    lin = model.transformer_blocks[0].attn.to_q
    assert torch.equal(lin.weight.view(torch.uint8), codes.view(torch.uint8)) and lin.compute_dtype == torch.bfloat16
    model.float()
    check_fp8_layout(model, torch.float32)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lora_trains_on_fp8_model(tiny_path, reference, dtype):
    from peft.utils import get_peft_model_state_dict

    cfg = tiny_config(tiny_path, dtype=dtype)
    cfg.quant = "fp8"
    model = load_transformer(cfg)
    model.add_adapter(lora_config())  # diffusers PeftAdapterMixin, as train.py does
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.requires_grad and p.dtype in (torch.float32, torch.bfloat16) for p in lora.values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert isinstance(model.transformer_blocks[0].attn.to_q.base_layer, FP8Linear)
    opt = torch.optim.SGD(lora.values(), lr=1.0)
    x_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    for step in range(2):
        with torch.enable_grad():
            loss = run(model, dtype=x_dtype).float().pow(2).mean()
            loss.backward()
        assert all(p.grad is not None and p.grad.isfinite().all() for p in lora.values())
        assert all(p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n or step == 1)  # A's grad is 0
        opt.step(), opt.zero_grad()  # ... until B moves off its zero init
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)  # fp8 codes included
    dense = load_transformer(tiny_config(tiny_path, dtype=dtype))
    dense.add_adapter(lora_config())
    ours, theirs = get_peft_model_state_dict(model), get_peft_model_state_dict(dense)
    assert ours.keys() == theirs.keys() and all(ours[k].shape == theirs[k].shape for k in ours)


def test_lora_from_fp8_model_loads_in_pipeline(tiny_path, tmp_path):
    from diffusers import FluxKontextPipeline
    from peft.utils import get_peft_model_state_dict

    cfg = tiny_config(tiny_path)
    cfg.quant = "fp8"
    model = load_transformer(cfg)
    model.add_adapter(lora_config())
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_()
    FluxKontextPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(model))
    pipe = FluxKontextPipeline.from_pretrained(tiny_path, dtype=torch.float32)
    pipe.load_lora_weights(tmp_path)
    (name,) = pipe.get_active_adapters()
    theirs, ours = get_peft_model_state_dict(pipe.transformer, adapter_name=name), get_peft_model_state_dict(model)
    assert ours and theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_bitsandbytes_and_4bit_dispatch(tiny_path, tmp_path, monkeypatch):
    """Only the dispatch to load_bnb_transformer / quantize_transformer_4bit (tested in test_int4.py beside the
    bitsandbytes fixtures): stand-ins record the calls."""
    calls = []
    monkeypatch.setattr(quant, "load_bnb_transformer",
                        lambda folder, dtype, device: calls.append(("bnb", folder, dtype, device)) or "bnb")
    monkeypatch.setattr(quant, "quantize_transformer_4bit",
                        lambda model, quant_type: calls.append(("q4", model, quant_type)) or "q4")
    root = tmp_path / "bnb"
    shutil.copytree(tiny_path / "transformer", root / "transformer")
    conf = json.loads((root / "transformer" / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (root / "transformer" / "config.json").write_text(json.dumps(conf))
    assert load_transformer(tiny_config(root)) == "bnb"
    assert calls[-1] == ("bnb", root / "transformer", torch.float32, torch.device("cpu"))
    for bad in ("fp8", "fp4"):
        cfg = tiny_config(root)
        cfg.quant = bad
        with pytest.raises(ValueError, match="is a bitsandbytes nf4 checkpoint"):
            load_transformer(cfg)
    cfg = tiny_config(tiny_path)
    cfg.quant = "fp4"
    assert load_transformer(cfg) == "q4"
    model, kind = calls[-1][1:]
    assert kind == "fp4" and not any(isinstance(m, FP8Linear) for m in model.modules())
    assert all(p.dtype == torch.float32 and not p.is_meta for p in model.parameters())


def test_errors(tiny_path, tmp_path, fp32_state):
    cfg = tiny_config(tiny_path)
    cfg.quant = "int8"
    with pytest.raises(ValueError, match="unknown quant 'int8'"):
        load_transformer(cfg)
    tensors, _ = comfy_scaled(fp32_state)
    bad = dict(tensors, **{"x_embedder.scale_weight": torch.ones(3)})
    with pytest.raises(ValueError, match=r"scale of 'x_embedder.weight' has shape \(3,\)"):
        load_transformer(tiny_config(write(tmp_path / "shape", tiny_path, bad)))
    both = dict(tensors, **{"x_embedder.weight_scale": torch.ones(())})
    with pytest.raises(ValueError, match="two scales for 'x_embedder.weight'"):
        load_transformer(tiny_config(write(tmp_path / "both", tiny_path, both)))
    stray = dict(tensors, **{"nope.scale_weight": torch.ones(())})
    with pytest.raises(ValueError, match="holds a scale for 'nope.weight', which is not a float8 weight"):
        load_transformer(tiny_config(write(tmp_path / "stray", tiny_path, stray)))
    nan = dict(tensors)
    nan.pop("proj_out.scale_weight")
    nan["proj_out.weight"] = torch.full_like(nan["proj_out.weight"], float("nan"))
    with pytest.raises(ValueError, match="'proj_out.weight' holds NaN float8 codes"):
        load_transformer(tiny_config(write(tmp_path / "nan", tiny_path, nan)))
    extra = dict(tensors, **{"extra.weight": torch.ones(2, 2)})
    with pytest.raises(ValueError, match=r"holds tensors the model does not have: \['extra.weight'\]"):
        load_transformer(tiny_config(write(tmp_path / "extra", tiny_path, extra)))
    missing = {k: v for k, v in tensors.items() if k != "proj_out.bias"}
    with pytest.raises(ValueError, match="has no 'proj_out.bias'"):
        load_transformer(tiny_config(write(tmp_path / "missing", tiny_path, missing)))
    cfg = tiny_config(write(tmp_path / "ok", tiny_path, tensors))
    cfg.fp8_scales = str(tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="fp8_scales file .*absent.safetensors.* does not exist"):
        load_transformer(cfg)


# ------------------------------------------------------------------------------------------ BFL key names
W, MLP = 3072, 12288  # diffusers' FLUX converter is written for the full width only


def bfl_shapes(ctx=32, pooled=32, channels=64, head=128):
    """The original FLUX (BFL) key layout for one double and one single block (flux/model.py)."""
    s = {"img_in": (W, channels), "txt_in": (W, ctx), "time_in.in_layer": (W, 256), "time_in.out_layer": (W, W),
         "vector_in.in_layer": (W, pooled), "vector_in.out_layer": (W, W), "guidance_in.in_layer": (W, 256),
         "guidance_in.out_layer": (W, W), "final_layer.linear": (channels, W),
         "final_layer.adaLN_modulation.1": (2 * W, W)}
    for side in ("img", "txt"):
        d = f"double_blocks.0.{side}_"
        s |= {d + "mod.lin": (6 * W, W), d + "attn.qkv": (3 * W, W), d + "attn.proj": (W, W),
              d + "mlp.0": (MLP, W), d + "mlp.2": (W, MLP)}
    s |= {"single_blocks.0.linear1": (3 * W + MLP, W), "single_blocks.0.linear2": (W, W + MLP),
          "single_blocks.0.modulation.lin": (3 * W, W)}
    shapes = {}
    for k, shape in s.items():
        shapes[k + ".weight"], shapes[k + ".bias"] = shape, shape[:1]
    for norm in ("double_blocks.0.img_attn.norm", "double_blocks.0.txt_attn.norm", "single_blocks.0.norm"):
        shapes[norm + ".query_norm.scale"] = shapes[norm + ".key_norm.scale"] = (head,)
    return shapes


def random_codes(shape, g):
    bits = torch.empty(shape[0] * shape[1] // 8, dtype=torch.int64).random_(generator=g).view(torch.uint8)
    bits -= ((bits & 0x7F) == 0x7F).to(torch.uint8)  # NaN (0x7F, 0xFF) -> +-448
    return bits.view(shape).view(E4M3)


def test_bfl_names_comfy_single_file(tmp_path):
    """A ComfyUI-style single file (BFL names under model.diffusion_model., per-layer scales) at full width, one
    block of each kind: every diffusers weight must get its rows' codes and scale, bit for bit."""
    g = torch.Generator().manual_seed(0)
    raw, scales = {}, {}
    for k, shape in bfl_shapes().items():
        if len(shape) == 2 and "_blocks." in k:
            raw[k] = random_codes(shape, g)
            scales[k] = torch.rand((), generator=g) + 0.5
            raw[k.removesuffix("weight") + "scale_weight"] = scales[k]
        else:
            raw[k] = torch.randn(shape, generator=g).bfloat16()
    folder = tmp_path / "transformer"
    folder.mkdir()
    others = {"first_stage_model.decoder.conv_in.weight": torch.ones(2), "text_encoders.t5xxl.x": torch.ones(2)}
    save_file({"model.diffusion_model." + k: v for k, v in raw.items()} | others,
              folder / "flux1-kontext-fp8.safetensors")  # an all-in-one file: the VAE and text encoders are skipped
    config = dict(_class_name="FluxTransformer2DModel", patch_size=1, in_channels=64, num_layers=1,
                  num_single_layers=1, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=32,
                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=[16, 56, 56])
    (folder / "config.json").write_text(json.dumps(config))
    model = quant.load_quantized_transformer(folder, "none", torch.bfloat16, torch.device("cpu"))

    def expect(name, bfl, rows=slice(None)):
        m = model.get_submodule(name)
        assert isinstance(m, FP8Linear), name
        assert torch.equal(m.weight.view(torch.uint8), raw[bfl + ".weight"][rows].view(torch.uint8)), name
        assert torch.equal(m.weight_scale, scales[bfl + ".weight"].expand(m.out_features)), name
        assert torch.equal(m.bias, raw[bfl + ".bias"][rows]), name

    d, s = "transformer_blocks.0.", "single_transformer_blocks.0."
    for i, p in enumerate("qkv"):
        expect(d + f"attn.to_{p}", "double_blocks.0.img_attn.qkv", slice(i * W, (i + 1) * W))
        expect(d + f"attn.add_{p}_proj", "double_blocks.0.txt_attn.qkv", slice(i * W, (i + 1) * W))
        expect(s + f"attn.to_{p}", "single_blocks.0.linear1", slice(i * W, (i + 1) * W))
    expect(s + "proj_mlp", "single_blocks.0.linear1", slice(3 * W, None))
    expect(s + "proj_out", "single_blocks.0.linear2")
    expect(s + "norm.linear", "single_blocks.0.modulation.lin")
    expect(d + "attn.to_out.0", "double_blocks.0.img_attn.proj")
    expect(d + "attn.to_add_out", "double_blocks.0.txt_attn.proj")
    expect(d + "ff.net.2", "double_blocks.0.img_mlp.2")
    expect(d + "ff_context.net.0.proj", "double_blocks.0.txt_mlp.0")
    expect(d + "norm1_context.linear", "double_blocks.0.txt_mod.lin")
    assert type(model.norm_out.linear) is nn.Linear  # shift/scale swapped by the converter, kept bf16
    shift, scale = raw["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(model.norm_out.linear.weight, torch.cat([scale, shift]))
    assert torch.equal(model.x_embedder.weight, raw["img_in.weight"])



# ---------------------------------------------------------------- compiled LoRA gradients, every quantized Linear


def fp8_function_forward(self, x):
    """FP8Linear.forward as fp8_linear dispatches on CUDA, run on the CPU: the autograd function with the torch
    twins of its Triton launchers (on the CPU, FP8Linear runs fp8_linear_ref, plain autograd, never the function)."""
    n, k = self.weight.shape
    m = x.numel() // k
    use_fp8 = x.dtype == torch.bfloat16 and n % 16 == 0 and k % 16 == 0 and m % 16 == 0
    return _FP8LinearFn.apply(x.reshape(m, k), self.weight, self.weight_scale, self.bias, use_fp8,
                              self.weight_t).reshape(*x.shape[:-1], n)


def double_quant_4bit(model, quant_type: str):
    """The block Linears (quant.quantized_linears) as double-quant Linear4bit from bitsandbytes' quantize_4bit
    (compress_statistics=True): quantize_transformer_4bit writes single-quant statistics only."""
    F4 = pytest.importorskip("bitsandbytes.functional")
    for _, parent, attr, lin in quant.quantized_linears(model):
        with torch.compiler.set_stance("force_eager"):  # bnb's CPU op is torch.compiled: slow to start
            codes, st = F4.quantize_4bit(lin.weight.detach().float(), blocksize=64, quant_type=quant_type,
                                         compress_statistics=True)
        bias = None if lin.bias is None else lin.bias.detach()
        setattr(parent, attr, Linear4bit(lin.in_features, lin.out_features, codes, st.absmax, st.code, 64, bias,
                                         lin.weight.dtype, quant_type, st.state2.absmax, st.state2.code, st.offset,
                                         st.state2.blocksize))
    return model


@pytest.mark.parametrize("kind", ["nf4", "fp4", "nf4-double", "fp8", "fp8-backward", "fp8-weight-only"])
def test_compiled_lora_gradients_equal_eager(kind, monkeypatch):
    """torch.compile must give the LoRA the gradients eager gives, through every quantized Linear. On torch 2.11
    (pytorch#180642) Linear4bit's compiled input gradient was exactly zero, so the single blocks' q/k/v LoRA, which
    reach the loss only through the block's quantized proj_out, trained nothing. The miniature Flux layout
    (fixtures.MINI_DIMS: a double and a single block) in bf16 with its block Linears quantized as `kind`, train.py's
    LoRA with B drawn off its zero init (so every LoRA tensor has a gradient), regional compile as train.py does
    (aot_eager: dynamo and AOTAutograd without inductor's kernels). "fp8*" run the CUDA dispatch's autograd
    function on the CPU (fp8_function_forward): fp8 activations (use_fp8), with the e5m2 input gradient
    (set_backward_fp8), or weight-only. Measured here (torch 2.13): compiled == eager to the bit; bound 1e-3 of each
    tensor's gradient norm. torch >= 2.12 hides #180642 itself; tests/test_int4.py's
    test_linear4bit_returns_its_gemm_output checks the pattern it needs."""
    from config import TrainConfig
    from lora import add_lora

    torch.manual_seed(0)
    model = fixtures.full_size_transformer("cpu", torch.bfloat16, **fixtures.MINI_DIMS)
    quant_type = kind.split("-")[0]
    if kind.endswith("double"):
        model = double_quant_4bit(model, quant_type)
    else:
        model = quant.quantize_transformer(model, quant_type)
    if quant_type == "fp8":
        monkeypatch.setattr(FP8Linear, "forward", fp8_function_forward)
        for m in model.modules():
            if isinstance(m, FP8Linear):
                m.set_backward_fp8(kind == "fp8-backward")
                m.weight_only = kind == "fp8-weight-only"
    proj_out = model.single_transformer_blocks[0].proj_out
    assert type(proj_out) is (FP8Linear if quant_type == "fp8" else Linear4bit)  # and it gets no LoRA: q/k/v's way out
    assert getattr(proj_out, "nested_absmax", None) is not None or not kind.endswith("double")
    params = add_lora(model, TrainConfig())
    names = [n for n, p in model.named_parameters() if "lora_" in n]
    assert {f"single_transformer_blocks.0.attn.{t}.lora_B.default.weight" for t in ("to_q", "to_k", "to_v")} <= {*names}
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    kw = inputs(tokens=32, text=16, dtype=torch.bfloat16)  # token counts of 16: the fp8 GEMM path

    def grads():
        with torch.enable_grad():
            loss = model(**kw, return_dict=False)[0].float().square().mean()
            return torch.autograd.grad(loss, params)

    eager = grads()
    try:
        model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        compiled = grads()
    finally:
        torch._dynamo.reset()
    for n, e, c in zip(names, eager, compiled):
        e, c = e.float(), c.float()
        assert e.norm() > 0 and c.norm() > 0, (n, e.norm().item(), c.norm().item())
        assert (c - e).norm() <= 1e-3 * e.norm(), (n, ((c - e).norm() / e.norm()).item())


@pytest.mark.gpu
def test_fp8_model_on_gpu(tiny_path, reference):
    """Quantize at load onto CUDA in bf16: every block Linear takes the fp8 tensor-core path (the tiny widths are
    multiples of 16); output within 5e-2 of the fp32 model, and a LoRA step on top."""
    cfg = tiny_config(tiny_path, dtype="bf16", device="cuda")
    cfg.quant = "fp8"
    model = load_transformer(cfg)
    check_fp8_layout(model, torch.bfloat16)
    out = run(model, device="cuda", dtype=torch.bfloat16)
    assert not out.isnan().any() and rel(out.cpu(), run(reference)) < 5e-2, rel(out.cpu(), run(reference))
    model.add_adapter(lora_config())
    with torch.enable_grad():
        run(model, device="cuda", dtype=torch.bfloat16).float().pow(2).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
