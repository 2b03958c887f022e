"""Each package imports only downward (ARCHITECTURE.md), and the NBD protocol core does no I/O."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "blocktrail"

# package -> the blocktrail packages/modules it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "extents": set(),
    "errors": set(),
    "names": {"errors"},
    "pipeline": set(),
    "lazy": set(),  # a package's names loaded on first use
    "passwords": {"errors"},
    "fileio": {"extents", "errors"},
    "simfileio": {"extents", "errors", "fileio"},  # stands in for the file system in tests
    "tracking": {"extents", "errors", "fileio", "lazy"},
    "disk": {"extents", "errors", "fileio", "names", "tracking", "lazy"},
    "nbd": {"extents", "errors"},  # nbd/proto: see the test below
    "repo": {"extents", "errors", "fileio", "pipeline", "lazy"},
    "backup": {"extents", "errors", "names", "fileio", "tracking", "repo", "nbd", "disk",
               "pipeline", "passwords"},
    "host": {"extents", "errors", "names", "fileio", "tracking", "disk", "nbd", "repo",
             "backup", "pipeline", "passwords"},
    "cli": {"extents", "errors", "names", "fileio", "tracking", "disk", "nbd", "repo", "backup",
            "host", "worker", "passwords"},
    "worker": {"extents", "errors", "names", "fileio", "tracking", "disk", "nbd", "repo",
               "backup", "host", "passwords"},
}
NO_IO_MODULES = {"asyncio", "socket", "ssl", "threading", "selectors"}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _package_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _modules() -> list[Path]:
    return [p for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_only_downward(path: Path) -> None:
    package = _package_of(path)
    assert package in ALLOWED, f"{package} is not in the layer map of this test"
    allowed = ALLOWED[package]
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] != "blocktrail" or len(parts) < 2 or parts[1] == package:
            continue
        assert parts[1] in allowed, f"{path.relative_to(SRC)} imports {name}"


def test_nbd_protocol_core_does_no_io() -> None:
    proto = SRC / "nbd" / "proto"
    assert proto.exists()
    for path in proto.rglob("*.py"):
        names = _imports(path)
        bad = {n.split(".")[0] for n in names} & NO_IO_MODULES
        assert not bad, f"{path.relative_to(SRC)} imports {bad}"
        inner = {n for n in names if n.startswith("blocktrail.")
                 and not n.startswith(("blocktrail.nbd.proto", "blocktrail.errors"))}
        assert not inner, f"{path.relative_to(SRC)} imports {inner}"


def test_nbd_client_core_does_not_import_the_server_core() -> None:
    proto = SRC / "nbd" / "proto"
    for module in ("client.py", "transmission.py", "events.py"):
        names = _imports(proto / module)
        assert "blocktrail.nbd.proto.server" not in names, f"nbd/proto/{module} imports it"
