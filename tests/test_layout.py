"""The package's layout: no import cycle between modules, and no module far over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
#: Modules allowed past 400 lines, with the reason.
LONG = {
    # The forward, the gathering of outputs and the backward share their message plumbing
    # (posting, fetching, the holders of each value): one runner for GPipe and 1F1B.
    "autopart.runtime.pipeline.runner": "one schedule runner",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every autopart module ``name`` imports, anywhere in it (type-only imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules around it, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # A package's __init__ re-exports its modules; importing a module of the package is not
    # a cycle through that __init__, so edges into one's own package __init__ are dropped.
    for name in graph:
        graph[name] = {d for d in graph[name] if not name.startswith(d + ".")}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_module_is_far_over_400_lines():
    long = {
        name: len(path.read_text().splitlines())
        for name, path in _modules().items()
        if len(path.read_text().splitlines()) > 450
    }
    assert set(long) <= set(LONG), long


@pytest.mark.slow
def test_users_type_checkers_see_the_public_api(tmp_path):
    """``autopart.Module`` is imported lazily; a user's type checker must still see it."""
    import subprocess
    import sys

    user = tmp_path / "user.py"
    user.write_text(
        "import torch\nimport autopart\n"
        "reveal_type(autopart.Module(torch.nn.Linear(2, 2)))\n"
        "reveal_type(autopart.Config(stages=2))\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", str(user), "--follow-imports=silent"],
        capture_output=True,
        text=True,
        env={"MYPYPATH": str(SRC), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        timeout=300,
    )
    assert 'Revealed type is "autopart.module.Module"' in result.stdout, result.stdout
    assert 'Revealed type is "autopart.config.Config"' in result.stdout, result.stdout
