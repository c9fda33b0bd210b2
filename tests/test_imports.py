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
