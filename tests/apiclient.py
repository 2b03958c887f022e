"""A TestClient for the control API that sees paths as the real server does.

Starlette's TestClient decodes the request path twice (httpx's ``url.path`` is decoded already,
and it unquotes that again), so ``/snapshots/a%2520b`` would reach the app as ``a b``. uvicorn
decodes once, from the raw path; `UvicornPaths` puts that back in front of the app.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from fastapi.testclient import TestClient


class UvicornPaths:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("raw_path") is not None:
            scope = dict(scope, path=unquote(scope["raw_path"].decode("ascii")))
        await self.app(scope, receive, send)


def api_client(app: Any, **kwargs: Any) -> TestClient:
    return TestClient(UvicornPaths(app), **kwargs)
