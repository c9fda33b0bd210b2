"""Dependency direction: configs <- engine <- actors <- cluster."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(folder: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


def offenders(folder: str, banned: tuple[str, ...]) -> list[str]:
    bad = []
    for path, names in imported_modules(ROOT / folder).items():
        for name in names:
            if any(name == b or name.startswith(b + ".") for b in banned):
                bad.append(f"{path}: {name}")
    return bad


def test_engine_never_imports_ray_or_fastapi():
    assert offenders("engine", ("ray", "fastapi", "actors", "cluster", "benchmarks", "tests")) == []


def test_actors_never_import_serve_or_fastapi():
    assert offenders("actors", ("ray.serve", "fastapi", "cluster", "benchmarks", "tests")) == []


def test_importing_the_engine_loads_no_ray():
    code = "import sys, engine.render, engine.cli; print(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "False"


def _engine_import_graph() -> dict[str, set[str]]:
    """engine module → engine modules it imports (module level and inside functions)."""
    root = Path(__file__).resolve().parents[1]
    mods: dict[str, Path] = {}
    for path in (root / "engine").rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = path
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [s for s in subs if s in mods] or [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def test_engine_has_no_import_cycles():
    """No engine module reaches itself through imports, lazy ones included (chain ↔ batching and
    render → metrics → render were such cycles)."""
    graph = _engine_import_graph()
    cycles = []
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module == start:
                cycles.append(start)
                break
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
    assert cycles == [], f"modules on an import cycle: {sorted(cycles)}"
