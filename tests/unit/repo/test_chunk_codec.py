"""What the writer stores for a chunk: random data plain (samples say compressing would not
pay), compressible data zstd, a chunk that is random only in part still zstd; holes named as
zeros; and every envelope, sealed from a view of a bigger read, opens to the same bytes."""

from __future__ import annotations

import os

import pytest

from blocktrail.repo import crypto
from blocktrail.repo.objects import (
    CODEC_PLAIN,
    CODEC_ZSTD,
    KIND_CHUNK,
    Codec,
    EncryptedCodec,
    PlainCodec,
)

CHUNK = 65536
TEXT = (b"the quick brown fox jumps over the lazy dog " * 2000)[:CHUNK]


def _codecs() -> list[Codec]:
    return [PlainCodec(), EncryptedCodec(crypto.MasterKeys.generate(), crypto.AES_GCM)]


@pytest.mark.parametrize("codec", _codecs(), ids=["plain", "encrypted"])
@pytest.mark.parametrize(("data", "expected"), [
    (os.urandom(CHUNK), CODEC_PLAIN),
    (TEXT, CODEC_ZSTD),
    (os.urandom(CHUNK // 2) + bytes(CHUNK // 2), CODEC_ZSTD),  # the middle sample is zeros
    (bytes(CHUNK // 2) + os.urandom(CHUNK // 2), CODEC_ZSTD),  # the first one is
    (os.urandom(100), CODEC_PLAIN),  # too small to sample: tried, did not shrink
], ids=["random", "text", "random-then-zeros", "zeros-then-random", "small"])
def test_codec_of_a_chunk(codec: Codec, data: bytes, expected: int) -> None:
    read = os.urandom(7) + data + os.urandom(9)  # the chunk is a view of a bigger read
    view = memoryview(read)[7 : 7 + len(data)]
    name = codec.name(KIND_CHUNK, view)
    envelope = codec.seal_named(KIND_CHUNK, name, view)
    assert envelope[6] == expected  # the codec byte, in both envelope versions
    assert name == codec.name(KIND_CHUNK, data)
    assert codec.open(bytes(envelope), KIND_CHUNK, name, "chunk") == data


@pytest.mark.parametrize("codec", _codecs(), ids=["plain", "encrypted"])
@pytest.mark.parametrize("data", [os.urandom(CHUNK), TEXT], ids=["stored-plain", "zstd"])
def test_an_envelope_opened_from_a_view_of_a_read_gives_bytes(codec: Codec, data: bytes) -> None:
    """A restore opens each chunk from a view of a ranged read of its pack: what it gets is
    bytes of its own (never a view that would keep the whole read alive in a cache), and a
    damaged envelope in such a view is found as in a copy."""
    name = codec.name(KIND_CHUNK, data)
    envelope = bytes(codec.seal_named(KIND_CHUNK, name, data))
    read = os.urandom(11) + envelope + os.urandom(5)
    view = memoryview(read)[11 : 11 + len(envelope)]
    plain = codec.open(view, KIND_CHUNK, name, "chunk")
    assert type(plain) is bytes and plain == data
    damaged = bytearray(read)
    damaged[11 + len(envelope) - 20] ^= 1
    with pytest.raises(Exception, match="chunk"):
        codec.open(memoryview(bytes(damaged))[11 : 11 + len(envelope)], KIND_CHUNK, name,
                   "chunk")
