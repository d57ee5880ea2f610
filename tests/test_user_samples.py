"""user_samples.py: samples.jsonl read and checked before any model loads. Sampled during a run (and equal to
sample.py's edit with the run's LoRA): tests/test_report.py."""

import json

import numpy as np
import pytest
from PIL import Image

import user_samples


def test_reads_lines_relative_to_the_file(tmp_path):
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.full((16, 16, 3), 9, np.uint8)).save(tmp_path / "sub" / "b.png")
    f = tmp_path / "samples.jsonl"
    f.write_text(json.dumps({"control": "a.png", "prompt": "red"}) + "\n\n"
                 + json.dumps({"control": ["a.png", str(tmp_path / "sub" / "b.png")], "prompt": "hat", "seed": 7})
                 + "\n" + json.dumps({"prompt": "a red square"}) + "\n")
    rows = user_samples.read_sample_prompts(f)
    assert [(len(r["controls"]), r["prompt"], r["seed"], r["line"]) for r in rows] == \
        [(1, "red", None, 1), (2, "hat", 7, 3), (0, "a red square", None, 4)]
    assert rows[1]["controls"][1].size == (16, 16)


def test_every_problem_named_with_its_line(tmp_path):
    f = tmp_path / "samples.jsonl"
    f.write_text('{"control": "missing.png", "prompt": "x"}\n{"prompt": ""}\nnot json\n'
                 '{"prompt": "x", "seed": 1.5, "negative": "y"}\n{"control": 3, "prompt": "x"}\n')
    with pytest.raises(ValueError) as e:
        user_samples.read_sample_prompts(f)
    msg = str(e.value)
    for line, words in ((1, "missing.png"), (2, "non-empty string"), (3, "not JSON"), (4, "unknown key"),
                        (4, '"seed" must be an integer'), (5, "image path or a list")):
        assert f"samples.jsonl:{line}: " in msg and words in msg, (line, words, msg)
    with pytest.raises(ValueError, match="does not exist"):
        user_samples.read_sample_prompts(tmp_path / "nope.jsonl")
