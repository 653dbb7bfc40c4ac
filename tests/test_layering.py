"""The package's layers: a module imports only from its own sub-package or from a lower layer, and
no two modules import each other (directly or through a chain), function-level and type-only
imports included. The layers are the pipeline's order, as each sub-package's docstring states."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "malt_jax"

# lowest first; a module may import its own unit and anything of a lower rank
LAYERS: dict[str, int] = {
    "runtime": 0,
    "roles": 1,
    "config": 1,
    "parallel": 2,
    "model": 3,
    "tasks": 3,
    "sampling": 4,
    "credit": 4,
    "training": 4,
    "evaluation": 4,
    "planning": 5,
    "stages": 6,
    "workflows": 7,
    "cli": 8,
    "__main__": 9,
    "__init__": 9,
}


def _unit(module: str) -> str:
    """``malt_jax.sampling.decode`` -> ``sampling``; ``malt_jax.config`` -> ``config``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        return ".".join(parts[:-1]) if len(parts) > 2 else "malt_jax"
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ``malt_jax`` module a file imports (``from malt_jax.x import y`` counts ``malt_jax.x.y``
    when that is a module, else ``malt_jax.x``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("malt_jax"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("malt_jax"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (PKG.parent / sub.replace(".", "/")).with_suffix(".py").exists() or (
                    PKG.parent / sub.replace(".", "/") / "__init__.py"
                ).exists()
                out.add(sub if is_module else node.module)
    return out


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}
GRAPH = {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_every_unit_has_a_layer():
    units = {_unit(m) if m != "malt_jax" else "__init__" for m in MODULES}
    assert units <= set(LAYERS), sorted(units - set(LAYERS))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down(module):
    unit = "__init__" if module == "malt_jax" else _unit(module)
    for dep in GRAPH[module]:
        dep_unit = "__init__" if dep == "malt_jax" else _unit(dep)
        assert dep_unit == unit or LAYERS[dep_unit] < LAYERS[unit], (
            f"{module} (layer {unit}={LAYERS[unit]}) imports {dep} (layer {dep_unit}={LAYERS[dep_unit]})"
        )


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d) :] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_top_level_is_small_and_every_subpackage_states_its_job():
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= 12, top
    for init in PKG.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc and len(doc.split()) >= 12, f"{init}: the docstring says its job and what it may import"


def test_the_checker_sees_a_violation(tmp_path):
    """The import scan finds function-level and type-only imports (what a cycle hides behind)."""
    f = tmp_path / "m.py"
    f.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from malt_jax.stages import rundir\n"
        "def f():\n    import malt_jax.workflows.pipeline\n"
    )
    assert {"malt_jax.stages.rundir", "malt_jax.workflows.pipeline"} <= _imports(f)
