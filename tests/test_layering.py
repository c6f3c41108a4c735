"""The package layers (README, Layout): a lower layer never imports a higher one.

    moe_routing < safety_eval < organism < alignment, serving < clients < launch

Every import in every module counts: module level, inside functions (lazy imports), and
``importlib.import_module`` / ``__import__`` calls with a constant name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What each package may import among the project's packages (everything below it).
BELOW = {
    "moe_routing": set(),
    "safety_eval": {"moe_routing"},
    "organism": {"moe_routing", "safety_eval"},
    "alignment": {"moe_routing", "safety_eval", "organism"},
    "serving": {"moe_routing", "safety_eval", "organism"},
    "clients": {"moe_routing", "safety_eval", "organism", "alignment", "serving"},
    "launch": {"moe_routing", "safety_eval", "organism", "alignment", "serving", "clients"},
}


def _modules():
    for package in BELOW:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, path


def imported_names(source: str, module: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, the text of the dotted `module`
    (for relative imports; a package's `__init__` is the package itself), at any depth."""
    parts = module.split(".")
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = parts[: len(parts) - node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return sorted(found)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def violations() -> list[str]:
    out = []
    for package, path in _modules():
        source = path.read_text(encoding="utf-8")
        for line, name in imported_names(source, _module_name(path), str(path.relative_to(ROOT))):
            top = name.split(".")[0]
            if top in BELOW and top != package and top not in BELOW[package]:
                out.append(f"{path.relative_to(ROOT)}:{line}: {package} imports {name}")
    return out


def test_no_layer_imports_a_higher_one():
    assert violations() == []


def test_the_checker_sees_lazy_relative_and_dynamic_imports():
    source = (
        "import json\n"
        "from moe_routing.stats import concentration\n"
        "def f():\n"
        "    from organism.build import ensure_organism\n"
        "    import alignment.config\n"
        "    importlib.import_module('serving.config')\n"
        "from . import judge\n"
        "from .data import load\n"
    )
    names = [name for _, name in imported_names(source, "safety_eval.probe")]
    assert names == ["json", "moe_routing.stats", "organism.build", "alignment.config", "serving.config",
                     "safety_eval", "safety_eval.data"]
    assert _module_name(ROOT / "safety_eval" / "__init__.py") == "safety_eval"


# Light modules: importing them must not pull in torch (configs load in drivers and CLIs that
# never touch a model).
LIGHT = ["alignment.config", "safety_eval.settings", "moe_routing.chat", "moe_routing.checkpoint",
         "organism.checkpoint"]


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_leave_torch_out(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", f"import {module} imports torch"
