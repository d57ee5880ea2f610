"""Nothing lost, every check before the weights load, a quiet start (issue 29): the run folder's lock, --overwrite
deleting last, one history on resume, Ctrl-C's line, checks that need no weights, output file modes."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import atomic
import quiet
import rundir
import train
from config import Config, cli, load_config
from test_train import run, tiny_cfg  # one tiny run's config and runner for both files

ROOT = Path(__file__).resolve().parents[1]


def earlier_run(out: Path) -> dict:
    """A fake earlier run's files, and what they hold."""
    (out / "checkpoints").mkdir(parents=True)
    files = {"lora.safetensors": b"old lora", "log.jsonl": b'{"step": 1}\n', "config.json": b"{}",
             "checkpoints/latest.json": b"{}"}
    for name, data in files.items():
        (out / name).write_bytes(data)
    return files


def intact(out: Path, files: dict) -> bool:
    return all((out / n).is_file() and (out / n).read_bytes() == d for n, d in files.items())


def no_weights(monkeypatch):
    """Make any weight load fail loudly: a test passing with this proves its check ran before the weights."""
    def loaded(*a, **k):
        raise AssertionError("weights were loaded before the check")
    import cache
    import load
    import sample
    for mod, name in ((train, "load_transformer"), (load, "load_transformer"), (sample, "load_components"),
                      (cache, "load_components"), (train, "training_data")):
        monkeypatch.setattr(mod, name, loaded)


# ---------------------------------------------------------------- one run per folder


def test_lock_refuses_a_second_run_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); import rundir; from pathlib import Path\n"
        "with rundir.one_run(Path(sys.argv[2])):\n    print('held', flush=True); time.sleep(60)"),
        str(ROOT), str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"in use by another run \(pid {holder.pid} on .*\)"):
            with rundir.one_run(tmp_path / "run"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with rundir.one_run(tmp_path / "run"):  # the kernel dropped the dead holder's lock: no stale lock
        pass
    with rundir.one_run(tmp_path / "run", hold=False), rundir.one_run(tmp_path / "run"):
        pass  # ranks other than 0 take no lock


def test_concurrent_runs_second_refused_then_ctrl_c(tmp_path):
    """Two real train.py processes into one folder: the second exits 2 at once naming the first; the first prints
    none of the known import warnings, and Ctrl-C ends it with one line naming the checkpoint and --resume latest."""
    out = tmp_path / "run"
    args = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "tiny.py"), "--out-dir",
            str(out), "--data.cache-dir", str(tmp_path / "cache"), "--train.validate-every", "-1",
            "--train.save-every", "1", "--train.steps", "100000"]
    a = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.time() + 300
        while not (out / "checkpoints" / "latest.json").is_file():
            assert a.poll() is None and time.time() < deadline, a.communicate()
            time.sleep(0.5)
        b = subprocess.run(args + ["--train.rank", "4"], capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert b.returncode == 2 and "Traceback" not in b.stderr, b.stderr[-2000:]
        assert f"is in use by another run (pid {a.pid} on " in b.stderr
        a.send_signal(signal.SIGINT)
        stdout, stderr = a.communicate(timeout=120)
    finally:
        a.kill()
    assert a.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: the last checkpoint is ") and last.endswith("--resume latest"), last
    assert "--train.steps 100000" in last
    for _, text in quiet.KNOWN:
        assert text not in stdout + stderr, text
    assert json.loads((out / "config.json").read_text())["train"]["rank"] == 8  # a's, untouched by b


# ---------------------------------------------------------------- --overwrite deletes last


def test_overwrite_with_a_bad_model_path_keeps_the_earlier_run(tmp_path, monkeypatch):
    out = tmp_path / "run"
    files = earlier_run(out)
    cfg = tiny_cfg(tmp_path, steps=4)
    cfg = dataclasses.replace(cfg, overwrite=True, model=dataclasses.replace(cfg.model, path=str(tmp_path / "typo")))
    no_weights(monkeypatch)
    with pytest.raises(ValueError, match="typo.*does not exist"):
        run(cfg)
    assert intact(out, files) and not (out / rundir.REPLACED).exists()


def test_overwrite_restores_the_earlier_run_when_the_new_one_fails_before_a_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    files = earlier_run(out)
    monkeypatch.setattr(train, "training_data", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        run(dataclasses.replace(tiny_cfg(tmp_path, steps=4), overwrite=True))
    assert intact(out, files) and not (out / rundir.REPLACED).exists()


def test_set_aside_settle_and_a_killed_replacement(tmp_path):
    out = tmp_path / "run"
    files = earlier_run(out)
    (out / "cache").mkdir()
    assert "moved to" in rundir.set_aside(out)
    assert not (out / "lora.safetensors").exists() and intact(out / rundir.REPLACED, files)
    assert (out / "cache").is_dir()  # the content-keyed cache stays
    (out / "log.jsonl").write_text('{"step": 1}\n')  # the new run, then killed before its first checkpoint
    with pytest.raises(ValueError, match="holds an earlier run"):
        rundir.claim(out, "", False)
    assert any(rundir.REPLACED in n for n in rundir.claim(out, "", True))
    assert "stays in" in rundir.set_aside(out)  # the killed run's files go, the replaced run stays
    assert intact(out / rundir.REPLACED, files) and not (out / "log.jsonl").exists()
    assert "deleted the replaced run" in rundir.settle(out)
    assert not (out / rundir.REPLACED).exists() and rundir.settle(out) is None


def test_overwrite_end_to_end_deletes_the_earlier_run_at_the_first_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    files = earlier_run(out)
    run(dataclasses.replace(tiny_cfg(tmp_path, steps=2), overwrite=True))
    text = capsys.readouterr().out
    assert "moved to" in text and "deleted the replaced run" in text
    assert not (out / rundir.REPLACED).exists() and (out / "lora.safetensors").read_bytes() != files["lora.safetensors"]


# ---------------------------------------------------------------- one history


def test_resume_keeps_one_history(tmp_path):
    """A kill after step 4 whose last checkpoint is step 2: the log holds 1-4; resuming drops 3-4 and trains them
    again, so each step is logged once, and the weights equal a straight run."""
    cfg = tiny_cfg(tmp_path, steps=4, save_every=2, keep_checkpoints=0)
    run(cfg)
    out = Path(cfg.out_dir)
    ckpts = {json.loads((d / "state.json").read_text())["step"]: d for d in (out / "checkpoints").glob("lora-*")}
    (out / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "path": ckpts[2].name, "run": "x"}))
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.1')  # torn by the kill
    run(dataclasses.replace(cfg, resume="latest"))
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], steps


def test_one_history_unit(tmp_path):
    log = tmp_path / "log.jsonl"
    assert rundir.one_history(log, 3) == 0
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4, 5)) + '{"step": 6')
    assert rundir.one_history(log, 3) == 3
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]


def test_interrupted_note(tmp_path):
    assert "no checkpoint was written" in train.interrupted_note([], str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.json").write_text(json.dumps({"step": 7, "path": "lora-abc"}))
    note = train.interrupted_note(["--config", "c.py", "--overwrite", "--resume", "x", "--train.lr", "1"],
                                  str(tmp_path))
    assert "lora-abc (step 7)" in note and note.endswith("python train.py --config c.py --train.lr 1 --resume latest")


# ---------------------------------------------------------------- checks before any weights load


def fake_checkpoint(folder: Path, cfg: Config, rank: int) -> Path:
    d = folder / "checkpoints" / "lora-0"
    d.mkdir(parents=True)
    save_file({"transformer.x.lora_A.weight": torch.zeros(rank, 4)}, d / "lora.safetensors")
    save_file({}, d / "optimizer.safetensors")
    (d / "state.json").write_text(json.dumps({"step": 2, "run": "r", "param_groups": [], "scalars": {}}))
    saved = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, rank=rank))
    (d / "config.json").write_text(json.dumps(dataclasses.asdict(saved), default=str))
    (folder / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "path": d.name}))
    return d


def test_resume_with_another_rank_fails_before_weights(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, steps=4)
    fake_checkpoint(Path(cfg.out_dir), cfg, rank=16)
    no_weights(monkeypatch)
    with pytest.raises(ValueError, match=r"trained with train.rank = 16, the config says 8"):
        run(dataclasses.replace(cfg, resume="latest"))


def test_long_captions_warn_naming_the_file(tmp_path, capsys, monkeypatch):
    from tests_util import write_pair

    data = tmp_path / "data"
    for i in range(3):
        write_pair(data, f"s{i}", seed=i, caption="make the square red " + "very " * (200 if i == 1 else 0))
    cfg = tiny_cfg(tmp_path, steps=4)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=str(data), held_out=0))
    monkeypatch.setattr(train, "training_data", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop here")))
    with pytest.raises(RuntimeError, match="stop here"):
        run(cfg)
    out = capsys.readouterr().out
    assert "1 caption(s) are longer than data.max_sequence_length=32" in out and "s1.png:" in out, out


def test_config_file_problems_all_at_once(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("from config import Config, TrainConfig\n"
                 "config = Config(train=TrainConfig(lr='abc', rank='x', steps=-5))\n")
    with pytest.raises(ValueError) as e:
        cli(["--config", str(f)])
    text = str(e.value)
    assert "3 config problems" in text and all(k in text for k in ("train.lr", "train.rank", "train.steps")), text


def write_lora(path: Path, fill: float = 0.0, rank: int = 2, inner: int | None = None):
    from load import transformer_skeleton
    skel = transformer_skeleton(load_config(ROOT / "configs" / "tiny.py").model)
    dim = inner or skel.inner_dim
    name = "transformer.transformer_blocks.0.attn.to_q"
    save_file({f"{name}.lora_A.weight": torch.full((rank, dim), fill), f"{name}.lora_B.weight": torch.zeros(dim, rank)},
              path)
    return path


@pytest.mark.parametrize("case, match", [
    ("nan", "not finite floating point"),
    ("shape", "expected \\[r, "),
    ("keys", "match no Linear module"),
    ("small", "expected at least 16x16 pixels"),
    ("steps", "sample.num_inference_steps: expected an integer >= 1, got 0"),
])
def test_sample_refuses_before_loading(tmp_path, monkeypatch, case, match):
    import sample
    from PIL import Image

    image = tmp_path / "in.png"
    Image.new("RGB", (8, 8) if case == "small" else (32, 32)).save(image)
    lora = tmp_path / "l.safetensors"
    if case == "keys":
        save_file({"transformer.nope.lora_A.weight": torch.zeros(2, 4), "transformer.nope.lora_B.weight":
                   torch.zeros(4, 2)}, lora)
    else:
        write_lora(lora, float("nan") if case == "nan" else 0.0, inner=5 if case == "shape" else None)
    argv = ["--config", str(ROOT / "configs" / "tiny.py"), "--image", str(image), "--prompt", "x", "--lora",
            str(lora), "--out", str(tmp_path / "o.png")] + (["--sample.num-inference-steps", "0"] if case == "steps"
                                                            else [])
    no_weights(monkeypatch)
    with pytest.raises(ValueError, match=match):
        sample.main(sample.parse_args(argv))


def test_sample_cli_exit_2_and_pixel_budget(tmp_path, capsys):
    import sample
    from PIL import Image

    big = Image.new("RGB", (3000, 2000))
    small = sample._within_budget(big, "big.png", 1024 ** 2)
    assert small.width * small.height <= 1024 ** 2 and abs(small.width / small.height - 1.5) < 0.01
    assert f"is 3000x2000; resized to {small.width}x{small.height}" in capsys.readouterr().out
    assert sample._within_budget(big, "big.png", 3000 * 2000) is big
    lora = write_lora(tmp_path / "nan.safetensors", float("nan"))
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--config", str(ROOT / "configs" / "tiny.py"),
                        "--image", str(tmp_path / "in.png"), "--prompt", "x", "--lora", str(lora)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not finite" in r.stderr, r.stderr[-2000:]


def test_nonfinite_latents_stop_naming_the_step(components, tmp_path):
    from PIL import Image

    import sample
    bias = components.transformer.proj_out.bias
    kept = bias.detach().clone()
    bias.data[0] = float("nan")
    try:
        with pytest.raises(FloatingPointError, match="denoising step 1 of 2"):
            sample.sample(components, Image.new("RGB", (32, 32)), "x", num_inference_steps=2, max_sequence_length=32)
    finally:
        bias.data.copy_(kept)


# ---------------------------------------------------------------- files and texts as users expect


def test_outputs_take_the_umask(tmp_path):
    from cache import save_atomic

    old = os.umask(0o027)
    try:
        save_atomic({"a": torch.zeros(2)}, tmp_path / "x.safetensors")
        fd, tmp = atomic.temp_beside(tmp_path / "y")
        os.close(fd)
        d = atomic.temp_dir_beside(tmp_path / "z")
    finally:
        os.umask(old)
    assert oct((tmp_path / "x.safetensors").stat().st_mode & 0o777) == oct(0o640)
    assert oct(os.stat(tmp).st_mode & 0o777) == oct(0o640) and oct(d.stat().st_mode & 0o777) == oct(0o750)


def test_help_texts_are_whole():
    """tyro shows a field's inline comment only: a comment continued on the next line is cut mid-sentence in --help
    (write a long one above the field instead)."""
    import re
    cut = []
    for f in ("config.py", "sample.py", "caption.py", "bench.py"):
        lines = (ROOT / f).read_text().splitlines()
        for i, (a, b) in enumerate(zip(lines, lines[1:])):
            field = re.match(r"(\s+)\w+: [^=]+=.*  # ", a)
            if field and re.match(rf"{field[1]}#\s{{2,}}", b):
                cut.append(f"{f}:{i + 1}")
    assert not cut, cut
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "Layouts (DataConfig.path):" in r.stdout and len(r.stdout.splitlines()) > 20


def test_quiet_filters_only_the_known_messages():
    import logging

    quiet.install()
    quiet.install()  # idempotent
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    for name, text in quiet.KNOWN:
        log = logging.getLogger(name)
        log.addHandler(handler)
        log.warning(f"x {text} y")
        log.warning("something else")
        log.removeHandler(handler)
        assert len([f for f in log.filters if isinstance(f, quiet._Drop)]) == 1
    assert seen == ["something else"] * len(quiet.KNOWN)
