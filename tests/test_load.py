"""load.py against FluxKontextPipeline.from_pretrained on the same folder."""

import shutil

import pytest
import torch

from conftest import tiny_config
from load import load_clip, load_clip_tokenizer, load_components, load_t5, load_t5_tokenizer, load_transformer, load_vae

LONG = " ".join(["a photo of a cat sitting on a red chair in a sunny garden"] * 60)  # > 77 and > 512 tokens
PROMPTS = ["", "make the sky red", LONG, "une photo d'un chat, café, 日本語 ümlaut", "Turn THE cat   into a dog!"]


def assert_same_module(ours, theirs):
    a, b = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert dict(ours.named_buffers()).keys() == dict(theirs.named_buffers()).keys()


@pytest.mark.parametrize("name", ["clip", "t5", "vae", "transformer"])
def test_models_equal_pipeline(tiny_cfg, pipe, name):
    ours = {"clip": load_clip, "t5": load_t5, "vae": load_vae, "transformer": load_transformer}[name](tiny_cfg)
    theirs = {"clip": pipe.text_encoder, "t5": pipe.text_encoder_2, "vae": pipe.vae, "transformer": pipe.transformer}
    assert type(ours) is type(theirs[name])
    assert_same_module(ours, theirs[name])
    assert not any(p.requires_grad for p in ours.parameters())


def test_tokenizers_equal_pipeline(tiny_cfg, pipe):
    for ours, theirs, n in [(load_clip_tokenizer(tiny_cfg), pipe.tokenizer, 77),
                            (load_t5_tokenizer(tiny_cfg), pipe.tokenizer_2, 512)]:
        for p in PROMPTS:
            kw = dict(padding="max_length", max_length=n, truncation=True)
            assert ours(p, **kw).input_ids == theirs(p, **kw).input_ids
            assert ours(p).input_ids == theirs(p).input_ids
        assert len(ours(LONG).input_ids) > n  # the long prompt really is longer than the limit


def test_dtype_and_device_per_component(tiny_path):
    cfg = tiny_config(tiny_path)
    cfg.t5.dtype, cfg.vae.dtype = "bf16", "fp16"
    c = load_components(cfg)
    assert c.t5.dtype == torch.bfloat16 and c.vae.dtype == torch.float16 and c.clip.dtype == torch.float32
    assert all(p.device.type == "cpu" for p in c.transformer.parameters())


def test_components_from_different_sources(tiny_path, tmp_path):
    other = tmp_path / "transformer_only"
    shutil.copytree(tiny_path / "transformer", other / "transformer")
    cfg = tiny_config(tiny_path)
    cfg.transformer.path = str(other)
    assert load_components(cfg, which=("transformer",)).transformer is not None
    cfg.transformer.path, cfg.transformer.subfolder = str(other / "transformer"), "."
    assert load_transformer(cfg) is not None


def test_missing_folder_error(tmp_path):
    cfg = tiny_config(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"transformer: path .*nope.* does not exist"):
        load_transformer(cfg)


def test_missing_subfolder_error(tiny_path, tmp_path):
    broken = tmp_path / "no_transformer"
    shutil.copytree(tiny_path, broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(ValueError, match=r"transformer: .*no_transformer.* has no subfolder 'transformer'"):
        load_components(tiny_config(broken))


def test_wrong_model_type_error(tiny_path):
    cfg = tiny_config(tiny_path)
    cfg.transformer.subfolder = "vae"
    with pytest.raises(ValueError, match=r"describes \['AutoencoderKL'\]; expected FluxTransformer2DModel"):
        load_transformer(cfg)


def test_dtype_typo_error(tiny_path):
    cfg = tiny_config(tiny_path)
    cfg.vae.dtype = "bf61"
    with pytest.raises(ValueError, match=r"vae: unknown dtype 'bf61'"):
        load_vae(cfg)


def test_bad_device_error(tiny_path):
    cfg = tiny_config(tiny_path)
    cfg.clip.device = "gpu0"
    with pytest.raises(ValueError, match=r"clip: bad device 'gpu0'"):
        load_clip(cfg)


def fake_hub_cache(cache, repo, folder):
    """The Hugging Face cache layout (models--org--name/refs/main -> snapshots/<commit>/...) holding `folder`'s
    files, as `hf download` leaves it: the stand-in for the Hub in offline tests."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_transformer_repo_id_from_cache(tiny_path, tmp_path, offline_hub):
    # a pre-quantized fp8 repo named by id (configs/fp8.py's kind of source), and a bf16 repo quantized at load
    from safetensors.torch import load_file, save_file

    from kontext_kernels.fp8 import FP8Linear
    from test_quant import comfy_scaled

    state = load_file(tiny_path / "transformer" / "diffusion_pytorch_model.safetensors")
    tensors, _dense = comfy_scaled(state)
    export = tmp_path / "export"
    (export / "transformer").mkdir(parents=True)
    shutil.copy(tiny_path / "transformer" / "config.json", export / "transformer" / "config.json")
    save_file(tensors, export / "transformer" / "diffusion_pytorch_model.safetensors")
    fake_hub_cache(offline_hub, "someone/kontext-fp8-scaled", export)
    fake_hub_cache(offline_hub, "someone/kontext-bf16", tiny_path)

    cfg = tiny_config("someone/kontext-fp8-scaled")
    model = load_transformer(cfg)  # quant "none": detected from the files, as for a local folder
    assert any(isinstance(m, FP8Linear) for m in model.modules())
    cfg = tiny_config("someone/kontext-bf16")
    cfg.quant = "fp8"
    assert any(isinstance(m, FP8Linear) for m in load_transformer(cfg).modules())
    cfg.quant = "none"
    plain = load_transformer(cfg)
    assert not any(isinstance(m, FP8Linear) for m in plain.modules())
    ref = load_transformer(tiny_config(tiny_path))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), ref.state_dict().values()))


def test_transformer_repo_id_not_cached_offline(offline_hub):
    with pytest.raises(ValueError, match=r"transformer: could not get 'someone/absent' \(subfolder 'transformer'\) "
                                         r"from the Hugging Face Hub or its cache.*hf download someone/absent"):
        load_transformer(tiny_config("someone/absent"))


def test_transformer_repo_id_without_transformer_folder(tiny_path, tmp_path, offline_hub):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_path / "vae", partial / "vae")
    fake_hub_cache(offline_hub, "someone/vae-only", partial)
    with pytest.raises(ValueError, match=r"transformer: .*snapshots.* has no subfolder 'transformer'"):
        load_transformer(tiny_config("someone/vae-only"))


def test_scaleless_fp8_repo_id_refused(tiny_path, tmp_path, offline_hub):
    # configs/fp8.py's note: AlekseyCalvin/Flux_Kontext_Dev_fp8_scaled_diffusers kept scaled codes, dropped scales
    from safetensors.torch import load_file, save_file

    from test_quant import comfy_scaled

    tensors, _ = comfy_scaled(load_file(tiny_path / "transformer" / "diffusion_pytorch_model.safetensors"), peak=416.0)
    codes = {k: v for k, v in tensors.items() if not k.endswith((".scale_weight", ".scale_input", "scaled_fp8"))}
    export = tmp_path / "export"
    (export / "transformer").mkdir(parents=True)
    shutil.copy(tiny_path / "transformer" / "config.json", export / "transformer" / "config.json")
    save_file(codes, export / "transformer" / "diffusion_pytorch_model.safetensors")
    fake_hub_cache(offline_hub, "AlekseyCalvin/Flux_Kontext_Dev_fp8_scaled_diffusers", export)
    with pytest.raises(ValueError, match=r"no scale.*fp8_scales"):
        load_transformer(tiny_config("AlekseyCalvin/Flux_Kontext_Dev_fp8_scaled_diffusers"))


def test_hub_kernels_off_in_our_loaders_and_a_fallback_in_the_pipeline(tiny_cfg, pipe):
    """transformers >= 5.25 kernelizes what it loads unless told not to (README: Hub kernels). Ours are told not to;
    the pipeline's are kernelized for the device they were read on (the CPU), where no Hub kernel is mapped, so every
    activation keeps its class's own torch forward (no instance `forward`) and the two run the same code."""
    ours = [load_clip(tiny_cfg), load_t5(tiny_cfg)]
    assert not any(m.use_kernels for m in ours)
    for model in ours + [pipe.text_encoder, pipe.text_encoder_2]:
        assert not [n for n, m in model.named_modules() if "forward" in m.__dict__], type(model).__name__


NO_NETWORK_LOAD = r"""
import socket, sys
sys.modules["kernels"] = None  # the PyPI `kernels` missing: transformers 5.25 refuses to load with use_kernels on
attempts = []
def refuse(self, address, *a, **k):
    attempts.append(address)
    raise OSError("network refused by the test")
socket.socket.connect = refuse
sys.path.insert(0, sys.argv[1])
from conftest import tiny_config
from load import load_components
from pathlib import Path
c = load_components(tiny_config(Path(sys.argv[2])))
assert c.clip is not None and c.t5 is not None and c.vae is not None and c.transformer is not None
print("connects", len(attempts), attempts[:3])
"""


def test_loading_reaches_no_network_and_needs_no_kernels_package(tiny_path, tmp_path):
    """Without the PyPI `kernels` package and with every socket connect refused (HF_HUB_OFFLINE unset, as a user
    who never set it has), load_components reads the whole tiny checkpoint and never tries to connect."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    tests = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join([str(tests.parent), str(tests)])
    out = subprocess.run([sys.executable, "-c", NO_NETWORK_LOAD, str(tests), str(tiny_path)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "connects 0 []" in out.stdout, out.stdout
