"""README.md's "Use from Python" cells, run as a notebook runs them: in order, in one namespace, from the repository's
folder. Then what they returned is checked, so the section stays true (issue 20)."""

import os
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of README.md's `## <section>` (up to the next `## ` heading)."""
    text = (ROOT / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_the_section_has_its_cells():
    blocks = python_blocks("Use from Python")
    assert len(blocks) == 4
    assert "load_components" in blocks[1] and "train.main(cfg)" in blocks[2] and "load_lora" in blocks[3]


def test_use_from_python_runs(tiny_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    rng = torch.get_rng_state()
    ns: dict = {}
    with torch.enable_grad():  # as in a notebook (conftest runs every test under no_grad)
        for i, block in enumerate(python_blocks("Use from Python")):
            exec(compile(block, f"README.md Use-from-Python cell {i + 1}", "exec"), ns)
    # no process-wide trace: the caller's random state is as it was (training seeds inside fork_rng)
    assert torch.equal(torch.get_rng_state(), rng)
    run, before, after = ns["run"], ns["before"], ns["after"]
    assert run["lora"].is_file() and len(run["history"]) == ns["cfg"].train.steps
    assert run["history"][-1]["loss"] < run["history"][0]["loss"]
    assert not torch.equal(before.latents, after.latents)  # the loaded LoRA changed the edit
    grid = ns["tile_grid"]([[ns["control"], before.images[0], after.images[0]]], gap=2)
    assert grid.size == (3 * ns["control"].width + 4, ns["control"].height)
    assert os.path.samefile(Path(ns["cfg"].out_dir).resolve().parent, ROOT / "runs")
