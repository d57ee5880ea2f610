"""The project's layout rule (README's file tree): a file imports only files below it in LAYERS, never one above it
or one of its own level, and project modules are imported at the top of a file (no hidden lazy import)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["bench", "train", "convert", "caption", "sample", "stepcache", "lora", "region", "offload", "cache", "load", "quant", "encode", "kernels",
          "config", "tiny"]


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
        if other == me == "kernels":
            continue  # kernels/*.py share the package's guard (kernels/__init__.py)
        if LAYERS.index(other) <= LAYERS.index(me):
            out.append(f"{path.name}:{line} imports {name} (not below {me})")
        elif not top:
            out.append(f"{path.name}:{line} imports {name} inside a function")
    return out


def test_every_file_has_a_layer():
    files = {p.stem for p in ROOT.glob("*.py")}
    assert files <= set(LAYERS), files - set(LAYERS)
    assert (ROOT / "kernels" / "__init__.py").is_file()


def test_imports_point_down():
    bad = [v for p in ROOT.glob("*.py") for v in violations(p, p.stem)]
    bad += [v for p in (ROOT / "kernels").glob("*.py") for v in violations(p, "kernels")]
    assert not bad, "\n".join(bad)


def test_the_checker_catches_an_upward_and_a_lazy_import(tmp_path):
    f = tmp_path / "encode.py"
    f.write_text("import config\nfrom train import main\n\ndef f():\n    import kernels.fp8\n")
    assert violations(f, "encode") == ["encode.py:2 imports train (not below encode)",
                                       "encode.py:5 imports kernels.fp8 inside a function"]
