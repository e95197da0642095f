"""The code's habits, checked in CI: ruff's rules and format (pyproject.toml's selection), and
mypy, strict, on the protocol and routing code (p2p/ and realms/)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CODE = ["p2p", "node", "realms", "models", "scripts", "tests", "cli.py", "__init__.py"]


def tool(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"SKIPPED LOUDLY: {name} is not installed (pip install -e '.[test]')")
    return found


def test_ruff_finds_nothing() -> None:
    res = subprocess.run([tool("ruff"), "check", *CODE], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_code_is_ruff_formatted() -> None:
    res = subprocess.run([tool("ruff"), "format", "--check", *CODE], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_strict_on_p2p_and_realms(tmp_path: Path) -> None:
    """The repo is the package ``rentahal`` (pyproject's package-dir): mypy sees it through a
    link of that name. trio's own inline types are linked in too: the trio-stubs that
    py-libp2p's trio-typing installs are years older than trio and lack TaskStatus."""
    import trio

    (tmp_path / "rentahal").symlink_to(ROOT)
    (tmp_path / "trio").symlink_to(Path(trio.__file__).parent)
    res = subprocess.run(
        [
            tool("mypy"),
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "-p",
            "rentahal.p2p",
            "-p",
            "rentahal.realms",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "MYPYPATH": str(tmp_path)},
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_fixed_timeout_lives_in_node_limits() -> None:
    """One place holds every fixed timeout, interval and budget with its default (node/limits.py;
    what an operator may change is in node.toml): a module-level constant named like one, set
    to a number anywhere else, fails here."""
    import ast
    import re

    timeish = re.compile(r"TIMEOUT|INTERVAL|_AFTER$|_EVERY$|_WAIT$|_TTL$|GRACE|DEADLINE|_POLL$|BUDGET|_PER_[A-Z]+$")
    found = []
    for folder in ("node", "p2p", "realms", "models"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "node" / "limits.py":
                continue
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for stmt in tree.body:
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
                value = getattr(stmt, "value", None)
                for t in targets:
                    if isinstance(t, ast.Name) and timeish.search(t.id) and isinstance(value, ast.Constant | ast.BinOp):
                        found.append(f"{path.relative_to(ROOT)}: {t.id}")
    assert not found, "fixed limits outside node/limits.py: " + ", ".join(found)
