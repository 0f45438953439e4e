"""Who may talk to ``msfm view``: loopback binding by default, a token (as Jupyter does) for any other host.

The token travels as ``?token=T`` or ``Authorization: Bearer T``; a request that proves it once also receives an
HttpOnly, SameSite=Strict cookie so that the page's own ``<script>``/``<img>`` requests (which cannot add a header)
are accepted too. Tokens are compared with :func:`hmac.compare_digest` (no timing leak).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import secrets
from typing import Any

from msfm.errors import MsfmInputError

__all__ = ["COOKIE_NAME", "TokenMiddleware", "check_bind", "is_loopback", "new_token"]

#: Cookie set after a request that carried the right token (scoped to the server's host, HttpOnly).
COOKIE_NAME = "msfm_view_token"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); False for anything else, names included."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    """A fresh random token (32 bytes, URL-safe)."""
    return secrets.token_urlsafe(32)


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve on a non-loopback ``host`` without a token.

    Raises:
        MsfmInputError: ``host`` is not loopback and ``token`` is empty.
    """
    if not is_loopback(host) and not token:
        msg = (
            f"--host {host} exposes the viewer beyond this machine, so it needs a token; got none. Leave --token "
            "unset to have one generated (it is printed in the URL), pass --token T, or bind --host 127.0.0.1."
        )
        raise MsfmInputError(msg)


def _token_from(scope: dict[str, Any]) -> str | None:
    """The token a request carries: query ``token``, bearer header or the cookie (first found)."""
    from urllib.parse import parse_qs

    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if query.get("token"):
        return query["token"][0]
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE_NAME:
            return value
    return None


class TokenMiddleware:
    """ASGI middleware: 401 (JSON) unless the request carries ``token``; sets the cookie on success."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self._token = token.encode("utf-8")

    def _ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode("utf-8"), self._token)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if not self._ok(_token_from(scope)):
            body = json.dumps(
                {
                    "error": "This viewer needs its token: open the URL it printed (with ?token=...), or send "
                    "'Authorization: Bearer <token>'.",
                }
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        cookie = f"{COOKIE_NAME}={self._token.decode()}; HttpOnly; SameSite=Strict; Path=/".encode()

        async def send_with_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)
