"""config.py: `--config file.py` loading, tyro overrides on top of it, the JSON saved beside checkpoints, and the
ground-floor rule (it imports no project module)."""

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from config import Config, ModelConfig, Part, cli, load_config, to_json

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILE = """
from config import Config, DataConfig, ModelConfig, Part, TrainConfig

config = Config(
    model=ModelConfig(path="some/model", transformer=Part(path="/ckpt/fp8", dtype="fp32", device="cuda:1"),
                      quant="fp8"),
    data=DataConfig(path="/data/edits", resize=(512, 768)),
    train=TrainConfig(steps=7, lr=3e-4, target_modules=("to_q", "to_v")),
    out_dir="runs/x",
)
"""


@pytest.fixture
def config_file(tmp_path) -> Path:
    f = tmp_path / "mine.py"
    f.write_text(CONFIG_FILE)
    return f


def test_load_config_runs_the_file(config_file):
    cfg = load_config(config_file)
    assert isinstance(cfg, Config) and cfg.out_dir == "runs/x"
    assert cfg.model.path == "some/model" and cfg.model.quant == "fp8"
    assert cfg.model.transformer == Part(path="/ckpt/fp8", subfolder="", dtype="fp32", device="cuda:1")
    assert cfg.model.clip == Part()  # the fields the file leaves out keep their defaults
    assert cfg.train.steps == 7 and cfg.train.lr == 3e-4 and cfg.train.rank == 16
    assert cfg.data.resize == (512, 768)


def test_model_defaults():
    # the defaults configs/*.py and saved run JSON rely on
    assert Part() == Part(path="", subfolder="", dtype="bf16", device="cpu")
    m = ModelConfig()
    assert m.path == "black-forest-labs/FLUX.1-Kontext-dev" and m.quant == "none" and m.fp8_scales == ""
    assert m.clip == m.t5 == m.vae == m.transformer == Part() and m.clip is not m.t5  # one Part each, not shared


def test_load_config_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.py"
    with pytest.raises(ValueError, match=rf"{missing.name}.* does not exist"):
        load_config(missing)
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ValueError, match=r"empty\.py.*must define `config = Config\(...\)`; found NoneType"):
        load_config(empty)
    wrong = tmp_path / "wrong.py"
    wrong.write_text("from config import TrainConfig\nconfig = TrainConfig()\n")
    with pytest.raises(ValueError, match=r"wrong\.py.*found TrainConfig"):
        load_config(wrong)


def test_cli_file_then_flags(config_file):
    cfg = cli(["--config", str(config_file), "--train.lr", "2e-5", "--model.transformer.dtype", "bf16"])
    assert cfg.train.lr == 2e-5 and cfg.model.transformer.dtype == "bf16"
    # everything not overridden comes from the file, not from the dataclass defaults
    assert cfg.train.steps == 7 and cfg.model.transformer.path == "/ckpt/fp8" and cfg.out_dir == "runs/x"
    same = cli([f"--config={config_file}", "--train.lr", "2e-5", "--model.transformer.dtype", "bf16"])
    assert same == cfg
    assert cli([]) == Config()  # no file: the dataclass defaults


def test_cli_unknown_flag_fails(config_file):
    with pytest.raises(SystemExit):
        cli(["--config", str(config_file), "--train.learning_rate", "1e-4"])
    with pytest.raises(SystemExit):
        cli(["--config"])  # a flag without its path


def test_to_json_round_trips(config_file):
    cfg = cli(["--config", str(config_file), "--train.lr", "2e-5"])
    d = json.loads(to_json(cfg))
    assert d == json.loads(json.dumps(dataclasses.asdict(cfg)))  # every field, nothing stringified
    assert d["train"]["lr"] == 2e-5 and d["train"]["steps"] == 7 and d["out_dir"] == "runs/x"
    assert d["model"]["transformer"] == {"path": "/ckpt/fp8", "subfolder": "", "dtype": "fp32", "device": "cuda:1"}
    assert d["model"]["quant"] == "fp8" and d["train"]["target_modules"] == ["to_q", "to_v"]
    back = Config(model=ModelConfig(**{k: Part(**v) if isinstance(v, dict) else v for k, v in d["model"].items()}),
                  out_dir=d["out_dir"])
    assert back.model == cfg.model


def project_modules() -> set[str]:
    return {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()} \
        | {"configs", "tests", "kernels"}


def imported_modules(source: str) -> set[str]:
    """Top-level names of every import in `source`, at any depth (lazy imports inside functions count too)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
    return names


def test_config_imports_no_project_module():
    assert {"load", "kernels", "tiny"} <= project_modules()
    assert imported_modules("import kernels.fp8\ndef f():\n    from load import Part\n") == {"kernels", "load"}
    found = imported_modules((ROOT / "config.py").read_text())
    assert found and not found & (project_modules() | {"."}), sorted(found & project_modules())
