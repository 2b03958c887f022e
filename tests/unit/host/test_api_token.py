"""DATA/api-token: written whole or not at all, and never taken as the empty token."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from blocktrail.errors import CorruptMetadata, InvalidArgument, NoSpace
from blocktrail.fileio import OsFileHandle
from blocktrail.host.api import create_app
from blocktrail.host.daemon import TOKEN_FILE, load_or_create_token
from blocktrail.host.registry import DiskRegistry


def test_token_is_generated_once(tmp_path: Path) -> None:
    token = load_or_create_token(str(tmp_path))
    path = tmp_path / TOKEN_FILE
    assert len(token) >= 32 and path.read_text() == token + "\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == [TOKEN_FILE]
    assert load_or_create_token(str(tmp_path)) == token


@pytest.mark.parametrize("content", [b"", b"\n", b"  \n\t", b"two words\n", b"a\nb\n",
                                     b"tok\xc3\xa9n\n", b"nul\x00\n"])
def test_empty_or_malformed_token_file_is_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / TOKEN_FILE).write_bytes(content)
    with pytest.raises(CorruptMetadata, match="delete it"):
        load_or_create_token(str(tmp_path))
    assert (tmp_path / TOKEN_FILE).read_bytes() == content  # nothing changed


def test_full_file_system_leaves_no_token_file(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(self: OsFileHandle, data: bytes, offset: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(OsFileHandle, "pwrite", no_space)
    with pytest.raises(NoSpace):
        load_or_create_token(str(tmp_path))
    assert os.listdir(tmp_path) == []  # neither an empty token file nor a temp file
    monkeypatch.undo()
    assert load_or_create_token(str(tmp_path))


@pytest.mark.parametrize("token", ["", " ", "\n"])
def test_app_refuses_an_empty_token(tmp_path: Path, token: str) -> None:
    registry = DiskRegistry(str(tmp_path / "data"))
    try:
        with pytest.raises(InvalidArgument):
            create_app(registry, token)
    finally:
        registry.close()
