"""The repository package's own layering: no import circle among its modules (type-only imports
included), boto3 only in the S3 backend, object names made only in layout.py."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[3] / "src" / "blocktrail" / "repo"


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "blocktrail.repo":
                found.update(f"blocktrail.repo.{a.name}" for a in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in REPO.glob("*.py") if p.stem != "__init__"}
    return {name: {m.split(".")[2] for m in _imports(path)
                   if m.startswith("blocktrail.repo.") and m.split(".")[2] in modules}
            for name, path in modules.items()}


def test_no_import_circle() -> None:
    graph = _graph()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        assert module not in path, f"import circle: {' -> '.join([*path, module])}"
        if module in done:
            return
        for imported in graph[module]:
            visit(imported, [*path, module])
        done.add(module)

    for module in graph:
        visit(module, [])
    assert "repository" not in graph["writer"] and "writer" not in graph["store"]


def test_boto3_only_in_the_s3_backend() -> None:
    """boto3 and botocore only in the S3 backend (s3.py, and s3reads.py under it), which
    nothing else imports."""
    for path in REPO.glob("*.py"):
        uses = {m for m in _imports(path) if m.split(".")[0] in ("boto3", "botocore")}
        assert not uses or path.stem in ("s3", "s3reads"), f"{path.name} imports {uses}"
        reads = {m for m in _imports(path) if m.endswith("s3reads")}
        assert not reads or path.stem == "s3", f"{path.name} imports {reads}"


def test_object_names_are_made_in_layout() -> None:
    for path in REPO.glob("*.py"):
        if path.stem in ("layout", "localdir"):
            continue
        text = path.read_text()
        for made in ('f"packs/{', 'f"index/{', 'f"leases/', 'f"gc/', 'f"verify/{'):
            assert made not in text, f"{path.name} makes object names ({made})"
