"""Names that look like trouble, from the CLI through the API and the disk to the NBD export name
that nbdinfo and our client read: each arrives unchanged. ``d0@`` (an empty snapshot part) is no
export for either of them, never the live disk."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from blocktrail.cli.main import main
from blocktrail.nbd.blocking import BlockingNbdClient
from blocktrail.nbd.proto.errors import NegotiationRefused
from blocktrail.nbd.uri import NbdEndpoint, NbdUri
from hostproc import cli_in_process, require_tools, running_host
from names_strategies import TRICKY_VALID

pytestmark = pytest.mark.interop


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    require_tools("nbdinfo")
    with running_host(tmp_path) as endpoints:
        yield endpoints


def nbdinfo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nbdinfo", *args], capture_output=True, text=True, timeout=60)


def uri(nbd: Path, export: str) -> str:
    return f"nbd+unix:///{quote(export, safe='')}?socket={nbd}"


def test_tricky_names_reach_the_export_name_unchanged(host: tuple[str, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    api, nbd = host
    cli_in_process(capsys, "disk", "create", "d0", "--size", "1M", "--host", api)
    for name in TRICKY_VALID:  # "--": a name may begin with "-"
        assert main(["snapshot", "create", "--host", api, "--json", "--", "d0", name]) == 0
        assert json.loads(capsys.readouterr().out)["name"] == name
    listed = nbdinfo("--list", "--json", uri(nbd, ""))
    assert listed.returncode == 0, listed.stderr
    exports = [e["export-name"] for e in json.loads(listed.stdout)["exports"]]
    assert sorted(exports) == sorted(["d0", *(f"d0@{name}" for name in TRICKY_VALID)])
    for name in TRICKY_VALID:
        export = f"d0@{name}"
        info = nbdinfo("--json", uri(nbd, export))
        assert info.returncode == 0, (name, info.stderr)
        (answer,) = json.loads(info.stdout)["exports"]
        assert answer["export-name"] == export and answer["is_read_only"]
        with BlockingNbdClient.connect(NbdUri(NbdEndpoint(unix_path=str(nbd)),
                                              export)) as client:
            assert client.is_read_only() and client.size_bytes == 1 << 20


def test_an_empty_snapshot_part_is_no_export(host: tuple[str, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    api, nbd = host
    cli_in_process(capsys, "disk", "create", "d0", "--size", "1M", "--host", api)
    cli_in_process(capsys, "snapshot", "create", "d0", "s1", "--host", api)
    for export in ("d0@", "d0@@", "@s1", "d0@.."):
        refused = nbdinfo(uri(nbd, export))
        assert refused.returncode != 0 and "export" in refused.stderr, (export, refused.stderr)
        with pytest.raises(NegotiationRefused, match="no such export"):
            BlockingNbdClient.connect(NbdUri(NbdEndpoint(unix_path=str(nbd)), export),
                                      timeout=10)
    assert nbdinfo("--json", uri(nbd, "d0@s1")).returncode == 0
