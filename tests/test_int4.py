"""kontext_kernels/int4.py against bitsandbytes (quantize_4bit / dequantize_4bit on the CPU, bit for bit), a real diffusers
bitsandbytes export of the tiny transformer, and peft LoRA on top. quant.py's 4-bit paths (load_bnb_transformer,
quantize_transformer_4bit) are tested here too: they share this file's bitsandbytes fixtures and Linear4bit checks.

The Triton kernel's fp32 instantiation runs under TRITON_INTERPRET=1 in a subprocess (test_triton_kernels_under_
interpreter); bf16 / fp16 kernel numerics, bnb's CUDA kernels and speed-relevant shapes need the GPU (marker `gpu`).
"""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kontext_kernels import INTERPRET, triton
from kontext_kernels.attention import set_attention
from kontext_kernels.int4 import (Linear4bit, _Linear4bitFunction, dequant_4bit, dequant_4bit_ref, get_4bit_type,
                                  quantize_4bit_ref)
from quant import load_bnb_transformer, quantize_transformer_4bit

ROOT = Path(__file__).resolve().parents[1]
# blocks straddling rows (96x40), a partial last block (33x17, 5x3, 250x333), an odd element count (33x17, 5x3)
SHAPES = [(64, 128), (96, 40), (33, 17), (5, 3), (250, 333)]
BNB_CPU_BUG_SHAPES = [(32, 32), (10, 96), (3, 48)]  # see bnb_dequantize
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
interpret_only = pytest.mark.skipif(not INTERPRET, reason="runs in test_triton_kernels_under_interpreter's subprocess")


def bnb_functional():
    return pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is needed to write the fixtures")


def bnb_quantize(w, quant_type, double):
    """bitsandbytes' codes and QuantState, plus our dequant kwargs for its statistics."""
    q, st = bnb_functional().quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double)
    kw = {}
    if double:
        kw = dict(nested_absmax=st.state2.absmax, nested_quant_map=st.state2.code, offset=st.offset,
                  nested_blocksize=st.state2.blocksize)
    return q, st, kw


def bnb_dequantize(q, st, dtype, reference_op=False):
    """bitsandbytes.functional.dequantize_4bit, or (reference_op) bnb's own pure-torch dequantize_4bit op.

    bitsandbytes 0.50.2's CPU C++ kernel is wrong when the row length is a multiple of 16 but not of 64 (32, 96, ...:
    it picks another block's absmax); bnb uses its pure-torch op for odd row lengths and on other devices. FLUX's
    Linears (3072, 12288, 15360, 4096, 768, 256, 64) are all multiples of 64; the tiny model's 32 is not."""
    F4 = bnb_functional()
    st.dtype = dtype
    with torch.compiler.set_stance("force_eager"):  # bnb's pure-torch op is torch.compiled: slow to start on CPU
        if not reference_op:
            return F4.dequantize_4bit(q, st)
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

        absmax = F4.dequantize_blockwise(st.absmax, st.state2) + st.offset if st.nested else st.absmax
        return _dequantize_4bit_compute(q.reshape(-1), absmax, st.code, st.blocksize, st.shape, dtype)


# ---------------------------------------------------------------- code books, dequant, quantize vs bitsandbytes


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quant_map_equals_bnb(quant_type):
    assert torch.equal(get_4bit_type(quant_type), bnb_functional().get_4bit_type(quant_type, device="cpu"))
    with pytest.raises(ValueError, match="nf4"):
        get_4bit_type("int4")


@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequant_ref_equals_bnb(quant_type, double):
    torch.manual_seed(0)
    for shape in SHAPES:
        w = torch.randn(shape, dtype=torch.bfloat16) * torch.rand(shape[0], 1, dtype=torch.bfloat16)
        w[0, :3] = 0  # exact zeros: fp4 has +0 and -0
        q, st, kw = bnb_quantize(w, quant_type, double)
        for dtype in DTYPES:
            ours = dequant_4bit_ref(q, st.absmax, st.code, list(shape), 64, dtype, **kw)
            theirs = bnb_dequantize(q, st, dtype)
            assert ours.dtype == dtype and ours.shape == shape
            assert torch.equal(ours, theirs), (shape, dtype)
            assert torch.equal(ours, bnb_dequantize(q, st, dtype, reference_op=True)), (shape, dtype)
    for shape in BNB_CPU_BUG_SHAPES:
        q, st, kw = bnb_quantize(torch.randn(shape), quant_type, double)
        ours = dequant_4bit_ref(q, st.absmax, st.code, list(shape), 64, torch.float32, **kw)
        assert torch.equal(ours, bnb_dequantize(q, st, torch.float32, reference_op=True)), shape


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_quantize_ref_equals_bnb(quant_type):
    torch.manual_seed(1)
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            w = torch.randn(shape, dtype=dtype)
            w[0, :3], w[-1, -1] = 0, 1e-30
            if shape[0] * shape[1] > 64:
                w.view(-1)[64:128] = 0  # an all-zero block: absmax 0
            codes, absmax = quantize_4bit_ref(w, quant_type)
            q, st, _ = bnb_quantize(w, quant_type, False)
            assert torch.equal(codes, q.view(-1)), (shape, dtype)
            assert torch.equal(absmax, st.absmax), (shape, dtype)


# ---------------------------------------------------------------- Linear4bit


def make_linear4bit(out_f, in_f, quant_type="nf4", bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    return dense, Linear4bit.from_linear(dense, quant_type)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear4bit_forward_backward_equal_dense_dequantized(quant_type):
    dense, q = make_linear4bit(40, 96, quant_type)
    w = dequant_4bit_ref(q.codes, q.absmax, q.quant_map, [40, 96], 64, torch.float32)
    assert torch.equal(q.dequantize(), w)
    with torch.enable_grad():
        x = torch.randn(2, 7, 96, requires_grad=True)
        bias = q.bias.detach().clone().requires_grad_(True)
        q.bias.requires_grad_(True)  # the bias gradient path (frozen in training, but it must be right)
        y = q(x)
        y_ref = F.linear(x, w, bias)
        dy = torch.randn_like(y)
        gx, gb = torch.autograd.grad(y, (x, q.bias), dy)
        gx_ref, gb_ref = torch.autograd.grad(y_ref, (x, bias), dy)
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gb, gb_ref)
    assert not any(p.requires_grad for n, p in q.named_parameters() if n != "bias")
    err = (y - dense(x)).norm() / dense(x).norm()
    assert err < 0.2, f"{quant_type} relative error {err:.3f} vs the dense layer"


def test_linear4bit_saves_no_dense_weight():
    _, q = make_linear4bit(64, 128)
    saved = []
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        q(torch.randn(3, 128, requires_grad=True)).sum()
    # codes (4 KiB) + absmax (512 B) + the code book, not the 32 KiB fp32 weight or the input
    assert {(t.dtype, t.numel()) for t in saved} == {(torch.uint8, 64 * 128 // 2), (torch.float32, 128),
                                                    (torch.float32, 16)}


def test_linear4bit_to_dtype_keeps_stats_fp32():
    _, q = make_linear4bit(64, 128)
    absmax = q.absmax.clone()
    q.to(torch.bfloat16)
    assert q.compute_dtype == torch.bfloat16 and q.bias.dtype == torch.bfloat16
    assert q.absmax.dtype == torch.float32 and torch.equal(q.absmax, absmax) and q.codes.dtype == torch.uint8
    y = q(torch.randn(2, 128))  # fp32 in: computes in bf16, returns fp32
    assert y.dtype == torch.float32
    assert q(torch.randn(2, 128, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert q.weight.shape == (64, 128) and q.weight.untyped_storage().nbytes() == q.codes.untyped_storage().nbytes()


def test_linear4bit_traces_as_one_graph():
    """torch.compile sees the dequant as one custom-op node inside the autograd.Function (aot_eager: the tracing,
    without compiling kernels; the inductor run is test_gpu_linear4bit_compiles)."""
    _, q = make_linear4bit(96, 128)
    with torch.enable_grad():
        x = torch.randn(2, 5, 128, requires_grad=True)
        y = q(x)
        (gx,) = torch.autograd.grad(y.sum(), x)
        yc = torch.compile(q, fullgraph=True, backend="aot_eager")(x)
        (gxc,) = torch.autograd.grad(yc.sum(), x)
    assert torch.equal(yc, y) and torch.equal(gxc, gx)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32], ids=["same-dtype", "cast"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear4bit_returns_its_gemm_output(quant_type, x_dtype):
    """The forward's output is the GEMM's own, neither a view nor a second call's result (a no-op `.to` of it): the
    pattern by which torch 2.11's dynamo gave Linear4bit's input no compiled gradient (pytorch#180642; the
    gradients themselves: tests/test_quant.py's test_compiled_lora_gradients_equal_eager). "cast": x in fp32, compute
    in bf16, the output a fresh cast."""
    from tests_util import forward_aliases

    _, q = make_linear4bit(48, 64, quant_type, dtype=torch.bfloat16)
    x = torch.randn(2, 5, 64, dtype=x_dtype)
    args = (x, q.bias, q.codes, q.absmax, q.quant_map, None, None, None, [48, 64], 64, 256, torch.bfloat16)
    y, calls = forward_aliases(_Linear4bitFunction, *args)
    assert calls == 1 and not any(y is a for a in args)
    assert y.dtype == x_dtype and torch.equal(y, q(x))


# ---------------------------------------------------------------- transformer fixtures


def flux_inputs(model, n_img=12, n_txt=5, seed=0, dtype=torch.float32, device="cpu"):
    """Transformer keyword arguments for a batch of 2 (the model's dtype for the activations, fp32 ids)."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    act = dict(hidden_states=torch.randn(2, n_img, c.in_channels, generator=g),
               encoder_hidden_states=torch.randn(2, n_txt, c.joint_attention_dim, generator=g),
               pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=g))
    ids = dict(timestep=torch.tensor([0.3, 0.8]), guidance=torch.tensor([1.0, 3.5]),
               img_ids=torch.stack([torch.zeros(n_img), torch.arange(n_img) // 4, torch.arange(n_img) % 4], 1),
               txt_ids=torch.zeros(n_txt, 3))
    return {**{k: v.to(device, dtype) for k, v in act.items()}, **{k: v.to(device) for k, v in ids.items()},
            "return_dict": False}


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def dense_transformer(tiny_path):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(tiny_path, subfolder="transformer", dtype=torch.float32).eval()


def write_bnb_export(src: Path, out: Path, quant_type: str, double: bool) -> Path:
    """What diffusers itself saves for FluxTransformer2DModel.from_pretrained(quantization_config=BitsAndBytesConfig(
    load_in_4bit=True, ...), dtype=bf16).save_pretrained(out). diffusers refuses to quantize without a GPU, although
    bitsandbytes 0.50 quantizes on the CPU, so the environment check is skipped."""
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import BnB4BitDiffusersQuantizer

    bnb_functional()
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    mp = pytest.MonkeyPatch()
    mp.setattr(BnB4BitDiffusersQuantizer, "validate_environment", lambda self, *a, **k: None)
    try:
        model = FluxTransformer2DModel.from_pretrained(src, subfolder="transformer", quantization_config=qc,
                                                       dtype=torch.bfloat16, device_map="cpu")
        model.save_pretrained(out)
    finally:
        mp.undo()
    return out


@pytest.fixture(scope="module", params=[("nf4", True), ("fp4", False)], ids=["nf4-double", "fp4"])
def bnb_export(request, tiny_path, tmp_path_factory):
    quant_type, double = request.param
    return write_bnb_export(tiny_path, tmp_path_factory.mktemp(f"bnb-{quant_type}") / "transformer", quant_type,
                            double), quant_type, double


def bnb_dequantized_model(folder: Path, dense):
    """The export as a dense fp32 model, every 4-bit weight dequantised by bitsandbytes' reference op (its CPU
    kernel is wrong for the tiny model's 32-wide rows: see bnb_dequantize)."""
    from bitsandbytes.functional import QuantState
    from safetensors.torch import load_file

    sd = load_file(folder / "diffusion_pytorch_model.safetensors")
    plain = {}
    for k in [k for k in sd if k.endswith(".weight") and sd[k].dtype == torch.uint8]:
        stats = {s[len(k) + 1:]: sd[s] for s in sd if s.startswith(k + ".")}
        st = QuantState.from_dict(stats, device=torch.device("cpu"))
        plain[k] = bnb_dequantize(sd[k], st, torch.float32, reference_op=True)
    plain.update({k: v.float() for k, v in sd.items() if ".weight." not in k and k not in plain})
    model = copy.deepcopy(dense)
    model.load_state_dict(plain, strict=True)
    return model


def conf_width(folder) -> int:
    c = json.loads((folder / "config.json").read_text())
    return c["num_attention_heads"] * c["attention_head_dim"]


def test_bnb_export_layout(bnb_export):
    folder, quant_type, double = bnb_export
    conf = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert conf["quant_method"] == "bitsandbytes" and conf["load_in_4bit"]
    assert conf["bnb_4bit_quant_type"] == quant_type and conf["bnb_4bit_use_double_quant"] == double
    from safetensors.torch import load_file

    sd = load_file(folder / "diffusion_pytorch_model.safetensors")
    k = "transformer_blocks.0.attn.to_q.weight"
    width = conf_width(folder)  # the tiny transformer's inner dim (heads x head dim)
    assert sd[k].dtype == torch.uint8 and sd[k].shape == (width * width // 2, 1)
    qs = json.loads(bytes(sd[f"{k}.quant_state.bitsandbytes__{quant_type}"].numpy()))
    assert qs["shape"] == [width, width] and qs["blocksize"] == 64 and ("nested_offset" in qs) == double
    assert sd[f"{k}.absmax"].dtype == (torch.uint8 if double else torch.float32)


def test_load_bnb_transformer_equals_bnb_dequantized(bnb_export, dense_transformer):
    folder, quant_type, double = bnb_export
    ours = load_bnb_transformer(folder, torch.float32, torch.device("cpu"))
    q = ours.transformer_blocks[0].attn.to_q
    assert isinstance(q, Linear4bit) and q.quant_type == quant_type and (q.nested_absmax is not None) == double
    assert isinstance(ours.proj_out, Linear4bit)  # diffusers quantizes every Linear, embedders included
    assert not any(p.requires_grad for p in ours.parameters()) and not ours.training
    theirs = bnb_dequantized_model(folder, dense_transformer)
    inputs = flux_inputs(ours)
    out = ours(**inputs)[0]
    assert torch.equal(out, theirs(**inputs)[0])
    # vs the original fp32 model: 4 bits on a random tiny model (weights cast to bf16 first, as the export does);
    # measured ~0.08 (nf4) and ~0.1 (fp4) relative error on the output
    err = rel_err(out, dense_transformer(**inputs)[0])
    assert err < 0.25, f"{quant_type}: relative error {err:.3f} vs the fp32 model"
    bf16 = load_bnb_transformer(folder, torch.bfloat16, torch.device("cpu"))
    assert bf16.dtype == torch.bfloat16 and bf16.transformer_blocks[0].attn.to_q.absmax.dtype == q.absmax.dtype
    assert rel_err(bf16(**flux_inputs(bf16, dtype=torch.bfloat16))[0].float(), out) < 0.05


def _rewrite(folder: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    (dst / "config.json").write_text((folder / "config.json").read_text())
    sd = load_file(folder / "diffusion_pytorch_model.safetensors")
    edit(sd)
    save_file(sd, dst / "diffusion_pytorch_model.safetensors")
    return dst


def test_load_bnb_transformer_errors(bnb_export, tmp_path):
    folder, quant_type, _ = bnb_export
    k = "single_transformer_blocks.0.attn.to_k.weight"
    for name, edit, match in [
        ("no_absmax", lambda sd: sd.pop(f"{k}.absmax"), f"no {k}.absmax"),
        ("no_quant_map", lambda sd: sd.pop(f"{k}.quant_map"), f"no {k}.quant_map"),
        ("no_state", lambda sd: sd.pop(f"{k}.quant_state.bitsandbytes__{quant_type}"), "quant_state"),
        ("bad_shape", lambda sd: sd.update({f"{k}.quant_state.bitsandbytes__{quant_type}": torch.tensor(list(
            json.dumps({"quant_type": quant_type, "blocksize": 64, "dtype": "bfloat16", "shape": [16, 64]}).encode()),
            dtype=torch.uint8)}), rf"shape \[16, 64\].*\[{conf_width(folder)}, {conf_width(folder)}\]"),
        ("no_norm", lambda sd: sd.pop("single_transformer_blocks.0.attn.norm_q.weight"), "missing tensors"),
    ]:
        bad = _rewrite(folder, tmp_path / name, edit)
        with pytest.raises(ValueError, match=match) as e:
            load_bnb_transformer(bad, torch.float32, torch.device("cpu"))
        assert "diffusion_pytorch_model.safetensors" in str(e.value) or name == "no_norm"
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({k: v for k, v in json.loads((folder / "config.json").read_text())
                                                   .items() if k != "quantization_config"}))
    with pytest.raises(ValueError, match="not bitsandbytes 4-bit"):
        load_bnb_transformer(plain, torch.float32, torch.device("cpu"))


# ---------------------------------------------------------------- quantize_transformer_4bit and LoRA


@pytest.fixture
def quantized(dense_transformer):
    return quantize_transformer_4bit(copy.deepcopy(dense_transformer), "nf4")


def test_quantize_transformer_4bit(dense_transformer, quantized):
    dense = dict(dense_transformer.named_modules())
    kinds = {n: type(m) for n, m in quantized.named_modules() if isinstance(m, nn.Linear)}
    assert {n for n, t in kinds.items() if t is Linear4bit} == \
        {n for n in kinds if n.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    assert kinds["proj_out"] is nn.Linear and kinds["x_embedder"] is nn.Linear and kinds["norm_out.linear"] is nn.Linear
    for n, t in kinds.items():
        if t is Linear4bit:
            q, _, _ = bnb_quantize(dense[n].weight.detach(), "nf4", False)
            assert torch.equal(quantized.get_submodule(n).codes, q.view(-1)), n
    inputs = flux_inputs(quantized)
    err = rel_err(quantized(**inputs)[0], dense_transformer(**inputs)[0])
    assert err < 0.2, f"relative error {err:.3f} vs the fp32 model"  # measured ~0.07


def dequantized_copy(model):
    """The 4-bit model with every Linear4bit turned back into a dense nn.Linear holding the dequantised weight."""
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, Linear4bit):
            dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            dense.weight.data = m.dequantize(torch.float32)
            if m.bias is not None:
                dense.bias.data = m.bias.data.clone()
            model.set_submodule(name, dense.requires_grad_(False))
    return model


def add_lora(model, seed=0):
    from peft import LoraConfig

    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, init_lora_weights="gaussian"))
    for n, p in model.named_parameters():
        if "lora_B" in n:  # B = 0 at init would make every lora_A gradient zero
            g = torch.Generator().manual_seed(sum(map(ord, n)))
            p.data = (torch.randn(p.shape, generator=g) * 0.02).to(p.device, p.dtype)
    return model


def test_lora_on_linear4bit_trains(quantized, dense_transformer):
    from peft.tuners.lora import Linear as LoraLinear
    from peft.utils import get_peft_model_state_dict

    reference = add_lora(dequantized_copy(quantized))
    model = add_lora(quantized)
    to_q = model.transformer_blocks[0].attn.to_q
    assert isinstance(to_q, LoraLinear) and isinstance(to_q.base_layer, Linear4bit)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n and p.dtype == torch.float32 for n, p in lora.items())
    keys = set(get_peft_model_state_dict(model))
    assert keys == set(get_peft_model_state_dict(add_lora(copy.deepcopy(dense_transformer))))
    assert "single_transformer_blocks.0.attn.to_q.lora_A.weight" in keys

    inputs = flux_inputs(model)
    target = torch.randn_like(inputs["hidden_states"])
    opt = torch.optim.SGD(lora.values(), lr=0.5)
    with torch.enable_grad():
        losses = []
        for step in range(2):
            loss = F.mse_loss(model(**inputs)[0], target)
            loss.backward()
            if step == 0:
                ref_loss = F.mse_loss(reference(**inputs)[0], target)
                ref_loss.backward()
                torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
                ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
                grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
                assert grads.keys() == lora.keys() == ref_grads.keys()
                for n in grads:
                    torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
                # the first block's LoRA is only reached through the 4-bit layers' input gradients
                assert grads["transformer_blocks.0.attn.to_q.lora_A.default.weight"].abs().sum() > 0
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    assert losses[1] < losses[0]


def test_lora_from_linear4bit_loads_in_pipeline(quantized, dense_transformer, tiny_path, tmp_path):
    """The LoRA saved from the 4-bit model loads in a stock FluxKontextPipeline (load_lora_weights), and back into a
    4-bit transformer with diffusers' transformer.load_lora_adapter (pipeline.load_lora_weights cannot target a
    4-bit transformer: it reads transformer.state_dict()["<module>.weight"], which Linear4bit does not have)."""
    from diffusers import FluxKontextPipeline
    from peft.utils import get_peft_model_state_dict

    model = add_lora(quantized)
    lora = get_peft_model_state_dict(model)
    FluxKontextPipeline.save_lora_weights(tmp_path, transformer_lora_layers=lora)
    pipe = FluxKontextPipeline.from_pretrained(tiny_path, dtype=torch.float32)
    pipe.load_lora_weights(tmp_path)
    (name,) = pipe.transformer.peft_config  # load_lora_weights names the adapter itself ("default_0")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name=name)
    assert loaded.keys() == lora.keys() and all(torch.equal(loaded[k], lora[k]) for k in lora)

    fresh = quantize_transformer_4bit(copy.deepcopy(dense_transformer), "nf4")
    fresh.load_lora_adapter(tmp_path, weight_name="pytorch_lora_weights.safetensors", prefix="transformer",
                            adapter_name="edit")
    loaded = get_peft_model_state_dict(fresh, adapter_name="edit")
    assert loaded.keys() == lora.keys() and all(torch.equal(loaded[k], lora[k]) for k in lora)
    inputs = flux_inputs(model)
    assert torch.equal(fresh(**inputs)[0], model(**inputs)[0])


# ---------------------------------------------------------------- Triton, fp32, under the interpreter (CPU)


@pytest.mark.skipif(INTERPRET or triton is None, reason="driver: runs the interpret tests with TRITON_INTERPRET=1")
def test_triton_kernels_under_interpreter():
    from tests_util import run_interpret_tests

    r = run_interpret_tests(__file__)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]


@interpret_only
@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_interpret_dequant_fp32_equals_ref(quant_type, double):
    torch.manual_seed(0)
    for shape in SHAPES + [(3, 4096 + 64 * 5 + 2)]:  # > one program's 4096 values, several programs, odd tail
        w = torch.randn(shape) * 3
        w[0, :3] = 0
        codes, absmax = quantize_4bit_ref(w, quant_type)
        kw = {}
        if double:  # a synthetic double-quant state with several nested blocks
            nb = torch.Generator().manual_seed(1)
            absmax = torch.randint(0, 256, (absmax.numel(),), dtype=torch.uint8, generator=nb)
            kw = dict(nested_absmax=torch.rand(-(-absmax.numel() // 4), generator=nb) + 0.5,
                      nested_quant_map=torch.linspace(-1, 1, 256), offset=torch.tensor(0.37), nested_blocksize=4)
        code = get_4bit_type(quant_type)
        ref = dequant_4bit_ref(codes, absmax, code, list(shape), 64, torch.float32, **kw)
        out = torch.full(shape, float("nan"))
        ours = dequant_4bit(codes, absmax, code, list(shape), 64, torch.float32, **kw, out=out)
        assert ours is out and torch.equal(ours, ref), shape
    for blocksize in (32, 128, 4096):
        w = torch.randn(70, 130)
        q = torch.randint(0, 256, ((70 * 130 + 1) // 2,), dtype=torch.uint8)
        absmax = torch.rand(-(-70 * 130 // blocksize))
        code = get_4bit_type(quant_type)
        assert torch.equal(dequant_4bit(q, absmax, code, [70, 130], blocksize, torch.float32),
                           dequant_4bit_ref(q, absmax, code, [70, 130], blocksize, torch.float32))


# ---------------------------------------------------------------- GPU


def _poison_cuda_allocator(nbytes=1 << 30):
    """Fill and free a large block so the next allocations (our kernels' outputs) start as NaN, not zeros."""
    torch.full((nbytes // 4,), float("nan"), device="cuda")
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_gpu_triton_dequant_equals_bnb_and_ref(quant_type, double, dtype):
    bnb = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(0)
    for shape in [(3072, 3072), (12288, 3072), (1000, 333), (33, 17)]:
        w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        q, st = bnb.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double)
        kw = {}
        if double:
            kw = dict(nested_absmax=st.state2.absmax, nested_quant_map=st.state2.code, offset=st.offset,
                      nested_blocksize=st.state2.blocksize)
        out = torch.full(shape, float("nan"), device="cuda", dtype=dtype)
        ours = dequant_4bit(q, st.absmax, st.code, list(shape), 64, dtype, **kw, out=out)
        ref = dequant_4bit_ref(q, st.absmax, st.code, list(shape), 64, dtype, **kw)
        st.dtype = dtype
        theirs = bnb.dequantize_4bit(q, st)
        assert not ours.isnan().any(), shape
        assert torch.equal(ours, ref), f"{shape}: Triton != torch reference"
        assert torch.equal(ours, theirs), f"{shape}: Triton != bitsandbytes CUDA dequantize_4bit"


@pytest.mark.gpu
@pytest.mark.parametrize("mkn", [(8704, 3072, 3072), (8704, 3072, 12288), (333, 3072, 1000), (333, 1000, 3072)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_gpu_linear4bit_forward_backward(quant_type, mkn):
    m, k, n = mkn
    torch.manual_seed(0)
    dense = nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
    q = Linear4bit.from_linear(dense, quant_type)
    w_ref = dequant_4bit_ref(q.codes, q.absmax, q.quant_map, [n, k], 64, torch.bfloat16)
    assert torch.equal(q.dequantize(), w_ref)
    x = torch.randn(1, m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(1, m, n, device="cuda", dtype=torch.bfloat16)
    _poison_cuda_allocator()
    with torch.enable_grad():
        y = q(x)
        (dx,) = torch.autograd.grad(y, x, dy)
    y_ref = F.linear(x.detach(), w_ref, q.bias)
    dx_ref = dy @ w_ref
    assert not y.isnan().any() and not dx.isnan().any()
    torch.testing.assert_close(y, y_ref, rtol=1.6e-2, atol=1e-3)
    torch.testing.assert_close(dx, dx_ref, rtol=1.6e-2, atol=1e-3)
    assert rel_err(y.float(), dense(x.detach()).float()) < 0.15


@pytest.mark.gpu
def test_gpu_linear4bit_compiles():
    """Inductor vs eager on the 4-bit layer, output and input gradient. On torch 2.11 the compiled input gradient
    was zero (pytorch#180642; this test was an xfail since the H100 session). Bounds: relative L2 error 1e-2, a few
    bf16 ulps (inductor may round the bias add and the casts in another order than cuBLAS's epilogue)."""
    torch.manual_seed(0)
    dense = nn.Linear(3072, 3072, device="cuda", dtype=torch.bfloat16)
    q = Linear4bit.from_linear(dense, "nf4")
    x = torch.randn(2, 256, 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(2, 256, 3072, device="cuda", dtype=torch.bfloat16)
    try:
        with torch.enable_grad():
            y_eager = q(x)
            (dx_eager,) = torch.autograd.grad(y_eager, x, dy)
            y = torch.compile(q, fullgraph=True)(x)
            (dx,) = torch.autograd.grad(y, x, dy)
    finally:
        torch._dynamo.reset()
    assert dx.norm() > 0
    assert rel_err(y.float(), y_eager.float()) < 1e-2 and rel_err(dx.float(), dx_eager.float()) < 1e-2, (
        rel_err(y.float(), y_eager.float()), rel_err(dx.float(), dx_eager.float()))


@pytest.mark.gpu
def test_gpu_load_bnb_transformer_and_lora(bnb_export):
    folder, _, _ = bnb_export
    model = add_lora(load_bnb_transformer(folder, torch.bfloat16, torch.device("cuda")))
    # pinned: an unpinned model takes diffusers' process-wide default, PyTorch's SDPA choice, whose Flux LoRA
    # backward gave NaN gradients here on the H200 (2026-12-02)
    set_attention(model, "auto", torch.device("cuda"), torch.bfloat16)
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all(p.is_cuda for p in lora)
    inputs = flux_inputs(model, dtype=torch.bfloat16, device="cuda")
    with torch.enable_grad():
        out = model(**inputs)[0]
        out.float().square().mean().backward()
    assert not out.isnan().any() and all(p.grad is not None and not p.grad.isnan().any() for p in lora)
