"""Which objects one ranged read fetches: those whose copies lie close together in a pack.

A restore, an audit and a read of a point's pages all ask for many objects; on object storage
each read is a round trip, so neighbours are read together (`ranged_runs`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from blocktrail.repo.packs import Location

RANGE_BYTES = 8 << 20  # at most this much in one read
RANGE_GAP = 256 << 10  # bytes of other objects a read may carry between two wanted ones
OPEN_RUN_ENTRIES = 4096  # entries that may wait in reads still open (`ranged_runs`)

Run = list[tuple[int, bytes, Location | None]]  # (index, object name, where) in one read


class Locations(Protocol):
    def get(self, name: bytes) -> Location | None: ...


class Indexed(Protocol):
    """What `ranged_runs` asks of a store: where each object's usable copy is."""

    @property
    def index(self) -> Locations: ...


class RangeReader(Protocol):
    def read_range(self, pack_id: str, offset: int, length: int, label: str) -> bytes: ...


def ranged_runs(store: Indexed, entries: Iterable[tuple[int, bytes]]) -> Iterator[Run]:
    """Entries grouped into reads: in the order given, those whose copies lie close together in
    one pack, also where entries from other packs come in between (an incremental's changes
    amid its base's chunks, in disk order: each pack is still read in long runs, not cut at
    every change). At most OPEN_RUN_ENTRIES entries wait in runs still open (past that, the run
    that grew least recently goes), so the first read starts early and memory stays bounded
    however many packs take turns. An object without a usable copy is a run of its own (its
    read says why)."""
    # pack -> (its run, start, end), the one that grew least recently first
    open_runs: dict[str, tuple[Run, int, int]] = {}
    held = 0
    for index, name in entries:
        loc = store.index.get(name)
        if loc is None:
            yield [(index, name, None)]
            continue
        current = open_runs.pop(loc.pack_id, None)  # put back last: the youngest
        if current is not None and current[2] <= loc.offset <= current[2] + RANGE_GAP \
                and loc.offset + loc.length - current[1] <= RANGE_BYTES:
            current[0].append((index, name, loc))
            open_runs[loc.pack_id] = (current[0], current[1], loc.offset + loc.length)
        else:
            if current is not None:
                held -= len(current[0])
                yield current[0]
            open_runs[loc.pack_id] = ([(index, name, loc)], loc.offset, loc.offset + loc.length)
        held += 1
        while held > OPEN_RUN_ENTRIES:
            oldest = next(iter(open_runs))
            run = open_runs.pop(oldest)[0]
            held -= len(run)
            yield run
    for run, _, _ in open_runs.values():
        yield run


def place(store: Indexed, name: bytes) -> tuple[str, int]:
    """Where ``name``'s usable copy is, as a sort key: (pack, offset); first if it has none."""
    loc = store.index.get(name)
    return ("", 0) if loc is None else (loc.pack_id, loc.offset)


def read_run(store: RangeReader, run: Run, label: str
             ) -> Iterator[tuple[int, bytes, Location, memoryview]]:
    """The envelopes of a run whose entries all have a place (what `ranged_runs` groups): one
    ranged read, sliced. -> (index, object name, where, envelope) per entry."""
    first, last = run[0][2], run[-1][2]
    assert first is not None and last is not None
    data = memoryview(store.read_range(first.pack_id, first.offset,
                                       last.offset + last.length - first.offset, label))
    for index, name, loc in run:
        assert loc is not None  # in a run with others, every entry has a place
        at = loc.offset - first.offset
        yield index, name, loc, data[at : at + loc.length]
