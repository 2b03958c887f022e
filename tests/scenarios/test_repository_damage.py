"""The repository failures a hostile-but-realistic user found (each used to end with exit 0 and
no warning), reproduced through the command line: a manifest copied over another, a change ID
edited by hand, one flipped byte in a pack."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from blocktrail.cli.main import main
from blocktrail.repo import Repository
from repodamage import (
    CS,
    Golden,
    backup,
    disk_bytes,
    flip,
    make_golden,
    object_file,
    repo_files,
    restored,
    write_chunks,
)


@pytest.fixture
def golden(tmp_path: Path) -> Golden:
    """Made anew for each test: a copied disk is a changed disk (its tracker starts a new
    epoch), and these tests need incrementals."""
    return make_golden(tmp_path / "w")


@pytest.fixture
def work(golden: Golden) -> Path:
    return golden.root


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict | list | None]:  # type: ignore[type-arg]
    code = main([*args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


def names(report: object) -> list[tuple[str, str, list[str]]]:
    assert isinstance(report, dict)
    return [(p["kind"], p["name"], p["affected_points"]) for p in report["problems"]]


# 1. manifests ------------------------------------------------------------------------------------

def test_a_manifest_copied_over_another_is_refused(golden: Golden, work: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    p1, p2, p3 = golden.ids
    points = work / "repo" / "points"
    shutil.copyfile(points / f"{p1}.json", points / f"{p3}.json")
    code, report = cli(capsys, "check", str(work / "repo"), "--read-data")
    assert code == 12
    assert names(report) == [("manifest", f"points/{p3}.json", [p3])]
    assert "copied or renamed" in report["problems"][0]["detail"]  # type: ignore[index]
    target = tmp_path / "p3.raw"
    assert main(["restore", str(work / "repo"), p3, "--to", str(target)]) == 12
    assert "ManifestCorrupt" in capsys.readouterr().err and not target.exists()
    assert main(["points", str(work / "repo"), "--json"]) == 0
    out, err = capsys.readouterr()
    assert [p["id"] for p in json.loads(out)] == [p1, p2]
    assert f"warning: points/{p3}.json is not listed" in err  # never left out silently
    # the next backup is an incremental from the newest intact point, and it is right
    write_chunks(work, {9: b"\x09" * CS})
    code, out = cli(capsys, "backup", str(work / "disk"), "--repo", str(work / "repo"))
    assert code == 0 and out["kind"] == "incremental"  # type: ignore[index]
    assert out["point"]["parent"] == p2  # type: ignore[index]
    assert any(p3 in why for why in out["passed_over"])  # type: ignore[index]
    with Repository.open(work / "repo") as repo:
        assert restored(repo, out["point"]["id"], tmp_path) == disk_bytes(work)  # type: ignore[index]


def test_an_edited_change_id_is_refused_and_the_next_backup_is_right(
        golden: Golden, work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p1, p2, p3 = golden.ids
    manifest = work / "repo" / "points" / f"{p3}.json"
    text = manifest.read_text()
    change_id = json.loads(text)["change_id"]
    epoch, seq = change_id.split("/")
    edited = f"{epoch}/{int(seq) + 1}"  # one digit: what the tracker answers for next
    manifest.write_text(text.replace(f'"{change_id}"', f'"{edited}"'))
    code, report = cli(capsys, "check", str(work / "repo"))
    assert code == 12
    assert names(report) == [("manifest", f"points/{p3}.json", [p3])]
    assert "checksum mismatch" in report["problems"][0]["detail"]  # type: ignore[index]
    # the writes after P3 would be missed by an incremental from the edited change ID
    write_chunks(work, {11: b"\x0b" * CS, 25: b"\x19" * CS})
    report_ = backup(work)
    assert report_.kind == "incremental" and report_.point.parent == p2
    assert any(f"points/{p3}.json" in why for why in report_.passed_over)
    with Repository.open(work / "repo") as repo:
        assert restored(repo, report_.point.id, tmp_path) == disk_bytes(work)
        assert restored(repo, p1, tmp_path) == golden.contents[p1]


def test_a_version_1_manifest_with_a_broken_base_link_is_reported(
        golden: Golden, work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Version 1 manifests have no checksum: the base link is checked against the parent."""
    _, p2, p3 = golden.ids
    manifest = work / "repo" / "points" / f"{p3}.json"
    body = json.loads(manifest.read_text())
    del body["checksum"]
    epoch, seq = body["change_id"].split("/")
    body.update(version=1, change_id=f"{epoch}/{int(seq) - 2}")  # older than its parent's
    manifest.write_text(json.dumps(body))
    code, report = cli(capsys, "check", str(work / "repo"))
    assert code == 12 and names(report) == [("link", f"points/{p3}.json", [p3])]
    assert "older than its parent" in report["problems"][0]["detail"]  # type: ignore[index]
    assert backup(work).point.parent == p2  # never a base


# 2. a damaged chunk ------------------------------------------------------------------------------

def _flip_chunk(work: Path, point_id: str, index: int) -> bytes:
    with Repository.open(work / "repo") as repo:
        name = repo.chunk_digests(point_id, [index])[index]
        assert name is not None
        loc = repo.index[name]
    flip(object_file(work / "repo", loc), loc.offset + 48 + 1000)
    return name


def test_a_damaged_chunk_is_quarantined_and_stored_again(
        golden: Golden, work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p1, p2, p3 = golden.ids
    name = _flip_chunk(work, p3, 0)  # chunk 0: in every point, and still on the disk
    repo_dir = str(work / "repo")
    code, report = cli(capsys, "check", repo_dir, "--read-data")
    assert code == 12
    assert names(report) == [("chunk", name.hex(), [p1, p2, p3])]
    assert [o["digest"] for o in report["damaged_objects"]] == [name.hex()]  # type: ignore[index]
    assert len(list((work / "repo" / "quarantine").iterdir())) == 1
    assert main(["restore", repo_dir, p1, "--to", str(tmp_path / "p1.raw")]) == 12
    assert "in quarantine" in capsys.readouterr().err
    # a full backup stores that chunk again instead of deduplicating against the damaged copy
    code, out = cli(capsys, "backup", str(work / "disk"), "--repo", repo_dir, "--full")
    assert code == 0 and out["bytes_stored"] > 0  # type: ignore[index]
    new = out["point"]["id"]  # type: ignore[index]
    with Repository.open(repo_dir) as repo:
        assert restored(repo, new, tmp_path) == disk_bytes(work)
        # the older points name the same content: they restore again too
        for point_id in golden.ids:
            assert restored(repo, point_id, tmp_path) == golden.contents[point_id]
    code, report = cli(capsys, "check", repo_dir, "--read-data")
    assert code == 0 and report["quarantined_before"] == 1  # type: ignore[index]


def test_an_incremental_stores_again_what_its_base_lost(
        golden: Golden, work: Path, tmp_path: Path) -> None:
    _, _, p3 = golden.ids
    name = _flip_chunk(work, p3, 5)
    with Repository.open(work / "repo") as repo:
        assert not repo.check(read_data=True).ok
    write_chunks(work, {30: b"\x1e" * CS})
    report = backup(work)
    assert report.kind == "incremental" and report.point.parent == p3
    assert report.chunks_read_again == 1 and report.chunks_read == 2
    with Repository.open(work / "repo") as repo:
        assert repo.has_chunk(name)
        assert restored(repo, report.point.id, tmp_path) == disk_bytes(work)


def test_the_audit_reads_stored_bytes_and_stores_a_damaged_chunk_again(
        golden: Golden, work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, p3 = golden.ids
    name = _flip_chunk(work, p3, 2)
    code, out = cli(capsys, "backup", str(work / "disk"), "--repo", str(work / "repo"),
                    "--audit-sample", "100")
    assert code == 0 and out["kind"] == "incremental"  # type: ignore[index]
    assert out["audit"]["tracker_trusted"]  # type: ignore[index]
    assert out["audit"]["damaged_in_repository"] == [[2 * CS, CS]]  # type: ignore[index]
    with Repository.open(work / "repo") as repo:
        point = repo.point(out["point"]["id"])  # type: ignore[index]
        assert point.audit["damaged_in_repository"] == [[2 * CS, CS]]
        assert repo.has_chunk(name) and repo.check(read_data=True).ok
        assert restored(repo, p3, tmp_path) == golden.contents[p3]


def test_verify_reads_stored_bytes_and_heal_stores_them_again(
        golden: Golden, work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, p3 = golden.ids  # the disk still holds P3's content
    _flip_chunk(work, p3, 7)
    repo_dir, disk_dir = str(work / "repo"), str(work / "disk")
    code, out = cli(capsys, "verify", repo_dir, p3, "--against", disk_dir)
    assert code == 12 and not out["identical"]  # type: ignore[index]
    assert out["differing_areas"] == [] and out["damaged_areas"] == [[7 * CS, CS]]  # type: ignore[index]
    assert out["healed_point"] is None and out["damaged_objects"]  # type: ignore[index]
    with Repository.open(repo_dir) as repo:
        assert repo.point(p3).verify_state == "failed"
    code, out = cli(capsys, "verify", repo_dir, p3, "--against", disk_dir, "--heal")
    assert code == 12 and out["damaged_areas"] == [[7 * CS, CS]]  # type: ignore[index]
    assert out["restored_bytes"] > 0 and out["healed_point"] is None  # type: ignore[index]
    with Repository.open(repo_dir) as repo:
        assert repo.point(p3).verify_state == "ok"
        assert restored(repo, p3, tmp_path) == golden.contents[p3]
    code, out = cli(capsys, "verify", repo_dir, p3, "--against", disk_dir)
    assert code == 0 and out["identical"]  # type: ignore[index]


def test_verify_tells_damage_from_difference(golden: Golden, work: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    _, _, p3 = golden.ids
    _flip_chunk(work, p3, 7)
    write_chunks(work, {12: b"\x0c" * CS})  # and the disk moved on since P3
    code, out = cli(capsys, "verify", str(work / "repo"), p3, "--against", str(work / "disk"),
                    "--heal")
    assert code == 13
    assert out["differing_areas"] == [[12 * CS, CS]]  # type: ignore[index]
    assert out["damaged_areas"] == [[7 * CS, CS]]  # type: ignore[index]
    healed = out["healed_point"]  # type: ignore[index]
    with Repository.open(work / "repo") as repo:
        assert restored(repo, healed, tmp_path) == disk_bytes(work)
        assert restored(repo, p3, tmp_path) == golden.contents[p3]  # its chunk stored again


def test_repo_repair_names_exactly_the_points_that_cannot_be_restored(
        golden: Golden, work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p1, p2, p3 = golden.ids
    only_p1 = _flip_chunk(work, p1, 3)  # P2 overwrote chunk 3: only P1 has this content
    (work / "repo" / "index" / "0123.idx.tmp").write_bytes(b"half an index")
    code, out = cli(capsys, "repo", "repair", str(work / "repo"))
    assert code == 12 and not out["ok"]  # type: ignore[index]
    assert [u["point"] for u in out["unrestorable_points"]] == [p1]  # type: ignore[index]
    assert out["unrestorable_points"][0]["missing"] == [  # type: ignore[index]
        f"chunk {only_p1.hex()} at disk offset {3 * CS}"]
    assert [o["digest"] for o in out["damaged_objects"]] == [only_p1.hex()]  # type: ignore[index]
    assert out["temp_files_deleted"] == 1 and "verify POINT" in out["advice"]  # type: ignore[index]
    assert not (work / "repo" / "index" / "0123.idx.tmp").exists()
    assert len(list((work / "repo" / "index").iterdir())) == 1
    with Repository.open(work / "repo") as repo:
        for point_id in (p2, p3):
            assert restored(repo, point_id, tmp_path) == golden.contents[point_id]
    main(["repo", "repair", str(work / "repo")])
    text = capsys.readouterr().out
    assert f"{p1}: lacks chunk {only_p1.hex()}" in text and p2 not in text


def test_repo_repair_rebuilds_a_damaged_index_and_trailer(
        golden: Golden, work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo_dir = work / "repo"
    index_files = sorted((repo_dir / "index").iterdir())
    flip(index_files[0], 20)
    pack = sorted((repo_dir / "packs").rglob("*.pack"))[0]
    flip(pack, pack.stat().st_size - 1)  # its trailer's magic
    code, report = cli(capsys, "check", str(repo_dir))
    assert code == 12
    kinds = {kind for kind, _, _ in names(report)}
    assert "index" in kinds and "pack" in kinds
    code, out = cli(capsys, "repo", "repair", str(repo_dir))
    assert code == 0 and out["ok"] and out["damaged_trailers"] == [pack.stem]  # type: ignore[index]
    assert out["objects_copied"] > 0  # type: ignore[index]
    assert not pack.exists()  # its objects are in a new pack now
    code, report = cli(capsys, "check", str(repo_dir), "--read-data")
    assert code == 0 and report["unreferenced_packs"] == 0  # type: ignore[index]
    with Repository.open(repo_dir) as repo:
        for point_id in golden.ids:
            assert restored(repo, point_id, tmp_path) == golden.contents[point_id]


def test_repo_repair_refuses_while_a_backup_runs(work: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with Repository.open(work / "repo") as repo:
        writer = repo.begin("d", CS, None)
        try:
            assert main(["repo", "repair", str(work / "repo")]) == 7
            assert "backups are running" in capsys.readouterr().err
        finally:
            writer.close()
    before = repo_files(work / "repo")
    assert main(["repo", "repair", str(work / "repo")]) == 0
    assert {f for f in repo_files(work / "repo") if not re.match(r"index/", f)} == \
        {f for f in before if not re.match(r"index/", f)}
