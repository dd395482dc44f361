"""The package's shape: no import cycles, every module imports alone, a small public API."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import neuroscribe

PKG = Path(neuroscribe.__file__).parent


def module_names() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Edges a -> b for every import of b anywhere in a, inside functions too."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level:
                names = ["<relative>"]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("neuroscribe"):
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("neuroscribe")]
            graph[m] |= {n for n in names if (n in mods or n == "<relative>") and n != m}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return [*stack[stack.index(n):], n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        stack.pop()
        return []

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return []


def test_find_cycle_sees_a_cycle_through_a_function_level_import() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_anywhere_in_the_package() -> None:
    graph = import_graph(module_names())
    assert not any("<relative>" in deps for deps in graph.values()), "use absolute imports"
    assert find_cycle(graph) == []


def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    names = [m for m in module_names() if not m.endswith("__main__")]
    code = ("import importlib, subprocess, sys\n"
            "bad = []\n"
            "for m in sys.argv[1:]:\n"
            "    r = subprocess.run([sys.executable, '-c', f'import {m}'], capture_output=True,"
            " text=True)\n"
            "    if r.returncode: bad.append((m, r.stderr.strip().splitlines()[-1:]))\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True,
                         timeout=600)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert len(names) > 60


def test_public_api_is_small_and_every_name_resolves() -> None:
    assert len(neuroscribe.__all__) <= 15
    subpackages = {p.parent.name for p in PKG.glob("*/__init__.py")}
    assert not subpackages & set(neuroscribe.__all__)  # an API name never hides a subpackage
    for name in neuroscribe.__all__:
        assert getattr(neuroscribe, name) is not None
    with pytest.raises(AttributeError):
        neuroscribe.no_such_name  # noqa: B018


def test_modules_stay_short() -> None:
    long = {m: n for m, p in module_names().items()
            if (n := len(p.read_text().splitlines())) > 420}
    assert long == {}
