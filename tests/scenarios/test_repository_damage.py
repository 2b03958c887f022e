"""The repository failures a hostile-but-realistic user found (each used to end with exit 0 and
no warning), reproduced through the command line: a manifest copied over another, a change ID
edited by hand, one flipped byte in a pack. On a local directory and on S3."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from blocktrail.backup.engine import BackupOptions, run_backup
from blocktrail.backup.sources.local import LocalDiskSource
from blocktrail.cli.main import main
from blocktrail.disk import Disk
from blocktrail.repo import index as index_file
from blocktrail.repo import layout
from blocktrail.repo.manifest import body_checksum
from blocktrail.repo.objects import KIND_MANIFEST
from repodamage import (
    CS,
    Golden,
    disk_bytes,
    make_golden,
    restored,
    write_chunks,
)
from repodamage import backup as backup_into
from s3server import TEST_TIMING, RepoTarget, SeaweedFS


@pytest.fixture(params=["local", "local-encrypted", "s3"])
def golden(request: pytest.FixtureRequest, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Golden:
    """Made anew for each test: a copied disk is a changed disk (its tracker starts a new
    epoch), and these tests need incrementals. The commands run in this process find the S3
    server where boto3 looks (AWS_ENDPOINT_URL)."""
    monkeypatch.setenv("BLOCKTRAIL_LEASE_SECONDS", str(int(TEST_TIMING.lease_s)))
    if request.param == "local":
        return make_golden(tmp_path / "w")
    if request.param == "local-encrypted":
        return make_golden(tmp_path / "w", target=RepoTarget(
            "local", str(tmp_path / "w" / "repo"), encrypted=True))
    server: SeaweedFS = request.getfixturevalue("s3_server")
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    return make_golden(tmp_path / "w", target=RepoTarget("s3", server.new_url("damage"),
                                                         server))


@pytest.fixture
def work(golden: Golden) -> Path:
    return golden.root


@pytest.fixture
def repo(golden: Golden) -> RepoTarget:
    return golden.repo




def damaged_code(repo: RepoTarget) -> int:
    """check's and restore's exit code for a changed object: 12, or 16 when encrypted (an
    authentication failure)."""
    return 16 if repo.encrypted else 12


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict | list | None]:  # type: ignore[type-arg]
    code = main([*args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out) if out.strip() else None


def names(report: object) -> list[tuple[str, str, list[str]]]:
    assert isinstance(report, dict)
    return [(p["kind"], p["name"], p["affected_points"]) for p in report["problems"]]


# 1. manifests ------------------------------------------------------------------------------------

def test_a_manifest_copied_over_another_is_refused(golden: Golden, work: Path, tmp_path: Path,
                                                  repo: RepoTarget,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    p1, p2, p3 = golden.ids
    repo.write(layout.manifest(p3), repo.read(layout.manifest(p1)))
    code, report = cli(capsys, "check", repo.location, "--read-data")
    assert code == damaged_code(repo)
    assert names(report) == [("manifest", f"points/{p3}.json", [p3])]
    assert ("authentication failed" if repo.encrypted else "copied or renamed") \
        in report["problems"][0]["detail"]  # type: ignore[index]
    target = tmp_path / "p3.raw"
    assert main(["restore", repo.location, p3, "--to", str(target)]) == damaged_code(repo)
    assert ("ManifestAuthenticationFailed" if repo.encrypted else "ManifestCorrupt") \
        in capsys.readouterr().err and not target.exists()
    assert main(["points", repo.location, "--json"]) == 0
    out, err = capsys.readouterr()
    assert [p["id"] for p in json.loads(out)] == [p1, p2]
    assert f"warning: points/{p3}.json is not listed" in err  # never left out silently
    # the next backup is an incremental from the newest intact point, and it is right
    write_chunks(work, {9: b"\x09" * CS})
    code, out = cli(capsys, "backup", str(work / "disk"), "--repo", repo.location)
    assert code == 0 and out["kind"] == "incremental"  # type: ignore[index]
    assert out["point"]["parent"] == p2  # type: ignore[index]
    assert any(p3 in why for why in out["passed_over"])  # type: ignore[index]
    with repo.open() as opened:
        assert restored(opened, out["point"]["id"], tmp_path) == disk_bytes(work)  # type: ignore[index]


def test_an_edited_change_id_is_refused_and_the_next_backup_is_right(
        golden: Golden, work: Path, tmp_path: Path, repo: RepoTarget,
        capsys: pytest.CaptureFixture[str]) -> None:
    p1, p2, p3 = golden.ids
    manifest = layout.manifest(p3)
    if repo.encrypted:  # sealed: any edit is a changed byte of its ciphertext
        repo.flip(manifest, 60)
    else:
        text = repo.read(manifest).decode()
        change_id = json.loads(text)["change_id"]
        epoch, seq = change_id.split("/")
        edited = f"{epoch}/{int(seq) + 1}"  # one digit: what the tracker answers for next
        repo.write(manifest, text.replace(f'"{change_id}"', f'"{edited}"').encode())
    code, report = cli(capsys, "check", repo.location)
    assert code == damaged_code(repo)
    assert names(report) == [("manifest", f"points/{p3}.json", [p3])]
    assert ("authentication failed" if repo.encrypted else "checksum mismatch") \
        in report["problems"][0]["detail"]  # type: ignore[index]
    # the writes after P3 would be missed by an incremental from the edited change ID
    write_chunks(work, {11: b"\x0b" * CS, 25: b"\x19" * CS})
    report_ = backup_into(work, target=repo)
    assert report_.kind == "incremental" and report_.point.parent == p2
    assert any(f"points/{p3}.json" in why for why in report_.passed_over)
    with repo.open() as opened:
        assert restored(opened, report_.point.id, tmp_path) == disk_bytes(work)
        assert restored(opened, p1, tmp_path) == golden.contents[p1]


def test_a_version_1_manifest_with_a_broken_base_link_is_reported(
        golden: Golden, work: Path, repo: RepoTarget,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Version 1 manifests have no checksum: the base link is checked against the parent."""
    if repo.encrypted:
        pytest.skip("an encrypted repository has no version 1 manifests: one put there fails "
                    "authentication (test_encryption.py)")
    _, p2, p3 = golden.ids
    manifest = layout.manifest(p3)
    body = json.loads(repo.read(manifest))
    del body["checksum"]
    epoch, seq = body["change_id"].split("/")
    body.update(version=1, change_id=f"{epoch}/{int(seq) - 2}")  # older than its parent's
    repo.write(manifest, json.dumps(body).encode())
    code, report = cli(capsys, "check", repo.location)
    assert code == 12 and names(report) == [("link", f"points/{p3}.json", [p3])]
    assert "older than its parent" in report["problems"][0]["detail"]  # type: ignore[index]
    assert backup_into(work, target=repo).point.parent == p2  # never a base


def _manifest_body(repo: RepoTarget, manifest: str) -> dict[str, Any]:
    """A manifest's JSON body, opened as the repository stores it."""
    with repo.open() as opened:
        return dict(json.loads(opened.codec.open_file(KIND_MANIFEST, manifest,
                                                      repo.read(manifest), manifest)))


def _write_manifest_body(repo: RepoTarget, manifest: str, body: dict[str, Any]) -> None:
    """Put ``body`` in place of the manifest, sealed as the repository seals it."""
    data = json.dumps(body).encode()
    if repo.encrypted:
        with repo.open() as opened:
            data = opened.codec.seal_file(KIND_MANIFEST, manifest, data)
    repo.write(manifest, data)


@pytest.mark.parametrize("edit", ["v1 with checksum", "v1 no tables", "v1 smaller",
                                  "v2 other chunk size"])
def test_a_manifest_whose_tables_do_not_fit_its_size_is_refused(
        golden: Golden, tmp_path: Path, repo: RepoTarget,
        capsys: pytest.CaptureFixture[str], edit: str) -> None:
    """A manifest edited so that its page tables (or pages) do not cover its size, or turned
    into version 1 to shed its checksum, restored zeros: now the point is refused (exit 12,
    nothing at the target) and check reports it."""
    if repo.encrypted and edit.startswith("v1"):
        pytest.skip("an encrypted repository has no version 1 manifests")
    _, _, p3 = golden.ids
    manifest = layout.manifest(p3)
    body = _manifest_body(repo, manifest)
    if edit == "v1 with checksum":
        body.update(version=1)
    elif edit == "v1 no tables":
        del body["checksum"]
        body.update(version=1, tables=[])
    elif edit == "v1 smaller":  # one chunk: the table's page names 32
        del body["checksum"]
        body.update(version=1, size_bytes=CS)
    else:
        del body["checksum"]
        body.update(chunk_size=2 * CS, page_chunks=512)
        body["checksum"] = body_checksum(body)
    _write_manifest_body(repo, manifest, body)
    target = tmp_path / "p3.raw"
    assert main(["restore", repo.location, p3, "--to", str(target)]) == 12
    assert "ManifestCorrupt" in capsys.readouterr().err
    assert not target.exists()
    code, report = cli(capsys, "check", repo.location)
    assert code == 12 and [p3] in [affected for _, _, affected in names(report)]


def test_a_base_whose_page_is_of_another_width_is_passed_over(
        golden: Golden, work: Path, tmp_path: Path, repo: RepoTarget) -> None:
    """A base whose manifest names the page table of a point of a smaller disk (its checksum
    made anew): the incremental once wrote its change past the end of that page, appending it,
    and reported success with a point that could not be restored. Now the base is passed over
    for the next older point, and the new point restores right."""
    _, p2, p3 = golden.ids
    Disk.create(work / "small", 8 * CS).close()
    with Disk.open(work / "small") as small, repo.open() as opened:
        small.pwrite(b"s" * CS, 0)
        other = run_backup(LocalDiskSource(small), opened, BackupOptions(seed=1)).point
    manifest = layout.manifest(p3)
    body = _manifest_body(repo, manifest)
    del body["checksum"]
    body["tables"] = list(other.tables)  # one table of one page, as p3's: of 8 chunks, not 32
    body["checksum"] = body_checksum(body)
    _write_manifest_body(repo, manifest, body)
    write_chunks(work, {12: b"\x0c" * CS})
    report = backup_into(work, target=repo)
    assert report.kind == "incremental" and report.point.parent == p2
    assert any(p3 in why and "lists 8 chunks" in why for why in report.passed_over)
    with repo.open() as opened:
        assert restored(opened, report.point.id, tmp_path) == disk_bytes(work)


# 2. a damaged chunk ------------------------------------------------------------------------------

def _flip_chunk(repo: RepoTarget, point_id: str, index: int) -> bytes:
    with repo.open() as opened:
        name = opened.chunk_digests(point_id, [index])[index]
        assert name is not None
        loc = opened.index[name]
    repo.flip(layout.pack(loc.pack_id), loc.offset + 48 + 1000)
    return name


def test_a_damaged_chunk_is_quarantined_and_stored_again(
        golden: Golden, work: Path, tmp_path: Path, repo: RepoTarget,
        capsys: pytest.CaptureFixture[str]) -> None:
    p1, p2, p3 = golden.ids
    name = _flip_chunk(repo, p3, 0)  # chunk 0: in every point, and still on the disk
    repo_dir = repo.location
    code, report = cli(capsys, "check", repo_dir, "--read-data")
    assert code == damaged_code(repo)
    assert names(report) == [("chunk", name.hex(), [p1, p2, p3])]
    assert [o["digest"] for o in report["damaged_objects"]] == [name.hex()]  # type: ignore[index]
    assert len(repo.names("quarantine/")) == 1
    assert main(["restore", repo_dir, p1, "--to", str(tmp_path / "p1.raw")]) == 12
    assert "in quarantine" in capsys.readouterr().err
    # a full backup stores that chunk again instead of deduplicating against the damaged copy
    code, out = cli(capsys, "backup", str(work / "disk"), "--repo", repo_dir, "--full")
    assert code == 0 and out["bytes_stored"] > 0  # type: ignore[index]
    new = out["point"]["id"]  # type: ignore[index]
    with repo.open() as opened:
        assert restored(opened, new, tmp_path) == disk_bytes(work)
        # the older points name the same content: they restore again too
        for point_id in golden.ids:
            assert restored(opened, point_id, tmp_path) == golden.contents[point_id]
    code, report = cli(capsys, "check", repo_dir, "--read-data")
    assert code == 0 and report["quarantined_before"] == 1  # type: ignore[index]


@pytest.mark.parametrize("off_by", [1, -1])
def test_an_index_entry_with_a_wrong_length_puts_no_intact_copy_in_quarantine(
        golden: Golden, tmp_path: Path, repo: RepoTarget,
        capsys: pytest.CaptureFixture[str], off_by: int) -> None:
    """An index file (read first) names a chunk at its real pack and offset with a wrong
    length: check reports that index entry, and nothing goes to quarantine; restore reads the
    chunk through the entry that is right."""
    p1, _, _ = golden.ids
    with repo.open() as opened:
        name = opened.chunk_digests(p1, [0])[0]
        assert name is not None
        loc = opened.index[name]
        opened.write_index("0000.idx", index_file.encode(
            {name: loc._replace(length=loc.length + off_by)}))
    code, report = cli(capsys, "check", repo.location, "--read-data")
    assert code == 12
    assert names(report) == [("index", name.hex(), [])]
    assert "the index entry is damaged" in report["problems"][0]["detail"]  # type: ignore[index]
    assert repo.names("quarantine/") == []
    with repo.open() as opened:
        assert restored(opened, p1, tmp_path) == golden.contents[p1]
    assert repo.names("quarantine/") == []
    repo.delete("index/0000.idx")
    assert cli(capsys, "check", repo.location, "--read-data")[0] == 0


def test_an_incremental_stores_again_what_its_base_lost(
        golden: Golden, work: Path, tmp_path: Path, repo: RepoTarget) -> None:
    _, _, p3 = golden.ids
    name = _flip_chunk(repo, p3, 5)
    with repo.open() as opened:
        assert not opened.check(read_data=True).ok
    write_chunks(work, {30: b"\x1e" * CS})
    report = backup_into(work, target=repo)
    assert report.kind == "incremental" and report.point.parent == p3
    assert report.chunks_read_again == 1 and report.chunks_read == 2
    with repo.open() as opened:
        assert opened.has_chunk(name)
        assert restored(opened, report.point.id, tmp_path) == disk_bytes(work)


def test_the_audit_reads_stored_bytes_and_stores_a_damaged_chunk_again(
        golden: Golden, work: Path, tmp_path: Path, repo: RepoTarget,
        capsys: pytest.CaptureFixture[str]) -> None:
    _, _, p3 = golden.ids
    name = _flip_chunk(repo, p3, 2)
    code, out = cli(capsys, "backup", str(work / "disk"), "--repo", repo.location,
                    "--audit-sample", "100")
    assert code == 0 and out["kind"] == "incremental"  # type: ignore[index]
    assert out["audit"]["tracker_trusted"]  # type: ignore[index]
    assert out["audit"]["damaged_in_repository"] == [[2 * CS, CS]]  # type: ignore[index]
    assert out["audit"]["stored_copies_checked"] > 0  # type: ignore[index]
    with repo.open() as opened:
        point = opened.point(out["point"]["id"])  # type: ignore[index]
        assert point.audit["damaged_in_repository"] == [[2 * CS, CS]]
        assert opened.has_chunk(name) and opened.check(read_data=True).ok
        assert restored(opened, p3, tmp_path) == golden.contents[p3]


def test_verify_reads_stored_bytes_and_heal_stores_them_again(
        golden: Golden, work: Path, tmp_path: Path, repo: RepoTarget,
        capsys: pytest.CaptureFixture[str]) -> None:
    _, _, p3 = golden.ids  # the disk still holds P3's content
    _flip_chunk(repo, p3, 7)
    repo_dir, disk_dir = repo.location, str(work / "disk")
    code, out = cli(capsys, "verify", repo_dir, p3, "--against", disk_dir)
    assert code == 12 and not out["identical"]  # type: ignore[index]
    assert out["differing_areas"] == [] and out["damaged_areas"] == [[7 * CS, CS]]  # type: ignore[index]
    assert out["healed_point"] is None and out["damaged_objects"]  # type: ignore[index]
    with repo.open() as opened:
        assert opened.point(p3).verify_state == "failed"
    assert len(repo.names("verify/")) == 1  # a verify record; the manifest is not rewritten
    code, out = cli(capsys, "verify", repo_dir, p3, "--against", disk_dir, "--heal")
    assert code == 12 and out["damaged_areas"] == [[7 * CS, CS]]  # type: ignore[index]
    assert out["restored_bytes"] > 0 and out["healed_point"] is None  # type: ignore[index]
    with repo.open() as opened:
        assert opened.point(p3).verify_state == "ok"
        assert restored(opened, p3, tmp_path) == golden.contents[p3]
    code, out = cli(capsys, "verify", repo_dir, p3, "--against", disk_dir)
    assert code == 0 and out["identical"]  # type: ignore[index]


def test_verify_tells_damage_from_difference(golden: Golden, work: Path, tmp_path: Path,
                                             repo: RepoTarget,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    _, _, p3 = golden.ids
    _flip_chunk(repo, p3, 7)
    write_chunks(work, {12: b"\x0c" * CS})  # and the disk moved on since P3
    code, out = cli(capsys, "verify", repo.location, p3, "--against", str(work / "disk"),
                    "--heal")
    assert code == 13
    assert out["differing_areas"] == [[12 * CS, CS]]  # type: ignore[index]
    assert out["damaged_areas"] == [[7 * CS, CS]]  # type: ignore[index]
    # the live disk is not P3's state: no corrected point; its lost chunk is stored again
    assert out["healed_point"] is None and "not the disk state" in out["not_healed"]  # type: ignore[index,operator]
    with repo.open() as opened:
        assert restored(opened, p3, tmp_path) == golden.contents[p3]  # its chunk stored again


def test_repo_repair_names_exactly_the_points_that_cannot_be_restored(
        golden: Golden, work: Path, tmp_path: Path, repo: RepoTarget,
        capsys: pytest.CaptureFixture[str]) -> None:
    p1, p2, p3 = golden.ids
    only_p1 = _flip_chunk(repo, p1, 3)  # P2 overwrote chunk 3: only P1 has this content
    local = repo.server is None
    if local:
        (Path(repo.location) / "index" / "0123.idx.tmp").write_bytes(b"half an index")
    code, out = cli(capsys, "repo", "repair", repo.location)
    assert code == 12 and not out["ok"]  # type: ignore[index]
    assert [u["point"] for u in out["unrestorable_points"]] == [p1]  # type: ignore[index]
    assert out["unrestorable_points"][0]["missing"] == [  # type: ignore[index]
        f"chunk {only_p1.hex()} at disk offset {3 * CS}"]
    assert [o["digest"] for o in out["damaged_objects"]] == [only_p1.hex()]  # type: ignore[index]
    assert out["temp_files_deleted"] == int(local)  # type: ignore[index]
    assert "verify POINT" in out["advice"]  # type: ignore[index]
    assert not (Path(repo.location) / "index" / "0123.idx.tmp").exists()
    assert len(repo.names("index/")) == 1
    with repo.open() as opened:
        for point_id in (p2, p3):
            assert restored(opened, point_id, tmp_path) == golden.contents[point_id]
    main(["repo", "repair", repo.location])
    text = capsys.readouterr().out
    assert f"{p1}: lacks chunk {only_p1.hex()}" in text and p2 not in text


def test_repo_repair_rebuilds_a_damaged_index_and_trailer(
        golden: Golden, work: Path, tmp_path: Path, repo: RepoTarget,
        capsys: pytest.CaptureFixture[str]) -> None:
    repo.flip(repo.names("index/")[0], 20)
    pack = repo.names("packs/")[0]
    repo.flip(pack, len(repo.read(pack)) - 1)  # its trailer's magic
    code, report = cli(capsys, "check", repo.location)
    assert code == damaged_code(repo)
    kinds = {kind for kind, _, _ in names(report)}
    assert "index" in kinds and "pack" in kinds
    code, out = cli(capsys, "repo", "repair", repo.location)
    assert code == 0 and out["ok"]  # type: ignore[index]
    assert out["damaged_trailers"] == [pack.rpartition("/")[2].removesuffix(".pack")]  # type: ignore[index]
    assert out["objects_copied"] > 0  # type: ignore[index]
    assert pack not in repo.names("packs/")  # its objects are in a new pack now
    code, report = cli(capsys, "check", repo.location, "--read-data")
    assert code == 0 and report["unreferenced_packs"] == 0  # type: ignore[index]
    with repo.open() as opened:
        for point_id in golden.ids:
            assert restored(opened, point_id, tmp_path) == golden.contents[point_id]


def test_a_pack_in_another_folder_is_named_and_repair_still_runs(
        golden: Golden, tmp_path: Path, repo: RepoTarget,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A pack file moved by hand into another packs/<pp>/ folder is no pack: check says where
    it is and where it belongs, repair runs and names the points it leaves unrestorable; moved
    back, repair makes every point restorable again."""
    pack = repo.names("packs/")[0]
    pack_id = pack.rpartition("/")[2].removesuffix(".pack")
    folder = "00" if not pack_id.startswith("00") else "ff"
    moved = f"packs/{folder}/{pack_id}.pack"
    repo.write(moved, repo.read(pack))
    repo.delete(pack)
    code, report = cli(capsys, "check", repo.location, "--read-data")
    assert code == 12
    assert any(f"{moved} is in another folder: move it to {pack}" in p["detail"]
               for p in report["problems"])  # type: ignore[index]
    code, out = cli(capsys, "repo", "repair", repo.location)
    assert code == 12 and out["unrestorable_points"]  # type: ignore[index]
    repo.write(pack, repo.read(moved))
    repo.delete(moved)
    code, out = cli(capsys, "repo", "repair", repo.location)
    assert code == 0 and out["ok"]  # type: ignore[index]
    with repo.open() as opened:
        for point_id in golden.ids:
            assert restored(opened, point_id, tmp_path) == golden.contents[point_id]


def test_repo_repair_refuses_while_a_backup_runs(repo: RepoTarget,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with repo.open() as opened:
        writer = opened.begin("d", CS, None)
        try:
            assert main(["repo", "repair", repo.location]) == 7
            assert "backups are running" in capsys.readouterr().err
        finally:
            writer.close()
    before = repo.names()
    assert main(["repo", "repair", repo.location]) == 0
    assert {f for f in repo.names() if not re.match(r"index/", f)} == \
        {f for f in before if not re.match(r"index/", f)}
