"""Reading a view of the chain, writing its top layer, and merging one layer into another.

Nothing here touches the tracker: the disk marks it before calling `write_top`, and merges move
data between layers without changing any view's logical content.
"""

from __future__ import annotations

from blocktrail.disk.layers import BaseLayer, ClusterState, DeltaLayer, Layer
from blocktrail.extents import iter_pieces


def read_view(layers: list[Layer], cluster_size: int, count: int, offset: int) -> bytes:
    """The logical bytes of the view whose top is ``layers[-1]``."""
    if len(layers) == 1:
        return layers[0].data.pread(count, offset)
    out = bytearray()
    for piece_offset, piece_length in iter_pieces(offset, count, cluster_size):
        out += _read_piece(layers, len(layers) - 1, cluster_size, piece_offset, piece_length)
    return bytes(out)


def _read_piece(layers: list[Layer], top: int, cluster_size: int, offset: int,
                length: int) -> bytes:
    """Bytes of a piece inside one cluster, as seen through ``layers[top]`` and below."""
    for index in range(top, -1, -1):
        layer = layers[index]
        if isinstance(layer, BaseLayer):
            return layer.data.pread(length, offset)
        state = layer.state(offset // cluster_size)
        if state is ClusterState.DATA:
            return layer.data.pread(length, offset)
        if state is ClusterState.ZERO or offset >= layer.visible_below:
            return bytes(length)
        if offset + length > layer.visible_below:
            visible = layer.visible_below - offset
            below = _read_piece(layers, index - 1, cluster_size, offset, visible)
            return below + bytes(length - visible)
    return bytes(length)


def write_top(layers: list[Layer], cluster_size: int, offset: int, data: bytes | None,
              length: int) -> None:
    """Write ``data`` (``None``: zeros) to the top layer; a delta copies partial clusters up."""
    top = layers[-1]
    if isinstance(top, BaseLayer):
        if data is None:
            top.data.punch_hole(offset, length)
        else:
            top.data.pwrite(data, offset)
        return
    pos = 0
    for piece_offset, piece_length in iter_pieces(offset, length, cluster_size):
        piece = None if data is None else data[pos : pos + piece_length]
        pos += piece_length
        _write_delta_piece(layers, top, cluster_size, piece_offset, piece_length, piece)


def _write_delta_piece(layers: list[Layer], top: DeltaLayer, cluster_size: int, offset: int,
                       length: int, piece: bytes | None) -> None:
    cluster = offset // cluster_size
    cluster_offset = cluster * cluster_size
    if length == cluster_size:
        if piece is None:
            top.data.punch_hole(cluster_offset, cluster_size)
            top.set_state(cluster, ClusterState.ZERO)
        else:
            top.data.pwrite(piece, cluster_offset)
            top.set_state(cluster, ClusterState.DATA)
        return
    piece = bytes(length) if piece is None else piece
    state = top.state(cluster)
    if state is ClusterState.DATA:
        top.data.pwrite(piece, offset)
        return
    # copy the cluster's current content up, then overlay the piece
    current = bytearray(_read_piece(layers, len(layers) - 1, cluster_size, cluster_offset,
                                    cluster_size))
    within = offset - cluster_offset
    current[within : within + length] = piece
    top.data.pwrite(bytes(current), cluster_offset)
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
