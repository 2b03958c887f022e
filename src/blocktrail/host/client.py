"""A client of the host's control API, for the CLI's --host and the backup engine.

Every answer becomes the decoded JSON body or a typed error: the error the host named, or, for
an answer that is not the API's (not JSON, an unknown error, a proxy's page), `HostAnswerError`
with the status and a short excerpt. Path segments are percent-encoded here (`api_path`), so a
name is always one segment, whatever it holds.
"""

from __future__ import annotations

import os
from typing import Any

import httpx

from blocktrail import errors
from blocktrail.host.endpoint import TOKEN_FILE, Endpoint

_ERRORS: dict[str, type[errors.BlocktrailError]] = {
    cls.__name__: cls for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, errors.BlocktrailError)}
# An error body the client does not know by name: what its status says.
_BY_STATUS: dict[int, type[errors.BlocktrailError]] = {
    400: errors.InvalidArgument, 401: errors.Unauthorized, 403: errors.Unauthorized,
    416: errors.OutOfRange, 422: errors.InvalidArgument, 507: errors.NoSpace}
EXCERPT = 200


class HostAnswerError(errors.BlocktrailError):
    """The host answered something that is not its API's answer (or an error it did not
    name): another server at that address, a proxy, a version mismatch, a bug."""

    exit_code = errors.ExitCode.UNREACHABLE


class HostClient:
    def __init__(self, endpoint: str, token: str | None = None) -> None:
        self.endpoint = Endpoint.parse(endpoint)
        if self.endpoint.unix_path is not None:
            transport = httpx.HTTPTransport(uds=self.endpoint.unix_path)
            base = "http://blocktrail"
        else:
            transport = httpx.HTTPTransport()
            host = self.endpoint.host or ""
            base = f"http://[{host}]:{self.endpoint.port}" if ":" in host else \
                f"http://{host}:{self.endpoint.port}"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            self._http = httpx.Client(transport=transport, base_url=base, headers=headers,
                                      timeout=600)
        except (httpx.InvalidURL, ValueError) as exc:
            raise errors.InvalidArgument(f"invalid host {endpoint!r} or token: {exc}") from None

    @classmethod
    def from_env(cls, endpoint: str, data_dir: str | None = None) -> HostClient:
        token = os.environ.get("BLOCKTRAIL_TOKEN")
        path = os.path.join(data_dir, TOKEN_FILE) if data_dir else None
        if token is None and path and os.path.isfile(path):
            try:
                with open(path) as f:
                    token = f.read().strip()
            except (OSError, ValueError) as exc:
                raise errors.Unauthorized(f"cannot read the API token {path}: {exc}") from None
        return cls(endpoint, token)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The decoded JSON answer, or the typed error the host answered with."""
        what = f"{method} {path}"
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise errors.HostUnreachable(f"cannot reach the host at {self.endpoint}: "
                                         f"{exc or type(exc).__name__}") from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise HostAnswerError(f"{what} to the host at {self.endpoint} failed: "
                                  f"{exc or type(exc).__name__}") from exc
        except (UnicodeEncodeError, TypeError, ValueError) as exc:  # what cannot be sent
            raise errors.InvalidArgument(f"{what} cannot be sent to the host: {exc}") from None
        try:
            body = response.json()
        except ValueError:
            raise self._unexpected(what, response, "not JSON") from None
        if response.is_success:
            return body
        if not (isinstance(body, dict) and isinstance(body.get("error"), str)
                and isinstance(body.get("message"), str)):
            raise self._unexpected(what, response, "not an error body")
        kind = _ERRORS.get(body["error"]) or _BY_STATUS.get(response.status_code)
        if kind is None or kind is errors.BlocktrailError:
            raise HostAnswerError(f"the host answered {what} with HTTP {response.status_code} "
                                  f"{body['error']}: {body['message']}")
        raise kind(body["message"])

    def _unexpected(self, what: str, response: httpx.Response, why: str) -> HostAnswerError:
        text = response.content[:EXCERPT].decode("utf-8", "replace")
        excerpt = text.encode("ascii", "backslashreplace").decode()
        return HostAnswerError(
            f"the host at {self.endpoint} answered {what} with HTTP {response.status_code} "
            f"and a body that is {why} (is it a blocktrail host?): {excerpt!r}")

    def close(self) -> None:
        self._http.close()
