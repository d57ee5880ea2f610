import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from config import ModelConfig, Part  # noqa: E402
from tests_util import write_pair  # noqa: E402
from tiny import TinySpec, ensure_tiny  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return ensure_tiny(TinySpec())


def tiny_config(path, dtype: str = "fp32", device: str = "cpu") -> ModelConfig:
    part = lambda: Part(dtype=dtype, device=device)  # noqa: E731
    return ModelConfig(path=str(path), clip=part(), t5=part(), vae=part(), transformer=part())


@pytest.fixture(scope="session")
def tiny_cfg(tiny_path) -> ModelConfig:
    return tiny_config(tiny_path)


@pytest.fixture(scope="session")
def pipe(tiny_path):
    from diffusers import FluxKontextPipeline

    p = FluxKontextPipeline.from_pretrained(tiny_path, dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(autouse=True)
def _no_grad_by_default():
    # The pipeline's __call__ runs under no_grad; grad mode changes which SDPA kernel runs (and the last bits), so
    # parity tests compare the pipeline's methods with ours in the same mode. Training tests enable grad.
    with torch.no_grad():
        yield


@pytest.fixture(scope="session")
def components(tiny_cfg):
    from load import load_components

    return load_components(tiny_cfg)


@pytest.fixture
def data(tmp_path):
    """Three folder-layout pairs s0, s1, s2 (s0 with a mask) (tests/test_data.py, test_images.py, test_cache.py)."""
    root = tmp_path / "data"
    for i in range(3):
        write_pair(root, f"s{i}", seed=i, mask=(i == 0))
    return root
