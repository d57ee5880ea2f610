"""config.py: `--config file.py` loading, tyro overrides on top of it, validate(), the choice Literals against
their consumers, the help text, the JSON saved beside checkpoints, and the ground-floor rule (it imports no project
module)."""

import ast
import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import config
from config import (Config, DataConfig, ModelConfig, Part, SampleConfig, TrainConfig, cli, load_config, to_json,
                    validate)

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
    # no file: the dataclass defaults, which leave out the one required field
    assert cli(["--data.path", "d"]) == Config(data=DataConfig(path="d"))
    with pytest.raises(ValueError, match=r"^data\.path is required: a dataset folder or metadata\.csv/\.jsonl"):
        cli([])


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
    kinds = {f.name: f.default_factory for f in dataclasses.fields(ModelConfig) if callable(f.default_factory)}
    back = Config(model=ModelConfig(**{k: type(kinds[k]())(**v) if isinstance(v, dict) else v
                                       for k, v in d["model"].items()}), out_dir=d["out_dir"])
    assert back.model == cfg.model


def project_modules() -> set[str]:
    return {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()} \
        | {"configs", "tests", "kontext_kernels"}


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
    assert {"load", "kontext_kernels", "tiny"} <= project_modules()
    assert imported_modules("import kontext_kernels.fp8\ndef f():\n    from load import Part\n") == {"kontext_kernels", "load"}
    found = imported_modules((ROOT / "config.py").read_text())
    assert found and not found & (project_modules() | {"."}), sorted(found & project_modules())


# ---------------------------------------------------------------- choices


def choices(cls, name: str) -> set:
    return set(typing.get_args(typing.get_type_hints(cls)[name]))


def test_choice_literals_match_their_consumers():
    import load
    import objective
    import quant
    import train
    from kontext_kernels.attention import BACKENDS

    assert choices(Part, "dtype") == set(load.DTYPES)
    assert choices(ModelConfig, "quant") == set(quant.QUANTS)
    assert choices(TrainConfig, "attention_backend") == choices(SampleConfig, "attention_backend") \
        == {"auto", *BACKENDS}
    # train.py's dispatch takes every listed value (its own else-branch raises on anything else)
    for s in choices(TrainConfig, "scheduler"):
        assert 0 <= train.lr_factor(5, TrainConfig(scheduler=s, steps=10)) <= 1
    for s in choices(TrainConfig, "timestep_sampling"):
        import torch

        t = objective.sample_timesteps(4, TrainConfig(timestep_sampling=s), 16, torch.Generator().manual_seed(0))
        assert ((t > 0) & (t < 1)).all()
    import full
    import optim

    # LoRA mode: optim.py's table; full mode: full.py's steppers (config.FULL_OPTIMIZERS mirrors them)
    assert choices(TrainConfig, "optimizer") == set(optim.OPTIMIZERS) | set(full.STEPPERS)
    assert set(full.STEPPERS) == set(config.FULL_OPTIMIZERS)
    assert choices(TrainConfig, "mode") == {"lora", "full"} and choices(TrainConfig, "full_modules") == {"all",
                                                                                                         "attention"}
    assert choices(TrainConfig, "lora_init") == {"default", "gaussian"}


def test_choice_typo_fails_at_parse_time(capsys):
    """A choice flag with a value outside its Literal: one line naming the flag, every choice and the value (tyro's
    own panel wraps the choices onto a second line at 80 columns), before a --config file runs."""
    with pytest.raises(ValueError, match=r"^flags: --train.scheduler: expected one of constant \| linear \| cosine, "
                                         r"got 'cosin'$"):
        cli(["--data.path", "d", "--train.scheduler", "cosin"])
    with pytest.raises(ValueError, match="--model.transformer.dtype: expected one of fp32 .*, got 'bf61'"):
        cli(["--data.path", "d", "--model.transformer.dtype=bf61", "--config", "configs/nope.py"])
    with pytest.raises(ValueError, match="2 config problems:\n  --train.lora-format: .*\n  --sample.size_mode"):
        cli(["--train.lora-format", "kohy", "--sample.size_mode", "nativ"])
    assert cli(["--data.path", "d", "--train.scheduler", "linear"]).train.scheduler == "linear"


# ---------------------------------------------------------------- validate()


BAD_FILE = """
from config import Config, DataConfig, TrainConfig

config = Config(data=DataConfig(path="/data/edits"), train=TrainConfig(lr="abc", scheduler="cosin"))
"""


def test_config_file_types_fail_in_load_config_naming_each(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text(BAD_FILE)
    expected = (rf"^{f}: 2 config problems:\n"
                r"  train\.lr: expected a number > 0, got 'abc'\n"
                r"  train\.scheduler: expected one of constant \| linear \| cosine, got 'cosin'$")
    with pytest.raises(ValueError, match=expected):
        load_config(f)
    with pytest.raises(ValueError, match=expected):  # cli checks the file's types before tyro sees them
        cli(["--config", str(f), "--train.steps", "3"])


def test_train_py_refuses_a_bad_config_file_before_any_work(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text(BAD_FILE)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(f), "--out-dir", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"train.py: error: {f}: 2 config problems:" in r.stderr and "train.lr:" in r.stderr \
        and "train.scheduler:" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()  # no run folder, cache or model load: validation came first


def test_config_file_unknown_field_names_the_file(tmp_path):
    f = tmp_path / "typo.py"
    f.write_text("from config import Config, TrainConfig\nconfig = Config(train=TrainConfig(lrr=1e-4))\n")
    with pytest.raises(ValueError, match=rf"^{f}: .*unexpected keyword argument 'lrr'"):
        load_config(f)


def problem_lines(cfg: Config) -> list[str]:
    with pytest.raises(ValueError) as e:
        validate(cfg)
    lines = str(e.value).splitlines()
    return [ln.strip() for ln in lines[1:]] if len(lines) > 1 else lines


def test_validate_lists_every_problem_with_its_field():
    cfg = Config(data=DataConfig(path=""), resume="no/such/ckpt")
    t = cfg.train
    t.steps, t.batch_size, t.grad_accum, t.lr, t.rank = 0, 0, 0, 0.0, 0
    t.caption_dropout, t.warmup_steps, t.keep_checkpoints, t.log_every = 1.5, -1, -1, 0
    t.betas, t.target_modules, t.logit_std = (0.9, 1.0), (), -1.0
    cfg.data.max_sequence_length, cfg.data.held_out, cfg.data.resize = 513, -1, (8, 64)
    cfg.sample.num_inference_steps, cfg.model.clip.device = 0, "cuda0"
    lines = problem_lines(cfg)
    assert [p.split(":")[0].split(" ")[0] for p in lines] == [
        "data.resize", "data.max_sequence_length", "data.held_out",
        "train.steps", "train.batch_size", "train.grad_accum", "train.lr", "train.betas", "train.warmup_steps",
        "train.rank", "train.target_modules", "train.logit_std", "train.caption_dropout", "train.keep_checkpoints",
        "train.log_every", "sample.num_inference_steps", "data.path", "resume", "model.clip.device"]
    assert "train.steps: expected an integer >= 1, got 0" in lines
    assert "train.caption_dropout: expected a number in [0, 1], got 1.5" in lines
    assert "resume: expected \"\", \"latest\" or an existing checkpoint folder; 'no/such/ckpt' is not a folder" in lines
    assert any(p.startswith("data.path is required: a dataset folder or metadata.csv/.jsonl") for p in lines)


def test_validate_types_follow_the_annotations():
    ok = Config(data=DataConfig(path="d"))
    assert validate(ok) is None
    assert validate(dataclasses.replace(ok, train=TrainConfig(lr=1))) is None  # an int is a number
    bad = {
        "train.steps: expected an integer >= 1, got 2.0": TrainConfig(steps=2.0),
        "train.steps: expected an integer >= 1, got True": TrainConfig(steps=True),  # a bool is not an int
        "train.compile: expected True or False, got 1": TrainConfig(compile=1),
        "train.betas: expected a tuple of 2 numbers, each in [0, 1), got [0.9, 0.99]": TrainConfig(betas=[0.9, 0.99]),
        "train.target_modules: expected a tuple of strings, not empty, got ('to_q', 3)":
            TrainConfig(target_modules=("to_q", 3)),
        "train.optimizer: expected one of adamw | adamw8bit | paged_adamw8bit | lion8bit | prodigy | schedulefree_adamw | "
        "adafactor | torchao_adamw8bit, got 'sgd'": TrainConfig(optimizer="sgd"),
    }
    for line, tc in bad.items():
        assert problem_lines(dataclasses.replace(ok, train=tc)) == [line]
    assert problem_lines(dataclasses.replace(ok, model=ModelConfig(vae=Part(dtype="bf61"), quant="int8"))) == [
        "model.vae.dtype: expected one of fp32 | bf16 | fp16 | float32 | bfloat16 | float16, got 'bf61'",
        "model.quant: expected one of none | fp8 | nf4 | fp4, got 'int8'"]
    assert problem_lines(dataclasses.replace(ok, model=DataConfig()))[0].startswith(
        "model: expected a ModelConfig, got DataConfig(")
    assert problem_lines(dataclasses.replace(ok, data=DataConfig(path="d", resize=(512,)))) == [
        "data.resize: expected a tuple of 2 integers or None, each side >= 16 (sizes are floored to 16), got (512,)"]
    assert validate(dataclasses.replace(ok, data=DataConfig(path="d", resize=(512, 768)))) is None
    late = Config(data=DataConfig(path="d"))
    late.train.lrr = 1e-4  # set on the instance after construction: not a field
    assert problem_lines(late) == ["train.lrr: unknown field of TrainConfig"]


def test_validate_resume(tmp_path):
    for resume in ("", "latest", str(tmp_path)):
        assert validate(Config(data=DataConfig(path="d"), resume=resume)) is None
    assert problem_lines(Config(data=DataConfig(path="d"), resume=str(tmp_path / "gone")))[0].startswith("resume:")


def test_rules_name_real_fields():
    """A RULES key with a typo would silently check nothing."""
    def leaves(cls, prefix=""):
        for f in dataclasses.fields(cls):
            yield prefix + f.name
            if dataclasses.is_dataclass(f.type):
                yield from leaves(f.type, f"{prefix}{f.name}.")

    assert set(config.RULES) <= set(leaves(Config)), set(config.RULES) - set(leaves(Config))


def test_a_flag_can_supply_what_the_file_leaves_out(tmp_path):
    f = tmp_path / "model_only.py"
    f.write_text("from config import Config, TrainConfig\nconfig = Config(train=TrainConfig(steps=5))\n")
    with pytest.raises(ValueError, match=rf"^{f}: data\.path is required"):
        load_config(f)  # a file alone must be complete
    assert cli(["--config", str(f), "--data.path", "d"]).train.steps == 5
    with pytest.raises(ValueError, match=rf"^{f} \+ flags: train\.steps: expected an integer >= 1, got 0"):
        cli(["--config", str(f), "--data.path", "d", "--train.steps", "0"])


# ---------------------------------------------------------------- --help


def undocumented(source: str) -> list[str]:
    """Fields of the @dataclass classes in `source` without a description where tyro reads one for --help: a
    comment after the field (on its last line), a comment line right above it, or a docstring right below it."""
    lines, out = source.splitlines(), []
    for cls in ast.walk(ast.parse(source)):
        if not (isinstance(cls, ast.ClassDef) and any("dataclass" in ast.unparse(d) for d in cls.decorator_list)):
            continue
        for stmt, nxt in zip(cls.body, cls.body[1:] + [None]):
            if not isinstance(stmt, ast.AnnAssign):
                continue
            after = "#" in lines[stmt.end_lineno - 1][stmt.end_col_offset:]
            above = lines[stmt.lineno - 2].strip().startswith("#")
            below = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value,
                                                                                                       str)
            if not (after or above or below):
                out.append(f"{cls.name}.{stmt.target.id}")
    return out


def test_every_config_field_has_a_description():
    probe = ("@dataclass\nclass P:\n    a: int = 0\n    b: int = 0  # said\n    # said above\n    c: int = 0\n"
             "    d: int = 0\n    \"\"\"said below\"\"\"\n    e: tuple = (\n        1,\n    )  # said after\n"
             "\n\nclass NotAConfig:\n    f: int = 0\n")
    assert undocumented(probe) == ["P.a"]  # the rule sees a missing description, and only that
    assert undocumented((ROOT / "config.py").read_text()) == []


def test_help_mentions_the_config_flag(capsys):
    with pytest.raises(SystemExit):
        cli(["--help"], description="the train.py docstring line")
    out = capsys.readouterr().out
    assert "the train.py docstring line" in out and "--config PATH" in out and "{constant,linear,cosine}" in out
    assert "optimizer steps in all" in out  # a field comment, shown as its flag's help


def test_a_list_for_a_tuple_field_is_accepted(tmp_path):
    f = tmp_path / "lists.py"
    f.write_text("from config import Config, DataConfig, TrainConfig\n"
                 "config = Config(data=DataConfig(path='x', resize=[512, 768]),\n"
                 "                train=TrainConfig(target_modules=['to_q', 'to_k'], betas=[0.9, 0.99]))\n")
    cfg = load_config(f)
    assert cfg.train.target_modules == ("to_q", "to_k") and cfg.train.betas == (0.9, 0.99)
    assert cfg.data.resize == (512, 768)
    f.write_text("from config import Config, DataConfig, TrainConfig\n"
                 "config = Config(data=DataConfig(path='x'), train=TrainConfig(betas=[0.9, 2.0]))\n")
    with pytest.raises(ValueError, match="train.betas"):
        load_config(f)
