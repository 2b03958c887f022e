"""Index files decoded against an independent reading of the format: every entry whose envelope
no pack can hold makes the file damaged, wherever it is among the others, and nothing else
does; the chunk index gives back each location as it was written."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocktrail.repo import index as index_file
from blocktrail.repo.errors import RepositoryError
from blocktrail.repo.index import MAX_END, MIN_ENVELOPE, ChunkIndex
from blocktrail.repo.packs import Location

PACKS = ["00" * 16, "ab" * 16, "ff" * 16]
OFFSETS = st.one_of(st.integers(0, 1 << 40), st.integers(MAX_END - (1 << 33), MAX_END),
                    st.sampled_from([MAX_END - MIN_ENVELOPE, (1 << 63), (1 << 64) - 1]))
LENGTHS = st.one_of(st.integers(MIN_ENVELOPE, 1 << 20), st.integers(0, MIN_ENVELOPE),
                    st.sampled_from([(1 << 32) - 1]))


def _names(count: int) -> list[bytes]:
    return [struct.pack("<I", i) * 8 for i in range(count)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PACKS), OFFSETS, LENGTHS, st.integers(0, 1 << 20)),
                min_size=1, max_size=40))
def test_decode_refuses_exactly_the_files_with_an_entry_no_pack_can_hold(
        entries: list[tuple[str, int, int, int]]) -> None:
    locations = {name: Location(*entry) for name, entry in zip(_names(len(entries)), entries,
                                                                strict=True)}
    data = index_file.encode(locations)
    fits = all(loc.length >= MIN_ENVELOPE and loc.offset + loc.length <= MAX_END
               for loc in locations.values())
    if not fits:
        with pytest.raises(RepositoryError, match="no pack can hold"):
            index_file.decode(data, "index/x.idx")
        return
    decoded = index_file.decode(data, "index/x.idx")
    assert {name: index_file.unpack_location(packed)
            for name, packed in decoded.items()} == locations
    index = ChunkIndex(set(PACKS), set())
    index.add_file(decoded)
    assert index.locations() == locations
    assert all(index.get(name) == loc and index[name] == loc
               for name, loc in locations.items())


def test_an_entry_that_fits_beside_others_that_fit_is_no_damage() -> None:
    """The largest offset and the largest length, in two different entries, would end past
    any pack together; each entry alone fits."""
    far = Location(PACKS[0], MAX_END - MIN_ENVELOPE, MIN_ENVELOPE, 1)
    long = Location(PACKS[1], 0, (1 << 32) - 1, 1)
    decoded = index_file.decode(index_file.encode(dict(zip(_names(2), [far, long],
                                                           strict=True))), "index/x.idx")
    assert sorted(map(index_file.unpack_location, decoded.values())) == sorted([far, long])


def test_spares_condemned_packs_and_drops_see_the_same_locations() -> None:
    """A second copy is a spare; a copy only in a condemned pack is no reference; a dropped
    copy gives way to its spare, then the object is lost."""
    name = _names(1)[0]
    first, second = Location(PACKS[0], 0, 100, 52), Location(PACKS[1], 4096, 100, 52)
    index = ChunkIndex(set(PACKS), set(), frozenset({PACKS[0]}))
    index.add_file(index_file.decode(index_file.encode({name: first}), "a"))
    index.add_file(index_file.decode(index_file.encode({name: second}), "b"))
    assert index.copies(name) == [first, second]
    assert index.referenceable(name) and not index.unreferenceable()
    assert index.named_packs() == {PACKS[0]}  # of the copies in use, and of lost ones
    assert index.drop(name, PACKS[0], 0, "damaged") == second
    assert index.copies(name) == [second]
    assert index.drop(name, PACKS[1], 4096, "damaged") is None
    assert name in index.lost() and index.why_missing(name) == "damaged"
    only_condemned = ChunkIndex(set(PACKS), set(), frozenset({PACKS[0]}))
    only_condemned.add({name: first})
    assert not only_condemned.referenceable(name)
    assert only_condemned.unreferenceable() == {name}


@pytest.mark.parametrize("pack_id", ["ab", "AB" * 16, "ab" * 17, "zz" * 16])
def test_a_location_whose_pack_is_no_pack_id_is_not_taken(pack_id: str) -> None:
    """Held packed, a pack ID that is not 32 lowercase hex digits would come back as another
    one (cut, padded or lowercased): it is refused instead."""
    with pytest.raises(ValueError):
        ChunkIndex(set(PACKS), set()).add({_names(1)[0]: Location(pack_id, 0, 100, 52)})
