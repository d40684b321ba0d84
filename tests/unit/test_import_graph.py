"""The house's import graph (issue 17): no circle among hpcqwen's modules, counting every import (type-only ones
under TYPE_CHECKING and imports inside functions too), and nothing outside cli/ imports from cli/."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "hpcqwen"


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_of(p): p for p in PKG.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    edges[mod].add(name)
    return edges


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_among_hpcqwen_modules_type_only_imports_included() -> None:
    edges = _graph()
    assert len(edges) > 100 and "hpcqwen.spec_sections" in edges["hpcqwen.spec"]  # the graph was read
    # A package imports its own modules from its __init__; only circles through other modules count.
    circles = [c for c in _circles(edges) if not all(m.startswith(c[0] + ".") or m == c[0] for m in c)]
    assert circles == []


def test_nothing_outside_cli_imports_from_cli() -> None:
    edges = _graph()
    def in_cli(m: str) -> bool:
        return m == "hpcqwen.cli" or m.startswith("hpcqwen.cli.")
    bad = {m: sorted(filter(in_cli, ts)) for m, ts in edges.items() if not in_cli(m) and m != "hpcqwen.__main__"}
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_the_rewards_package_face_loads_its_names_lazily() -> None:
    """`hpcqwen.rewards` re-exports the plugin API but imports none of its modules, so importing
    `hpcqwen.rewards.plugins` (which imports `.builtin`, which runs the package) never re-enters plugins."""
    import subprocess
    import sys

    code = ("import sys, hpcqwen.rewards as r\n"
            "print(sorted(m for m in sys.modules if m.startswith('hpcqwen.rewards.')))\n"
            "from hpcqwen.rewards import completion_text, resolve_rewards\n"
            "from hpcqwen.rewards import builtin, plugins\n"
            "assert completion_text is builtin.completion_text and resolve_rewards is plugins.resolve_rewards\n"
            "assert all(getattr(r, n) is getattr(sys.modules['hpcqwen.rewards.' + r._HOME[n]], n) for n in r.__all__)\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["[]", "ok"], out.stdout
