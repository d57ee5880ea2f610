"""IP-Adapter (load.py load_ip_adapter / load_image_encoder, encode.py encode_ip_image, kontext_kernels/attention.py) against
diffusers' FluxKontextPipeline.load_ip_adapter, set_ip_adapter_scale and prepare_ip_adapter_image_embeds, on the tiny
checkpoint with fixtures.ensure_tiny_ip_adapter's XLabs-layout adapter and CLIPModel-layout image encoder."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import test_load
import fixtures
import tiny
from config import IPAdapterConfig
from conftest import tiny_config
from encode import encode_ip_image
from kontext_kernels.attention import attention_of, set_attention
from load import (add_ip_adapter, ip_processors, load_components, load_image_encoder, load_ip_adapter,
                  load_transformer, model_identity)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
offline_hub = test_load.offline_hub  # the fixture: an empty Hugging Face cache, offline


@pytest.fixture(scope="session")
def ipa_path():
    return fixtures.ensure_tiny_ip_adapter(tiny.TinySpec())


def ip_config(tiny_path, ipa_path, **kw):
    cfg = tiny_config(tiny_path)
    cfg.ip_adapter = IPAdapterConfig(**{**dict(path=str(ipa_path), image_encoder=str(ipa_path),
                                               image_encoder_subfolder="image_encoder", dtype="fp32"), **kw})
    return cfg


@pytest.fixture(scope="module")
def ip_pipe(tiny_path, ipa_path):
    """A pipeline of its own (the session `pipe` stays without an adapter), loaded by diffusers."""
    from diffusers import FluxKontextPipeline

    p = FluxKontextPipeline.from_pretrained(tiny_path, dtype=torch.float32)
    p.load_ip_adapter(str(ipa_path), weight_name="ip_adapter.safetensors",
                      image_encoder_pretrained_model_name_or_path=str(ipa_path),
                      image_encoder_subfolder="image_encoder", image_encoder_dtype=torch.float32)
    return p


@pytest.fixture(scope="module")
def ours(tiny_path, ipa_path):
    return load_transformer(ip_config(tiny_path, ipa_path))


def picture(seed=0, h=40, w=56):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 32, 64, generator=g),
                encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
                pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.full((2,), 0.5),
                guidance=torch.ones(2), img_ids=torch.randn(32, 3, generator=g), txt_ids=torch.zeros(8, 3),
                return_dict=False)


def forward(model, embeds):
    """[2, 32, 64]; embeds [1, 1, D], repeated for the batch of 2 as the pipeline repeats them."""
    return model(**inputs(), joint_attention_kwargs={"ip_adapter_image_embeds": [embeds.repeat(2, 1, 1)]})[0]


def adapter_params(model) -> dict:
    return {k: v for k, v in model.named_parameters() if ".processor." in k or k.startswith("encoder_hid_proj.")}


def test_load_equals_pipeline(ours, ip_pipe):
    theirs = ip_pipe.transformer
    a, b = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert len(adapter_params(ours)) == 4 + 4 * ours.config.num_layers  # image_proj + k/v weight/bias per block
    assert ({n: type(p) for n, p in ours.attn_processors.items()} ==
            {n: type(p) for n, p in theirs.attn_processors.items()})
    assert [p.scale for p in ip_processors(ours)] == [p.scale for p in ip_processors(theirs)] == [[1.0]]
    assert ours.config.encoder_hid_dim_type == theirs.config.encoder_hid_dim_type == "ip_image_proj"
    assert not any(p.requires_grad for p in ours.parameters())
    assert type(ours).__name__ == "FluxTransformer2DModel" and type(ours) is type(theirs)  # _reporting undone


def test_forward_equals_pipeline_and_changes_output(ours, ip_pipe, pipe):
    embeds = ip_pipe.prepare_ip_adapter_image_embeds(picture(), None, "cpu", 1)[0]
    got, want = forward(ours, embeds), forward(ip_pipe.transformer, embeds)
    assert torch.equal(got, want)
    base = pipe.transformer(**inputs())[0]  # the same tiny transformer without an adapter
    assert float((got - base).norm() / base.norm()) > 0.1  # the tiny adapter's weights visibly act


def test_encode_ip_image_equals_pipeline(tiny_path, ipa_path, ip_pipe):
    enc, fe = load_image_encoder(ip_config(tiny_path, ipa_path))
    assert type(enc) is type(ip_pipe.image_encoder) and not enc.training
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(),
                                                 ip_pipe.image_encoder.state_dict().values()))
    assert fe.to_dict() == ip_pipe.feature_extractor.to_dict()
    zero = np.zeros((64, 48, 3), np.uint8)  # the pipeline's negative image, np.zeros((width, height, 3), uint8)
    embeds = []
    for image in (picture(), zero, picture(1, 64, 64)):
        got = encode_ip_image(enc, fe, image)
        want = ip_pipe.prepare_ip_adapter_image_embeds(image, None, CPU, 1)[0]
        assert got.shape == (1, 1, fixtures.TINY_IP_PROJECTION) and got.dtype == torch.float32
        assert torch.equal(got, want)
        embeds.append(got)
    assert not torch.allclose(embeds[0], embeds[1], atol=1e-3) and not torch.allclose(embeds[0], embeds[2], atol=1e-3)


def test_set_attention_keeps_ip_processors(tiny_path, ipa_path, monkeypatch):
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    from kontext_kernels.attention import CudnnFluxAttnProcessor

    model = load_transformer(ip_config(tiny_path, ipa_path))
    embeds = torch.randn(1, 1, fixtures.TINY_IP_PROJECTION, generator=torch.Generator().manual_seed(0))
    procs, weights = ip_processors(model), {k: v.clone() for k, v in adapter_params(model).items()}
    want = forward(model, embeds)
    assert set_attention(model, "default", CPU, torch.float32) == "default"
    assert ip_processors(model) == procs and all(a is b for a, b in zip(ip_processors(model), procs))
    assert attention_of(model) == {"native"}
    assert torch.equal(forward(model, embeds), want)
    assert set_attention(model, "math", CPU, torch.float32) == "math" and attention_of(model) == {"_native_math"}
    # "cudnn" (as on a GPU): our processor in the single blocks, the IP processors kept with PyTorch's flash
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert set_attention(model, "cudnn", CUDA, torch.bfloat16) == "cudnn"
    assert attention_of(model) == {"kontext_cudnn", "_native_flash"}
    assert all(a is b for a, b in zip(ip_processors(model), procs))
    assert all(isinstance(b.attn.processor, FluxIPAdapterAttnProcessor) for b in model.transformer_blocks)
    assert all(isinstance(b.attn.processor, CudnnFluxAttnProcessor) for b in model.single_transformer_blocks)
    assert adapter_params(model).keys() == weights.keys()
    assert all(torch.equal(v, weights[k]) for k, v in adapter_params(model).items())


def test_scale_applied(tiny_path, ipa_path, pipe):
    half = load_transformer(ip_config(tiny_path, ipa_path, scale=0.5))
    assert [p.scale for p in ip_processors(half)] == [[0.5]] * half.config.num_layers
    off = load_transformer(ip_config(tiny_path, ipa_path, scale=0.0))
    embeds = torch.randn(1, 1, fixtures.TINY_IP_PROJECTION, generator=torch.Generator().manual_seed(0))
    base = pipe.transformer(**inputs())[0]
    assert torch.allclose(forward(off, embeds), base, atol=1e-5)  # scale 0: the adapter's attention adds nothing
    assert not torch.allclose(forward(half, embeds), base, atol=1e-2)


def test_adapter_takes_the_compute_dtype(tiny_path, ipa_path):
    from kontext_kernels.fp8 import FP8Linear

    file = load_file(ipa_path / "ip_adapter.safetensors")
    bf16 = load_transformer(dataclasses.replace(ip_config(tiny_path, ipa_path),
                                                transformer=dataclasses.replace(tiny_config(tiny_path).transformer,
                                                                                dtype="bf16")))
    assert {p.dtype for p in adapter_params(bf16).values()} == {torch.bfloat16}
    # a quantized model whose first floating parameter is fp8 codes: diffusers' `model.dtype` says float8
    model = load_transformer(tiny_config(tiny_path))
    emb = model.time_text_embed.timestep_embedder
    emb.linear_1 = FP8Linear.from_linear(emb.linear_1)
    assert model.dtype == torch.float8_e4m3fn and model.x_embedder.weight.dtype == torch.float32
    add_ip_adapter(model, file)
    params = adapter_params(model)
    assert {p.dtype for p in params.values()} == {torch.float32} and model.dtype == torch.float8_e4m3fn
    want = file["double_blocks.0.processor.ip_adapter_double_stream_v_proj.weight"]
    assert torch.equal(params["transformer_blocks.0.attn.processor.to_v_ip.0.weight"], want)
    assert torch.equal(params["encoder_hid_proj.image_projection_layers.0.image_embeds.weight"],
                       file["ip_adapter_proj_model.proj.weight"])


def test_random_ip_adapter_state_for_bench():
    """fixtures.random_ip_adapter_state (bench.py's adapter, no file) at MINI_DIMS' width: XLabs' layout, seeded, in the
    transformer's compute dtype, loadable and usable."""
    model = fixtures.full_size_transformer("cpu", torch.float32, **fixtures.MINI_DIMS)
    state = fixtures.random_ip_adapter_state(model)  # projection_dim 768 and 4 tokens, as XLabs'
    joint, inner = fixtures.MINI_DIMS["joint_attention_dim"], model.inner_dim
    assert state["ip_adapter_proj_model.proj.weight"].shape == (4 * joint, 768)
    assert state["double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight"].shape == (inner, joint)
    assert len(state) == 4 + 4 * fixtures.MINI_DIMS["num_layers"]
    assert all(torch.equal(a, b) for a, b in zip(state.values(), fixtures.random_ip_adapter_state(model).values()))
    bf16 = fixtures.full_size_transformer("cpu", torch.bfloat16, **fixtures.MINI_DIMS)
    assert {t.dtype for t in fixtures.random_ip_adapter_state(bf16).values()} == {torch.bfloat16}
    add_ip_adapter(model, state)
    embeds = torch.randn(1, 1, 768, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(forward(model, embeds)).all()


def test_errors(tiny_path, ipa_path, tmp_path):
    model = load_transformer(tiny_config(tiny_path))
    cfg = ip_config(tiny_path, tmp_path)
    with pytest.raises(ValueError, match=r"ip_adapter: .*ip_adapter\.safetensors' does not exist"):
        load_ip_adapter(model, cfg)
    with pytest.raises(ValueError, match=r"weight_name: 'ip_adapter\.bin'; expected a \.safetensors"):
        load_ip_adapter(model, ip_config(tiny_path, ipa_path, weight_name="ip_adapter.bin"))
    save_file({"lora_A.weight": torch.zeros(2, 2)}, tmp_path / "ip_adapter.safetensors")
    with pytest.raises(ValueError, match=r"ip_adapter: '.*ip_adapter\.safetensors' holds no IP-Adapter keys.*"
                                         r"expected ip_adapter_proj_model\.\{proj,norm\}"):
        load_ip_adapter(model, cfg)
    good = load_file(ipa_path / "ip_adapter.safetensors")
    save_file({**good, "lora_A.weight": torch.zeros(2, 2)}, tmp_path / "ip_adapter.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys \['lora_A\.weight'\]"):
        load_ip_adapter(model, cfg)
    save_file(fixtures.ip_adapter_state(2, 128, 32, 24), tmp_path / "ip_adapter.safetensors")  # 2 double blocks
    with pytest.raises(ValueError, match=r"ip_adapter keys .*unexpected \['1\.to_k_ip\.bias'.*1 double blocks"):
        load_ip_adapter(model, cfg)
    save_file(fixtures.ip_adapter_state(1, 128, 16, 24), tmp_path / "ip_adapter.safetensors")  # joint_attention_dim 16
    with pytest.raises(ValueError, match=r"image_proj proj\.weight has shape \(64, 24\), expected \(128, 24\)"):
        load_ip_adapter(model, cfg)
    assert not ip_processors(model)  # nothing was loaded by a refused file
    with pytest.raises(ValueError, match=r"image_encoder: .*config\.json' does not exist"):
        load_image_encoder(ip_config(tiny_path, ipa_path, image_encoder_subfolder="nope"))


def test_repo_ids_through_the_cache(tiny_path, ipa_path, ours, offline_hub):
    # XLabs-AI/flux-ip-adapter and openai/clip-vit-large-patch14 are two repos, each with its files at the top
    test_load.fake_hub_cache(offline_hub, "someone/flux-ip-adapter", ipa_path)
    test_load.fake_hub_cache(offline_hub, "someone/clip-vit", ipa_path / "image_encoder")
    cfg = ip_config(tiny_path, "someone/flux-ip-adapter", image_encoder="someone/clip-vit", image_encoder_subfolder="")
    by_id = load_transformer(cfg)
    assert all(torch.equal(a, b) for a, b in zip(adapter_params(by_id).values(), adapter_params(ours).values()))
    enc, _ = load_image_encoder(cfg)
    local, _ = load_image_encoder(ip_config(tiny_path, ipa_path))
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), local.state_dict().values()))
    with pytest.raises(ValueError, match=r"ip_adapter: could not get 'sub/ip_adapter\.safetensors' from "
                                         r"'someone/absent'.*hf download someone/absent"):
        load_transformer(ip_config(tiny_path, "someone/absent", subfolder="sub"))
    with pytest.raises(ValueError, match=r"image_encoder: could not load CLIPVisionModelWithProjection from "
                                         r"'someone/absent'"):
        load_image_encoder(ip_config(tiny_path, ipa_path, image_encoder="someone/absent"))


def test_load_components(tiny_path, ipa_path):
    from transformers import CLIPVisionModelWithProjection

    c = load_components(ip_config(tiny_path, ipa_path, device="cpu"))
    assert isinstance(c.image_encoder, CLIPVisionModelWithProjection) and c.image_encoder.dtype == torch.float32
    assert not c.image_encoder.training and not any(p.requires_grad for p in c.image_encoder.parameters())
    assert type(c.feature_extractor).__name__.startswith("CLIPImageProcessor")
    assert ip_processors(c.transformer)
    only = load_components(ip_config(tiny_path, ipa_path), which=("transformer",))
    assert only.image_encoder is None and only.feature_extractor is None  # cached training: no encoder
    plain = load_components(tiny_config(tiny_path), which=("vae",))
    assert plain.image_encoder is None and plain.feature_extractor is None


def test_model_identity(tiny_path, ipa_path):
    plain = tiny_config(tiny_path)
    unset = dataclasses.replace(plain, ip_adapter=IPAdapterConfig(path="", image_encoder=str(ipa_path), dtype="fp32"))
    with_ip = ip_config(tiny_path, ipa_path)
    fp16 = ip_config(tiny_path, ipa_path, dtype="fp16")
    ident = {n: [model_identity(c, getattr(c, n), n) for c in (plain, unset, with_ip, fp16)]
             for n in ("clip", "t5", "vae")}
    assert ident["clip"][0] == ident["clip"][2] and ident["t5"][0] == ident["t5"][2]  # they do not embed the image
    vae = ident["vae"]
    assert vae[0] == vae[1]  # no path: the unused encoder fields change nothing, existing caches stay valid
    assert len({vae[0], vae[2], vae[3]}) == 3  # the encoder's source and dtype are part of the key


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.gpu
@torch.enable_grad()  # conftest runs tests under no_grad
def test_ip_adapter_under_auto_attention_gpu():
    """"auto" on a GPU with an IP-Adapter: our cuDNN processor in the single blocks, the IP processors kept with
    PyTorch's flash (IP_CUDNN_BACKEND); output and input gradient equal the math backend's within bf16 tolerance."""
    dims = dict(fixtures.MINI_DIMS, attention_head_dim=64, num_attention_heads=2, joint_attention_dim=64,
                axes_dims_rope=(8, 28, 28))
    torch.manual_seed(0)
    model = fixtures.full_size_transformer("cuda", **dims)  # bf16
    add_ip_adapter(model, fixtures.random_ip_adapter_state(model))
    g = torch.Generator("cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)

    rows = torch.arange(16, device="cuda")
    ids = torch.stack([torch.zeros(256, device="cuda"), rows.repeat_interleave(16).float(), rows.repeat(16).float()], 1)
    kw = dict(encoder_hidden_states=randn(1, 64, 64), pooled_projections=randn(1, 32),
              timestep=torch.ones(1, device="cuda"), guidance=torch.ones(1, device="cuda"), img_ids=ids,
              txt_ids=torch.zeros(64, 3, device="cuda"), return_dict=False)
    hidden, embeds, results = randn(1, 256, 64), randn(1, 1, 768), {}
    for backend in ("math", "auto"):
        assert set_attention(model, backend, CUDA, torch.bfloat16) == {"math": "math", "auto": "cudnn"}[backend]
        x = hidden.clone().requires_grad_()
        out = model(hidden_states=x, **kw, joint_attention_kwargs={"ip_adapter_image_embeds": [embeds]})[0]
        out.float().square().mean().backward()
        results[backend] = (out.detach(), x.grad)
    assert attention_of(model) == {"kontext_cudnn", "_native_flash"}
    for name, a, b in zip(("out", "grad"), results["auto"], results["math"]):
        assert torch.isfinite(a).all() and rel(a, b) < 3e-2, (name, rel(a, b))
