"""The base of an incremental is chosen by walking the manifests newest first, as far as the
choice needs: the same choice as reading every manifest of the repository first, with fewer
reads where the repository holds other disks and a long history."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocktrail.backup import base
from blocktrail.backup.base import BaseChoice, choose_base
from blocktrail.repo import Repository, RestorePoint
from blocktrail.repo.manifest import body_checksum
from blocktrail.repo.pointwalk import BATCH
from blocktrail.repo.store import Store
from s3server import RepoTarget

CS = 64 * 1024


def add_point(repo: Repository, disk: str, parent: RestorePoint | None, *,
              tracker_trusted: bool = True) -> RestorePoint:
    writer = repo.begin(disk, 2 * CS, parent.id if parent else None)
    writer.put_chunk(0, bytes([len(repo.manifest_files()) % 251 + 1]) * CS)
    return writer.commit(kind="incremental" if parent else "full", change_id=None,
                         tracker_trusted=tracker_trusted)


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The manifests read, one entry per read."""
    read: list[str] = []
    original = Store.read_point

    def read_point(self: Store, filename: str, *args: object) -> object:
        read.append(filename.removesuffix(".json"))
        return original(self, filename, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Store, "read_point", read_point)
    return read


def test_the_walk_stops_at_the_base_and_reads_its_parents_alone(
        tmp_path: Path, counted: list[str]) -> None:
    """The disk's full is older than 40 points of another disk, its incremental newer than
    them: the choice reads the newest batch of manifests and the full (the incremental's
    chain), not the 40 between."""
    repo = RepoTarget("local", str(tmp_path / "repo")).init()
    full = add_point(repo, "mine", None)
    others = [add_point(repo, "other", None) for _ in range(40)]
    newest = add_point(repo, "mine", full)
    choice = choose_base(repo, "mine")
    assert choice.point is not None and choice.point.id == newest.id
    assert sorted(counted) == sorted({*counted})  # each manifest read once
    assert len(counted) == BATCH + 1 and full.id in counted
    assert not {p.id for p in others[: 40 - BATCH + 1]} & {*counted}


def test_a_damaged_manifest_newer_than_the_base_is_named_and_an_older_one_not_read(
        tmp_path: Path, counted: list[str]) -> None:
    target = RepoTarget("local", str(tmp_path / "repo"))
    repo = target.init()
    old = add_point(repo, "other", None)
    for _ in range(BATCH + 2):
        add_point(repo, "other", None)
    mine = add_point(repo, "mine", None)
    damaged = add_point(repo, "mine", mine)
    for point in (old, damaged):
        target.write(f"points/{point.id}.json", b"{not a manifest")
    choice = choose_base(repo, "mine")
    assert choice.point is not None and choice.point.id == mine.id
    assert [why for why in choice.passed_over if f"points/{damaged.id}.json" in why]
    assert old.id not in counted and not [why for why in choice.passed_over if old.id in why]


# ---------------------------------------------------------------- against reading them all

def choose_base_reading_all(store: Repository, disk_id: str,
                            exclude: dict[str, str]) -> BaseChoice:
    """The model: every manifest read first (`scan_points`), then the same rules newest
    first."""
    points, damaged = store.scan_points()
    store.reload_index()
    passed = [f"{name}: {message}" for name, message in damaged]
    by_id = {p.id: p for p in points}
    lost = store.lost_objects()
    for point in reversed([p for p in points if p.disk_id == disk_id]):
        tainted = base._tainted(point, by_id)
        if tainted is not None:
            return BaseChoice(None, None, tuple(passed), tainted)
        why = exclude.get(point.id) or base._not_whole(store, point, by_id, lost)
        if why is not None:
            passed.append(f"restore point {point.id}: {why}")
            continue
        return BaseChoice(None, point, tuple(passed))
    return BaseChoice(None, None, tuple(passed))


DISKS = ("a", "b", "c")
step = st.tuples(st.sampled_from(DISKS), st.booleans(),  # disk, incremental (when it can)
                 st.sampled_from([None, None, None, "failed", "tracker-missed"]),
                 st.sampled_from([None, None, None, None, "damaged", "forgotten"]),
                 st.booleans())  # excluded by the caller (`_plan`'s passed-over points)


@contextlib.contextmanager
def fresh_repo() -> Iterator[tuple[RepoTarget, Repository]]:
    with tempfile.TemporaryDirectory() as work:
        target = RepoTarget("local", f"{work}/repo")
        repo = target.init()
        try:
            yield target, repo
        finally:
            repo.close()


@settings(max_examples=40, deadline=None, database=None)
@given(st.lists(step, min_size=1, max_size=3 * BATCH), st.sampled_from(DISKS))
def test_the_walk_chooses_what_reading_every_manifest_chooses(
        steps: list[tuple[str, bool, str | None, str | None, bool]], disk: str) -> None:
    """Points of three disks, incrementals on their disk's newest point, some of them tainted
    (verify failed, the audit caught the tracker), damaged, forgotten, or excluded: the same
    base, the same reason for none, the same points passed over; damaged manifests named as
    far as the walk read (all of them, reading everything)."""
    with fresh_repo() as (target, repo):
        newest: dict[str, RestorePoint] = {}
        exclude: dict[str, str] = {}
        for disk_id, incremental, taint, fate, excluded in steps:
            parent = newest.get(disk_id) if incremental else None
            point = add_point(repo, disk_id, parent, tracker_trusted=taint != "tracker-missed")
            if fate is None:  # a backup builds on no damaged or forgotten point
                newest[disk_id] = point
            if taint == "failed":
                repo.record_verify(point.id, "failed")
            if fate == "damaged":
                target.write(f"points/{point.id}.json", b"{not a manifest")
            elif fate == "forgotten":
                target.delete(f"points/{point.id}.json")
            if excluded:
                exclude[point.id] = "it cannot carry this incremental"
        walked = choose_base(repo, disk, exclude)
        model = choose_base_reading_all(repo, disk, exclude)
    assert (walked.point and walked.point.id) == (model.point and model.point.id)
    assert walked.no_base == model.no_base
    def points_passed(choice: BaseChoice) -> list[str]:  # the others name damaged manifests
        return [why for why in choice.passed_over if why.startswith("restore point ")]

    assert points_passed(walked) == points_passed(model)
    assert set(walked.passed_over) <= set(model.passed_over)
    if walked.point is None and walked.no_base is None:  # walked to the end: read them all
        assert sorted(walked.passed_over) == sorted(model.passed_over)


@pytest.mark.parametrize("parent", ["../keys/x", "20991231T000000000Z-00000000", "itself"])
def test_a_parent_that_names_no_listed_point_is_read_from_nowhere(
        tmp_path: Path, counted: list[str], parent: str) -> None:
    """A manifest whose parent (its checksum made anew) is a path, a point no listing holds, or
    itself: the walk reads only manifests the listing holds, and chooses what reading them
    all chooses."""
    target = RepoTarget("local", str(tmp_path / "repo"))
    repo = target.init()
    full = add_point(repo, "mine", None)
    edited = add_point(repo, "mine", full)
    name = f"points/{edited.id}.json"
    body = json.loads(target.read(name))
    del body["checksum"]
    body["parent"] = edited.id if parent == "itself" else parent
    body["checksum"] = body_checksum(body)
    target.write(name, json.dumps(body).encode())
    walked = choose_base(repo, "mine")
    assert set(counted) <= {full.id, edited.id}
    model = choose_base_reading_all(repo, "mine", {})
    assert (walked.point and walked.point.id) == (model.point and model.point.id)
    assert walked.passed_over == model.passed_over and walked.no_base == model.no_base
