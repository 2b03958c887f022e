"""The control API against its own OpenAPI document (schemathesis): generated requests to every
operation, call sequences along the links schemathesis infers from the document, and the token
on every operation the document lists. Name fields carry a format of their own in the document
(blocktrail-disk-name, -vm-name, -snapshot-name), generated here from the hostile-name
strategies, so the run tries names the pattern lets through and the grammar does not."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import allow_header_conformance, positive_data_acceptance

from apiclient import UvicornPaths
from blocktrail.host.api import create_app
from blocktrail.host.registry import DiskRegistry
from blocktrail.host.schema import DISK_NAME_FORMAT, SNAPSHOT_NAME_FORMAT, VM_NAME_FORMAT
from names_strategies import hostile_names

# Lone surrogates stay out (schemathesis cannot put them into a URL); the API name tests send
# them as JSON escapes.
_NAMES = hostile_names(surrogates=False)
for _format in (DISK_NAME_FORMAT, VM_NAME_FORMAT):
    schemathesis.openapi.format(_format, st.one_of(st.sampled_from(["d0", "vm1", "a.b_c-9"]),
                                                   _NAMES))
schemathesis.openapi.format(SNAPSHOT_NAME_FORMAT, _NAMES)

TOKEN = "schema-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Examples of one operation share the app and its disks on purpose: later calls meet the disks
# earlier ones created.
SHARED_APP = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
              HealthCheck.data_too_large, HealthCheck.filter_too_much]
# Every default check (no 5xx, documented status codes, bodies, content types and headers,
# schema-violating requests refused, 405 with Allow for undocumented methods, the token not
# ignored, ...) except one: a request the document allows may still be refused with 400 (an
# import source that does not exist; a snapshot name the pattern lets through and the grammar
# does not, such as "." or one with a format character: a pattern cannot say "printable").
EXCLUDED = [positive_data_acceptance]
# GET /disks/import is GET /disks/{name} for the disk "import", so its 405 rightly allows GET.
EXCLUDED_FOR = {"POST /disks/import": [allow_header_conformance]}
MAX_EXAMPLES = 40


class CurrentApp:
    """The ASGI app schemathesis calls: it passes each request on to the running test's app, so
    the document is loaded once (each operation a test of its own) while every test has a data
    directory of its own."""

    def __init__(self) -> None:
        self.app: FastAPI | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.app is None:
            raise RuntimeError("no test is running: request the `app` fixture")
        await UvicornPaths(self.app)(scope, receive, send)


CURRENT = CurrentApp()


def _load_schema() -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        CURRENT.app = create_app(DiskRegistry(tmp), TOKEN)
        try:
            return schemathesis.openapi.from_asgi("/openapi.json", CURRENT)
        finally:
            CURRENT.app = None


schema = _load_schema()


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[DiskRegistry]:
    reg = DiskRegistry(str(tmp_path / "data"))
    yield reg
    reg.close()


@pytest.fixture
def app(registry: DiskRegistry) -> Iterator[FastAPI]:
    CURRENT.app = app = create_app(registry, TOKEN)
    yield app
    CURRENT.app = None


def _auth(case: schemathesis.Case[Any]) -> dict[str, str]:
    """The token, unless the case was generated to go without the header (a negative header
    case: adding the token back would make it a valid request that rightly succeeds)."""
    if case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER):
        return {}
    return AUTH


def _validate(case: schemathesis.Case[Any], response: Any, **kwargs: Any) -> None:
    excluded = EXCLUDED + EXCLUDED_FOR.get(case.operation.label, [])
    case.validate_response(response, excluded_checks=excluded, **kwargs)


@schema.parametrize()  # type: ignore[untyped-decorator]
@settings(max_examples=MAX_EXAMPLES, suppress_health_check=SHARED_APP)
def test_operation_conforms(case: schemathesis.Case[Any], app: FastAPI) -> None:
    _validate(case, case.call(headers=_auth(case)), headers=_auth(case))


def test_call_sequences_conform(tmp_path: Path) -> None:
    """Create a disk, then snapshot, query, resize, revert and remove along the links; every
    scenario starts on an empty data directory."""
    scenario = itertools.count()

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            self.registry = DiskRegistry(str(tmp_path / f"scenario-{next(scenario)}"))
            CURRENT.app = create_app(self.registry, TOKEN)

        def teardown(self) -> None:
            CURRENT.app = None
            self.registry.close()

        def get_call_kwargs(self, case: schemathesis.Case[Any]) -> dict[str, Any]:
            return {"headers": _auth(case)}

        def validate_response(self, response: Any, case: schemathesis.Case[Any],
                              additional_checks: Any = None, **kwargs: Any) -> None:
            _validate(case, response, headers=_auth(case), transport_kwargs=kwargs or None,
                      recorder=getattr(self, "recorder", None))

    Workflow.run(settings=settings(max_examples=15, stateful_step_count=8, deadline=None,
                                   suppress_health_check=list(HealthCheck)))


# ---------------------------------------------------------------------------------- the token

def _operations() -> list[tuple[str, str]]:
    paths: dict[str, dict[str, Any]] = schema.raw_schema["paths"]
    return [(method.upper(), path) for path, item in paths.items() for method in item
            if method in ("get", "put", "post", "delete", "patch")]


def _concrete(path: str) -> str:
    return path.replace("{", "").replace("}", "")  # /disks/{name} -> /disks/name


@pytest.mark.parametrize(("method", "path"), _operations(), ids=" ".join)
def test_every_operation_needs_the_token(app: FastAPI, method: str, path: str) -> None:
    client = TestClient(app)
    url = _concrete(path)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}):
        refused = client.request(method, url, headers=headers, json={})
        assert refused.status_code == 401, (headers, refused.text)
        assert refused.json()["error"] == "Unauthorized"
    assert client.request(method, url, headers=AUTH, json={}).status_code != 401


def test_the_document_lists_the_operations() -> None:
    assert ("GET", "/disks/{name}/changed-areas") in _operations()
    assert len(_operations()) >= 15


# ------------------------------------------------------------------------- what the runs found

@pytest.fixture
def client(app: FastAPI) -> TestClient:
    return TestClient(app, headers=AUTH)


def test_invalid_requests_are_typed_400s(client: TestClient) -> None:
    for body in ({}, {"name": "d0"}, {"name": "d0", "size_bytes": -1},
                 {"name": "d0", "size_bytes": (1 << 50) + 1}, {"name": "d0", "size_bytes": False},
                 {"name": "d0", "size_bytes": "1"}, {"name": "d0", "size_bytes": 1.5},
                 {"name": 7, "size_bytes": 1}, {"name": "d0", "size_bytes": 1, "granularity": 3},
                 {"name": "-d0", "size_bytes": 1}, {"name": "d0/x", "size_bytes": 1}):
        response = client.post("/disks", json=body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"] == "InvalidArgument"
        assert response.json()["message"]
    too_big = client.post("/disks", json={"name": "d0", "size_bytes": (1 << 50) + 1})
    assert "size_bytes" in too_big.json()["message"]
    assert client.post("/disks", content=b"{not json",
                       headers={"Content-Type": "application/json"}).status_code == 400


def test_sizes_up_to_2_to_the_50_are_fine(client: TestClient) -> None:
    created = client.post("/disks", json={"name": "big", "size_bytes": 1 << 50,
                                          "granularity": 1 << 30})
    assert created.status_code == 201 and created.json()["size_bytes"] == 1 << 50
    assert client.post("/disks", json={"name": "whole", "size_bytes": 3.0 * (1 << 20)}
                       ).status_code == 201
    for size, status in (((1 << 50) + 1, 400), (-1, 400), (0, 200), (1 << 40, 200)):
        resized = client.post("/disks/big/resize", json={"size_bytes": size})
        assert resized.status_code == status, (size, resized.text)
    # more than 2^32 granules of the disk's granularity
    client.post("/disks", json={"name": "fine", "size_bytes": 0, "granularity": 512})
    refused = client.post("/disks/fine/resize", json={"size_bytes": 1 << 50})
    assert refused.status_code == 400 and refused.json()["error"] == "InvalidArgument"


def test_import_source_must_be_a_regular_file(client: TestClient, tmp_path: Path) -> None:
    image = tmp_path / "image.raw"
    image.write_bytes(b"\1" * 8192)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for source in ("", "image.raw", str(tmp_path / "missing.raw"), str(tmp_path), str(fifo),
                   "/dev/null", f"{tmp_path}/a\0b", "/proc/self/environ", "/dev/zero"):
        response = client.post("/disks/import", json={"name": "d0", "source_path": source})
        assert response.status_code == 400, (source, response.text)
        assert response.json()["error"] == "InvalidArgument"
    assert client.get("/disks").json() == []
    imported = client.post("/disks/import", json={"name": "d0", "source_path": str(image),
                                                  "granularity": 4096})
    assert imported.status_code == 201 and imported.json()["size_bytes"] == 8192


def test_bad_names_are_400s_and_unknown_ones_404s(client: TestClient) -> None:
    client.post("/disks", json={"name": "d0", "size_bytes": 1 << 20})
    assert client.get("/disks/..").status_code in (400, 404)
    assert client.get("/disks/-x").json()["error"] == "InvalidArgument"
    assert client.get("/disks/vms.json").json()["error"] == "DiskNotFound"  # a name like any
    assert client.get("/disks/nope").json()["error"] == "DiskNotFound"
    for name in ("", " padded ", "a/b", "a@b", "x" * 256):
        response = client.post("/disks/d0/snapshots", json={"name": name})
        assert response.status_code == 400, (name, response.text)
    assert client.post("/vms", json={"name": "vm", "disks": []}).status_code == 400
    assert client.post("/vms", json={"name": "vm", "disks": ["d0", "d0"]}).status_code == 400


def test_unknown_paths_and_methods_answer_in_the_error_format(client: TestClient) -> None:
    missing = client.get("/no/such/path")
    assert missing.status_code == 404 and missing.json()["error"] == "NotFound"
    wrong = client.put("/disks")
    assert wrong.status_code == 405 and wrong.json()["error"] == "MethodNotAllowed"
    assert set(wrong.headers["Allow"].split(", ")) >= {"GET", "POST"}
