"""Reading a view of the chain, writing its top layer, and merging one layer into another.

Nothing here touches the tracker: the disk marks it before calling `write_top`, and merges move
data between layers without changing any view's logical content.
"""

from __future__ import annotations

from blocktrail.disk.layers import BaseLayer, ClusterState, DeltaLayer, Layer
from blocktrail.extents import iter_pieces
from blocktrail.fileio import pread_direct

Piece = tuple[Layer | None, int, int]  # (layer holding the bytes or None for zeros, offset, length)


def map_view(layers: list[Layer], cluster_size: int, count: int, offset: int) -> list[Piece]:
    """Where the bytes of ``[offset, offset+count)`` of the view whose top is ``layers[-1]``
    live: pieces in order, adjacent pieces of one layer merged. Layers keep data at logical
    offsets, so a piece's offset is also its offset in the layer's file."""
    if len(layers) == 1:
        return [(layers[0], offset, count)]
    out: list[Piece] = []
    top = len(layers) - 1
    for piece_offset, piece_length in iter_pieces(offset, count, cluster_size):
        for layer, at, length in _locate(layers, top, cluster_size, piece_offset, piece_length):
            if out and out[-1][0] is layer and out[-1][1] + out[-1][2] == at:
                out[-1] = (layer, out[-1][1], out[-1][2] + length)
            else:
                out.append((layer, at, length))
    return out


def read_pieces(pieces: list[Piece], *, direct: bool = False) -> bytes | memoryview:
    """The bytes of ``pieces``; ``direct``: read past the page cache (`fileio.pread_direct`:
    a single piece then comes as a view of memory of its own)."""
    for layer, at, length in pieces:
        if isinstance(layer, BaseLayer):
            layer.prepare(at, length)

    def read(layer: Layer, length: int, at: int) -> bytes | memoryview:
        return pread_direct(layer.data, length, at) if direct else layer.data.pread(length, at)

    if len(pieces) == 1:
        layer, at, length = pieces[0]
        if layer is not None:
            return read(layer, length, at)
    return b"".join(bytes(length) if layer is None else read(layer, length, at)
                    for layer, at, length in pieces)


def read_view(layers: list[Layer], cluster_size: int, count: int, offset: int) -> bytes:
    """The logical bytes of the view whose top is ``layers[-1]``."""
    data = read_pieces(map_view(layers, cluster_size, count, offset))
    return data if isinstance(data, bytes) else bytes(data)  # through the cache: bytes already


def read_view_direct(layers: list[Layer], cluster_size: int, count: int, offset: int
                     ) -> bytes | memoryview:
    """`read_view` past the page cache."""
    return read_pieces(map_view(layers, cluster_size, count, offset), direct=True)


def _locate(layers: list[Layer], top: int, cluster_size: int, offset: int,
            length: int) -> list[Piece]:
    """Where a piece inside one cluster lives, as seen through ``layers[top]`` and below."""
    for index in range(top, -1, -1):
        layer = layers[index]
        if isinstance(layer, BaseLayer):
            return [(layer, offset, length)]
        state = layer.state(offset // cluster_size)
        if state is ClusterState.DATA:
            return [(layer, offset, length)]
        if state is ClusterState.ZERO or offset >= layer.visible_below:
            return [(None, offset, length)]
        if offset + length > layer.visible_below:
            visible = layer.visible_below - offset
            return [*_locate(layers, index - 1, cluster_size, offset, visible),
                    (None, offset + visible, length - visible)]
    return [(None, offset, length)]


def write_top(layers: list[Layer], cluster_size: int, offset: int,
              data: bytes | memoryview | None, length: int) -> None:
    """Write ``data`` (``None``: zeros) to the top layer; a delta copies partial clusters up."""
    top = layers[-1]
    if isinstance(top, BaseLayer):
        if data is None:
            top.data.punch_hole(offset, length)
        else:
            top.data.pwrite(data, offset)
        return
    pos = 0
    view = None if data is None else memoryview(data)  # pieces without copies
    for piece_offset, piece_length in iter_pieces(offset, length, cluster_size):
        piece = None if view is None else view[pos : pos + piece_length]
        pos += piece_length
        _write_delta_piece(layers, top, cluster_size, piece_offset, piece_length, piece)


def writes_in_place(top: Layer, cluster_size: int, offset: int, length: int) -> bool:
    """Whether a write of the range to ``top`` copies nothing up from below (a base layer, or
    every cluster written whole or already held by the delta)."""
    if isinstance(top, BaseLayer):
        return True
    for piece_offset, piece_length in iter_pieces(offset, length, cluster_size):
        if piece_length != cluster_size and \
                top.state(piece_offset // cluster_size) is not ClusterState.DATA:
            return False
    return True


def _write_delta_piece(layers: list[Layer], top: DeltaLayer, cluster_size: int, offset: int,
                       length: int, piece: memoryview | None) -> None:
    """One cluster's part of a write, alone on that cluster (other writers of the same cluster
    wait: a copy-up must not lose a concurrent write's bytes)."""
    cluster = offset // cluster_size
    with top.cluster_lock(cluster):
        _write_cluster(layers, top, cluster_size, cluster, offset, length, piece)


def _write_cluster(layers: list[Layer], top: DeltaLayer, cluster_size: int, cluster: int,
                   offset: int, length: int, piece: memoryview | None) -> None:
    cluster_offset = cluster * cluster_size
    if length == cluster_size:
        if piece is None:
            top.data.punch_hole(cluster_offset, cluster_size)
            top.set_state(cluster, ClusterState.ZERO)
        else:
            top.data.pwrite(piece, cluster_offset)
            top.set_state(cluster, ClusterState.DATA)
        return
    data = bytes(length) if piece is None else piece
    state = top.state(cluster)
    if state is ClusterState.DATA:
        top.data.pwrite(data, offset)
        return
    # copy the cluster's current content up, then overlay the piece
    current = bytearray(read_pieces(_locate(layers, len(layers) - 1, cluster_size,
                                            cluster_offset, cluster_size)))
    within = offset - cluster_offset
    current[within : within + length] = data
    top.data.pwrite(current, cluster_offset)
    top.set_state(cluster, ClusterState.DATA)


def drop_beyond(top: Layer, cluster_size: int, size_bytes: int) -> None:
    """Forget the top layer's data at and past ``size_bytes`` (idempotent)."""
    if isinstance(top, BaseLayer):
        if top.data.size() > size_bytes:
            top.data.truncate(size_bytes)
        return
    top.visible_below = min(top.visible_below, size_bytes)
    for cluster in [c for c in top.states if (c + 1) * cluster_size > size_bytes]:
        cluster_offset = cluster * cluster_size
        if cluster_offset >= size_bytes:
            top.data.punch_hole(cluster_offset, cluster_size)
            top.set_state(cluster, ClusterState.ABSENT)
        elif top.state(cluster) is ClusterState.DATA:
            top.data.punch_hole(size_bytes, cluster_offset + cluster_size - size_bytes)


def merge_clusters(parent: Layer, child: DeltaLayer, clusters: list[int]) -> None:
    """Copy ``clusters`` of the frozen ``child`` into ``parent`` (idempotent)."""
    cs = child.cluster_size
    for cluster in clusters:
        state = child.state(cluster)
        offset = cluster * cs
        if state is ClusterState.DATA:
            parent.data.pwrite(child.data.pread(cs, offset), offset)
            if isinstance(parent, DeltaLayer):
                parent.set_state(cluster, ClusterState.DATA)
        elif state is ClusterState.ZERO:
            parent.data.punch_hole(offset, cs)
            if isinstance(parent, DeltaLayer):
                parent.set_state(cluster, ClusterState.ZERO)


def hide_below_limit(parent: Layer, child: DeltaLayer) -> None:
    """Before merging: what ``child`` hides past its ``visible_below`` must vanish from
    ``parent`` too, so the merged layer reads the same (zeros there)."""
    limit = child.visible_below
    if isinstance(parent, BaseLayer):
        if parent.data.size() > limit:
            parent.data.truncate(limit)
        return
    parent.visible_below = min(parent.visible_below, limit)
    drop_beyond(parent, child.cluster_size, limit)
