"""The engine's layers: every module of tinygrad_lite imports only modules of the layers
below it, at module level, so there is no import circle (and no import hidden inside a
function to dodge one).

The order is the one tinygrad_lite/__init__.py and the README's reading order give.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tinygrad_lite"
LAYERS = ["strict_array", "backend", "tensor", "ops", "methods", "cpu", "primitive", "fused_attention",
          "fused", "blocked_attention", "fast_attention", "fast", "functional", "nn", "optim", "gradcheck",
          "graph", "profiler", "parallel", "distributed", "__init__"]


def package_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module of this package imported, line, at module level?) for every import in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("tinygrad_lite")):
            module = (node.module or "").removeprefix("tinygrad_lite").lstrip(".")
            names = [module] if module else [a.name for a in node.names]  # `from . import x, y`
            out += [(name.split(".")[0], node.lineno, id(node) in top) for name in names]
        elif isinstance(node, ast.Import):
            out += [(a.name.split(".")[1], node.lineno, id(node) in top) for a in node.names
                    if a.name.startswith("tinygrad_lite.")]
    return out


def test_every_module_is_in_the_layer_list():
    assert sorted(p.stem for p in PACKAGE.glob("*.py")) == sorted(LAYERS)


def test_imports_run_one_way_down_the_layers():
    problems = []
    for path in sorted(PACKAGE.glob("*.py")):
        rank = LAYERS.index(path.stem)
        for module, line, top_level in package_imports(path):
            if not top_level:
                problems.append(f"{path.name}:{line} imports {module} inside a function")
            elif module in LAYERS and LAYERS.index(module) >= rank:
                problems.append(f"{path.name}:{line} imports {module}, which is not below it")
    assert not problems, problems


def test_the_layer_check_can_fail(tmp_path):
    bad = tmp_path / "ops.py"
    bad.write_text("from .nn import Module\n\ndef f():\n    from . import optim\n")
    assert package_imports(bad) == [("nn", 1, True), ("optim", 4, False)]
