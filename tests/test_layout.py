"""The project's layout rule (README's file tree): a file imports only files below it in LAYERS, never one above it
or one of its own level, and project modules are imported at the top of a file (no hidden lazy import)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["accuracy", "bench", "bench_tables", "fixtures", "train", "full", "preserve", "user_samples", "validate",
          "report", "objective", "ema", "convert", "merge", "caption", "sample", "stepcache", "lora", "rundir",
          "adapters", "optim", "region", "offload", "recompute", "cache", "data", "images", "load", "quant", "encode",
          "kontext_kernels", "compile_cache", "config", "tiny", "quiet", "atomic"]


def project_imports(path: Path):
    """(line, module, at top level) for every import of a project module in the file."""
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        for name in names:
            if name.split(".")[0] in LAYERS:
                yield node.lineno, name, node.col_offset == 0


def violations(path: Path, me: str) -> list[str]:
    out = []
    for line, name, top in project_imports(path):
        other = name.split(".")[0]
        if other == me == "kontext_kernels":
            continue  # kontext_kernels/*.py share the package's guard (kontext_kernels/__init__.py)
        if LAYERS.index(other) <= LAYERS.index(me):
            out.append(f"{path.name}:{line} imports {name} (not below {me})")
        elif not top:
            out.append(f"{path.name}:{line} imports {name} inside a function")
    return out


def test_every_file_has_a_layer():
    files = {p.stem for p in ROOT.glob("*.py")}
    assert files <= set(LAYERS), files - set(LAYERS)
    assert (ROOT / "kontext_kernels" / "__init__.py").is_file()


def test_imports_point_down():
    bad = [v for p in ROOT.glob("*.py") for v in violations(p, p.stem)]
    bad += [v for p in (ROOT / "kontext_kernels").glob("*.py") for v in violations(p, "kontext_kernels")]
    assert not bad, "\n".join(bad)


def test_the_checker_catches_an_upward_and_a_lazy_import(tmp_path):
    f = tmp_path / "encode.py"
    f.write_text("import config\nfrom train import main\n\ndef f():\n    import kontext_kernels.fp8\n")
    assert violations(f, "encode") == ["encode.py:2 imports train (not below encode)",
                                       "encode.py:5 imports kontext_kernels.fp8 inside a function"]



def shadowed(root: Path) -> dict[str, list[str]]:
    """Names `import X` finds in `root` (sys.path[0] when a script runs there: modules and folders of .py) that are
    also an installed distribution's top-level module, with those distributions."""
    import importlib.metadata as md
    dists = md.packages_distributions()
    mine = {p.stem for p in root.glob("*.py")} | {p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.py"))}
    return {m: dists[m] for m in sorted(mine) if m in dists}


def test_no_top_level_name_shadows_an_installed_package():
    """A module or folder of ours named like an installed distribution's top-level module hides that module from every
    library that imports it: our old `kernels/` folder hid the PyPI `kernels`, which transformers 5.25 imports in every
    from_pretrained (issue 20)."""
    assert not shadowed(ROOT), f"rename these (they shadow installed packages): {shadowed(ROOT)}"


def test_the_shadow_check_sees_a_clash(tmp_path):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("")
    (tmp_path / "safetensors.py").write_text("")
    (tmp_path / "train.py").write_text("")
    assert shadowed(tmp_path) == {"safetensors": ["safetensors"], "torch": ["torch"]}
