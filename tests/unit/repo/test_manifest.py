"""Manifests check themselves: the golden files keep decoding, the checksum is the one the docs
specify, every change to a value is found, and base links are checked against the parent."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from blake3 import blake3

from blocktrail.repo.errors import ManifestCorrupt
from blocktrail.repo.manifest import (
    RestorePoint,
    body_checksum,
    canonical_body,
    link_problems,
)

DATA = Path(__file__).resolve().parents[2] / "data" / "repo"
DOCS = Path(__file__).resolve().parents[3] / "docs" / "repository.md"
GOLDEN_ID = "20261124T211502118Z-3f9a0c1e"
TABLE = "8f3c2a1e0d9b8c7a6f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0918"  # the golden one's


def test_golden_manifests_of_both_versions_decode() -> None:
    v2 = RestorePoint.from_bytes((DATA / "manifest-v2.json").read_bytes(), "v2", GOLDEN_ID)
    v1 = RestorePoint.from_bytes((DATA / "manifest-v1.json").read_bytes(), "v1", GOLDEN_ID)
    assert v2.change_id == v1.change_id == "4c1d9a0e-2b3f-4e5d-8a6b-9c0d1e2f3a4b/7"
    assert v2.to_bytes() == (DATA / "manifest-v2.json").read_bytes()  # writing is stable
    assert json.loads(v1.to_bytes())["version"] == 2  # a rewrite is always version 2


def test_the_checksum_is_the_one_the_docs_specify() -> None:
    docs = DOCS.read_text()
    example = json.loads(re.search(r'A real example.*?```json\n(.*?)```', docs, re.S)[1])  # type: ignore[index]
    assert example == json.loads((DATA / "manifest-v2.json").read_bytes())
    body = re.search(r"The canonical body of the example above:\n\n```\n(.*?)\n```", docs,
                     re.S)[1]  # type: ignore[index]
    fields = dict(example)
    checksum = fields.pop("checksum")
    assert canonical_body(fields) == body.encode()
    assert blake3(body.encode()).hexdigest() == checksum


def _golden() -> dict[str, object]:
    return json.loads((DATA / "manifest-v2.json").read_bytes())  # type: ignore[no-any-return]


@pytest.mark.parametrize("field, value", [
    ("size_bytes", 4294967297), ("change_id", "4c1d9a0e-2b3f-4e5d-8a6b-9c0d1e2f3a4b/8"),
    ("tables", ["0" * 64]), ("parent", None), ("kind", "full"), ("verify_state", "ok"),
    ("disk_id", "another"), ("audit", {}), ("format", "x"), ("version", 3)])
def test_any_edited_value_is_refused(field: str, value: object) -> None:
    edited = _golden()
    edited[field] = value
    with pytest.raises(ManifestCorrupt):
        RestorePoint.from_bytes(json.dumps(edited).encode(), "edited", GOLDEN_ID)


def test_layout_does_not_matter_values_do() -> None:
    compact = json.dumps(_golden(), sort_keys=True).encode()
    assert RestorePoint.from_bytes(compact, "compact", GOLDEN_ID).id == GOLDEN_ID
    without = _golden()
    del without["checksum"]
    with pytest.raises(ManifestCorrupt, match="checksum"):
        RestorePoint.from_bytes(json.dumps(without).encode(), "no checksum", GOLDEN_ID)


def test_the_id_must_be_the_file_name_in_both_versions() -> None:
    for name in ("manifest-v1.json", "manifest-v2.json"):
        with pytest.raises(ManifestCorrupt, match="copied or renamed"):
            RestorePoint.from_bytes((DATA / name).read_bytes(), name, "20261124T211502118Z-0")


@pytest.mark.parametrize("field, value", [
    ("kind", "partial"), ("verify_state", "maybe"), ("tables", ["xyz"]),
    ("created_at", "2026-11-24T21:15:02"), ("size_bytes", "big"), ("parent", 7)])
def test_impossible_values_of_a_version_1_manifest_are_damage(field: str, value: object) -> None:
    v1 = json.loads((DATA / "manifest-v1.json").read_bytes())
    v1[field] = value
    with pytest.raises(ManifestCorrupt):
        RestorePoint.from_bytes(json.dumps(v1).encode(), "v1", GOLDEN_ID)


@pytest.mark.parametrize("field, value", [
    ("size_bytes", 1e300), ("size_bytes", 4294967296.0), ("size_bytes", 1 << 64),
    ("size_bytes", (1 << 62) + 1), ("size_bytes", True), ("size_bytes", "4294967296"),
    ("chunk_size", 65536.0), ("chunk_size", 0), ("page_chunks", False),
    ("tables", TABLE), ("tables", []), ("tables", [TABLE, TABLE])])
@pytest.mark.parametrize("version", [1, 2])
def test_sizes_must_be_whole_numbers_and_the_tables_must_cover_the_size(
        field: str, value: object, version: int) -> None:
    """Not only a checksum mismatch: a manifest whose checksum matches its values (or a
    version 1 one, which has none) with such values is refused too."""
    body = json.loads((DATA / f"manifest-v{version}.json").read_bytes())
    body.pop("checksum", None)
    body[field] = value
    if version == 2:
        body["checksum"] = body_checksum(body)
    with pytest.raises(ManifestCorrupt):
        RestorePoint.from_bytes(json.dumps(body).encode(), "edited", GOLDEN_ID)


def test_a_version_1_manifest_never_has_a_checksum() -> None:
    """A version 2 manifest turned into version 1 would shed its checksum's protection."""
    body = json.loads((DATA / "manifest-v2.json").read_bytes())
    body["version"] = 1
    with pytest.raises(ManifestCorrupt, match="version 1 manifest with a checksum"):
        RestorePoint.from_bytes(json.dumps(body).encode(), "edited", GOLDEN_ID)


def test_the_tables_a_size_needs() -> None:
    point = RestorePoint.from_bytes((DATA / "manifest-v2.json").read_bytes(), "v2", GOLDEN_ID)
    assert (point.chunks, point.pages, point.table_width(0)) == (65536, 64, 64)
    big = replace(point, size_bytes=(1024 * 1024 + 1) * 65536 - 1)  # a page more than a table
    assert (big.pages, big.table_width(0), big.table_width(1), big.page_width(1024)) == \
        (1025, 1024, 1, 1)


def _point(point_id: str, kind: str, parent: str | None, change_id: str | None,
           minute: int, disk: str = "d") -> RestorePoint:
    return RestorePoint(point_id, disk, 1 << 20, 65536, 1024, (), kind, parent, change_id, None,
                        f"2026-11-24T21:{minute:02d}:00+00:00", "t")


EPOCH = "4c1d9a0e-2b3f-4e5d-8a6b-9c0d1e2f3a4b"


def test_base_links() -> None:
    parent = _point("A", "full", None, f"{EPOCH}/5", 1)
    good = _point("B", "incremental", "A", f"{EPOCH}/6", 2)
    assert link_problems(good, parent) == []
    assert link_problems(good, None) == []  # the parent was forgotten: fine
    assert link_problems(parent, None) == []
    assert "names no parent" in link_problems(replace(good, parent=None), None)[0]
    assert "of disk" in link_problems(replace(good, disk_id="e"), parent)[0]
    assert "not older" in link_problems(replace(good, created_at=parent.created_at), parent)[0]
    assert "older than its parent" in link_problems(replace(good, change_id=f"{EPOCH}/4"),
                                                    parent)[0]
    other_epoch = "5c1d9a0e-2b3f-4e5d-8a6b-9c0d1e2f3a4b/1"  # a tracker reset: not comparable
    assert link_problems(replace(good, change_id=other_epoch), parent) == []
    label = replace(good, change_id="qemu:dirty-bitmap:bm0")  # an NBD bitmap label
    assert link_problems(label, parent) == []
    healed = _point("C", "healed", "A", f"{EPOCH}/5", 3)
    assert link_problems(healed, parent) == []
    assert "heals A" in link_problems(replace(healed, change_id=f"{EPOCH}/6"), parent)[0]
