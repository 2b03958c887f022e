"""A client of the host's control API, for the CLI's --host and the backup engine."""

from __future__ import annotations

import os
from typing import Any

import httpx

from blocktrail import errors
from blocktrail.host.daemon import TOKEN_FILE, Endpoint

_ERRORS: dict[str, type[errors.BlocktrailError]] = {
    cls.__name__: cls for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.BlocktrailError)}


class HostClient:
    def __init__(self, endpoint: str, token: str | None = None) -> None:
        self.endpoint = Endpoint.parse(endpoint)
        if self.endpoint.unix_path is not None:
            transport = httpx.HTTPTransport(uds=self.endpoint.unix_path)
            base = "http://blocktrail"
        else:
            transport = httpx.HTTPTransport()
            base = f"http://{self.endpoint.host}:{self.endpoint.port}"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(transport=transport, base_url=base, headers=headers,
                                  timeout=600)

    @classmethod
    def from_env(cls, endpoint: str, data_dir: str | None = None) -> HostClient:
        token = os.environ.get("BLOCKTRAIL_TOKEN")
        if token is None and data_dir and os.path.exists(os.path.join(data_dir, TOKEN_FILE)):
            with open(os.path.join(data_dir, TOKEN_FILE)) as f:
                token = f.read().strip()
        return cls(endpoint, token)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise errors.HostUnreachable(
                f"cannot reach the host at {self.endpoint}: {exc}") from exc
        body = response.json()
        if response.is_success:
            return body
        kind = _ERRORS.get(str(body.get("error")), errors.BlocktrailError) \
            if isinstance(body, dict) else errors.BlocktrailError
        message = body.get("message", str(body)) if isinstance(body, dict) else str(body)
        raise kind(message)

    def close(self) -> None:
        self._http.close()
