"""compile_cache.py: torch.compile's work saved by one process and reused by the next (inductor on the CPU stands in
for CUDA: the same portable cache artifacts)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compile_cache

ROOT = Path(__file__).resolve().parents[1]

COMPILE_ONCE = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import compile_cache
from torch._dynamo.utils import counters
path = compile_cache.Path(sys.argv[2])
loaded = compile_cache.load(path)
f = torch.compile(lambda x, w: torch.nn.functional.gelu(x @ w).sum(-1), backend="inductor")
out = f(torch.ones(8, 16), torch.full((16, 4), 0.5))
saved = compile_cache.save(path)
print(json.dumps(dict(loaded=loaded, saved=saved, hits=counters["inductor"]["fxgraph_cache_hit"],
                      out=out.tolist())))
"""


def compile_in_new_process(tmp_path, name: str, file: Path) -> dict:
    # a fresh inductor cache folder each time: only our file can carry the work from one process to the next
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"inductor-{name}"))
    out = subprocess.run([sys.executable, "-c", COMPILE_ONCE, str(ROOT), str(file)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_process_reuses_the_first_ones_compilation(tmp_path):
    file = tmp_path / "cache" / "setting.bin"
    first = compile_in_new_process(tmp_path, "a", file)
    assert first["loaded"] is False and first["saved"] is True and first["hits"] == 0 and file.stat().st_size > 0
    second = compile_in_new_process(tmp_path, "b", file)
    assert second["loaded"] is True and second["saved"] is False  # never overwritten
    assert second["hits"] >= 1 and second["out"] == first["out"]


def test_a_bad_file_warns_and_compiles_cold(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a cache")
    with pytest.warns(UserWarning, match="not loaded"):
        assert compile_cache.load(bad) is False
    assert compile_cache.load(tmp_path / "missing.bin") is False and compile_cache.load(None) is False


def test_the_file_name_follows_the_setting(tiny_path):
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    assert compile_cache.cache_file("", {}) is None
    t = FluxTransformer2DModel.from_pretrained(tiny_path, subfolder="transformer")
    names = {compile_cache.cache_file("~/c", compile_cache.describe(t, job="sample", images=[[64, 64]]))}
    names.add(compile_cache.cache_file("~/c", compile_cache.describe(t, job="sample", images=[[64, 96]])))
    t.add_adapter(LoraConfig(r=4, target_modules=["to_q"]))
    names.add(compile_cache.cache_file("~/c", compile_cache.describe(t, job="sample", images=[[64, 64]])))
    t.to(torch.bfloat16)
    names.add(compile_cache.cache_file("~/c", compile_cache.describe(t, job="sample", images=[[64, 64]])))
    assert len(names) == 4 and all(n.parent == Path("~/c").expanduser() for n in names)
    assert not compile_cache.is_compiled(t)
    t.compile_repeated_blocks(fullgraph=False)  # marks the blocks; nothing compiles until they run
    assert compile_cache.is_compiled(t)
    assert json.dumps(compile_cache.describe(t), default=str)
