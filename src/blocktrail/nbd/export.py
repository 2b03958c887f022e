"""What the NBD server serves: its export interface, and nothing else about what stands behind
an export (a disk, a snapshot, a file, memory).

- `Catalog`: the exports by name. `lookup` and `names` answer the negotiation (the protocol
  core's `ExportCatalog`); `open` gives the `Export` a connection then uses, once per connection.
- `Export`: carries out the requests. `map_read` maps a read to `ReadSegment`s that are data in
  a file (sent with ``sendfile``), bytes, or zeros; `perform` does WRITE, TRIM, WRITE_ZEROES,
  FLUSH and CACHE; `block_status` answers the negotiated meta contexts (`perform_now` and
  `block_status_now` on the event loop, when cheap). A request that cannot be
  done raises `RequestFailed` (its errno and message go to the client in an error reply; the
  connection goes on).

These are Protocols: an export satisfies them by its shape, without importing anything from
here (the disk's `MappedRead` and `ReadSegment` do).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from blocktrail.nbd.proto.events import ExportInfo, Request
from blocktrail.nbd.proto.server import ExportCatalog


class ReadSegment(Protocol):
    """``length`` bytes at the export's ``offset``: in the file ``fd`` at the same offset (zeros
    past the file's end), in ``data``, or zeros when both are None."""

    @property
    def offset(self) -> int: ...

    @property
    def length(self) -> int: ...

    @property
    def fd(self) -> int | None: ...

    @property
    def data(self) -> bytes | None: ...


class MappedRead(Protocol):
    """One read as segments, in order and covering it; `close` once they are sent (it releases
    the descriptors the segments name). ``copy``: the files' bytes are to be read and the copy
    sent, not spliced with ``sendfile`` (a spliced page is read when the peer takes it, which
    may be after `close`, when the export may change the file)."""

    @property
    def segments(self) -> Sequence[ReadSegment]: ...

    @property
    def copy(self) -> bool: ...

    def close(self) -> None: ...


class Export(Protocol):
    """One export as a connection uses it."""

    @property
    def size_bytes(self) -> int: ...

    @property
    def read_only(self) -> bool: ...

    def map_read(self, count: int, offset: int, *, wait: bool) -> MappedRead | None:
        """The read of ``count`` bytes at ``offset`` as segments; None when it would have to
        wait (``wait=False``: the server then asks again from a worker thread, with
        ``wait=True``, where None is not an answer)."""
        ...

    def perform(self, request: Request) -> None:
        """WRITE, TRIM, WRITE_ZEROES, FLUSH or CACHE (FUA included); on a worker thread."""
        ...

    def perform_now(self, request: Request) -> bool:
        """The request carried out at once, on the event loop, if nothing would make it wait
        (a small write to memory, say): True. False: nothing was done, and the server hands it
        to `perform` on a worker thread. An export that never can answers False. Once it
        answered True, a WRITE's data is the server's again (it may receive the next payload
        into it): what the export keeps of it, it copies."""
        ...

    def block_status(self, request: Request, contexts: dict[int, str]) -> list[tuple[int, bytes]]:
        """(context id, descriptors as the wire carries them) for every context in
        ``contexts`` (id -> name, as negotiated); on a worker thread."""
        ...

    def block_status_now(self, request: Request,
                         contexts: dict[int, str]) -> list[tuple[int, bytes]] | None:
        """`block_status` answered at once, on the event loop, if that is cheap and nothing
        would make it wait (a small answer): the same answer (or `RequestFailed`) as
        `block_status` would give. None: nothing was done, and the server hands the request to
        `block_status` on a worker thread. An export that never can answers None."""
        ...


class Catalog(ExportCatalog, Protocol):
    """The exports a server serves."""

    def open(self, export: ExportInfo) -> Export | None:
        """The export a connection that chose ``export`` (what `lookup` gave, its ``binding``
        included) uses; None if it is gone."""
        ...
