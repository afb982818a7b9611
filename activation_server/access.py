"""Who may talk to the server (docs/api.md, "Access"): the Host check and the access token.

- **Host check** (against DNS rebinding: a web page whose domain name is made to resolve to
  127.0.0.1 would otherwise reach a server bound to loopback as if it were its own origin). On by
  default when bound to loopback: only loopback names (127.x.x.x, localhost, [::1], any port) and
  the names given with `--allowed-host` are answered; any other Host gets a 400 naming it. On a
  server bound beyond loopback it is off unless `--allowed-host` names hosts, since its users
  reach it by whatever name or address the machine has.
- **Access token** (`--auth-token` / TDB_AUTH_TOKEN): every API request must carry
  `Authorization: Bearer TOKEN` (401 otherwise). Public without it: GET/HEAD of what is no API
  endpoint (the UI's files, /docs, /redoc, their assets, /openapi.json: pages and code, no data)
  and GET /health (liveness probes carry no secret; it tells whether a model is loaded and what
  the worker runs and holds: endpoints, request ids and timings, never a prompt, a result or a
  dataset). Anything else, a request to a path that does not exist included, needs the token:
  endpoints added later are protected by default.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from activation_server.errors import error_response

TOKEN_ENV = "TDB_AUTH_TOKEN"
PUBLIC_ENDPOINTS = frozenset({"/health"})


def is_loopback(host: str) -> bool:
    """Whether a bind address or Host name is this machine only: localhost, 127.0.0.0/8, ::1."""
    host = host.strip().lower().removeprefix("[").removesuffix("]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind_host: str, extra: Sequence[str]) -> list[str] | None:
    """The Host names a server bound to `bind_host` answers besides loopback ones; None: any.
    Loopback binding checks Host always; other binding only when names were given."""
    if "*" in extra:
        return None
    if is_loopback(bind_host) or extra:
        return [name.strip().lower() for name in extra]
    return None


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port: "localhost:8000" -> "localhost",
    "[::1]:8000" -> "[::1]"."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[: host.index("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(name: str, allowed: Sequence[str]) -> bool:
    if is_loopback(name):
        return True
    return any(
        name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:]))
        for pattern in allowed
    )


class AccessMiddleware:
    """The Host check and the access token, before any endpoint reads the request. Sits inside
    the request-id middleware, so its refusals carry a request id, and inside CORS, so a page on
    an allowed origin can read them."""

    def __init__(
        self, app: ASGIApp, allowed_hosts: Sequence[str] | None, auth_token: str | None
    ) -> None:
        self.app = app
        self.allowed_hosts = None if allowed_hosts is None else list(allowed_hosts)
        self.token = auth_token.encode() if auth_token else None
        self._api_paths: list[re.Pattern[str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        refusal = self._host_refusal(headers.get("host", b"").decode("latin-1"))
        if refusal is None and self.token is not None and self._needs_token(scope):
            refusal = self._token_refusal(headers.get("authorization", b""))
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, message, extra_headers = refusal
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
            return
        rid = str(scope.get("state", {}).get("request_id", ""))
        detail = {"field": "Host", "kind": "invalid"} if status == 400 else None
        await error_response(status, message, rid, detail, extra_headers)(scope, receive, send)

    def _host_refusal(self, host_header: str) -> tuple[int, str, dict[str, str]] | None:
        if self.allowed_hosts is None:
            return None
        name = host_name(host_header)
        if name and host_allowed(name, self.allowed_hosts):
            return None
        configured = "".join(f", {h}" for h in self.allowed_hosts)
        return (
            400,
            f"Host {host_header!r} is not allowed: this server answers only requests addressed "
            f"to 127.0.0.1, localhost, [::1]{configured} (any port), which protects it from "
            "DNS rebinding; start it with --allowed-host NAME to accept another name",
            {},
        )

    def _needs_token(self, scope: Scope) -> bool:
        if scope["type"] == "websocket" or scope["method"] not in ("GET", "HEAD"):
            return True
        if scope["path"] in PUBLIC_ENDPOINTS:
            return False
        # A GET is public unless it is an API endpoint (a path of the OpenAPI document): UI
        # files, docs. The document is built at the first request, once every route is added.
        if self._api_paths is None:
            app = scope["app"]
            self._api_paths = [compile_path(path)[0] for path in app.openapi()["paths"]]
        return any(pattern.match(scope["path"]) for pattern in self._api_paths)

    def _token_refusal(self, authorization: bytes) -> tuple[int, str, dict[str, str]] | None:
        assert self.token is not None
        scheme, _, given = authorization.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token):
            return None
        how = (
            "send the header `Authorization: Bearer TOKEN` with the token the server was "
            f"started with (--auth-token or {TOKEN_ENV}); in the UI, open it once with "
            "?access_token=TOKEN added to its address"
        )
        message = (
            f"wrong access token: {how}"
            if authorization
            else f"this server requires an access token: {how}"
        )
        return 401, message, {"www-authenticate": "Bearer"}


def declare_bearer_auth(app: FastAPI) -> None:
    """Says in the OpenAPI document that endpoints need the token (all but the public ones), so
    /docs shows an "Authorize" button and its "Try it out" sends the token."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()  # FastAPI's, cached after the first call; the edits below are idempotent
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes["accessToken"] = {
            "type": "http",
            "scheme": "bearer",
            "description": f"the server's --auth-token (or {TOKEN_ENV})",
        }
        schema["security"] = [{"accessToken": []}]
        for path in PUBLIC_ENDPOINTS:
            for operation in schema.get("paths", {}).get(path, {}).values():
                operation["security"] = []
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
