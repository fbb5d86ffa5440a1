"""What guards the server, outermost first: every request's latency and outcome in the metrics; the Host
header while it listens on loopback (DNS rebinding); the API key; the body size limit. Pure ASGI (not
Starlette's BaseHTTPMiddleware), so streamed responses pass through untouched and a client's disconnect
still reaches the endpoint. Below HTTP, `HeaderTimeout` closes a connection whose request head does not
arrive in time (a client sending a byte a second held a connection forever)."""

import hmac
import time
from typing import Iterable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import error_body

__all__ = ["Observed", "AllowedHosts", "RequireApiKey", "BodyLimit", "HeaderTimeout", "ENDPOINTS", "LOOPBACK_HOSTS"]

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")

ENDPOINTS = ("/", "/favicon.ico", "/health", "/ready", "/metrics", "/v1/models", "/v1/completions", "/fill", "/score")
# Paths that need no key: liveness (a balancer's probe), and the page, a static file a browser loads
# without headers (every call it makes sends the key typed into it).
OPEN_PATHS = ("/health", "/", "/favicon.ico")


async def _respond(send, status: int, body: bytes, headers=()):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *headers]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    return {401: "unauthorized", 499: "disconnected", 503: "overloaded", 504: "timeout"}.get(
        status, "bad_request" if status < 500 else "error"
    )


class Observed:
    """Request latency (to the last byte, for a stream too) and outcome by endpoint. An endpoint that
    fails inside a stream already answered 200 sets scope["state"]["outcome"]."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), [500]
        scope.setdefault("state", {})

        async def observed_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            outcome = scope["state"].get("outcome") or _outcome(status[0])
            self.metrics.requests.labels(endpoint, outcome).inc()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - started)


def host_name(header: bytes) -> str:
    """The name in a Host header, without its port (`[::1]:8000` -> `::1`)."""
    text = header.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class AllowedHosts:
    """While the server listens on a loopback address, a request must name it as its Host (localhost,
    127.0.0.1, [::1], or one of `extra`): a page of another site could otherwise reach a key-less server on
    this machine through DNS rebinding (its own name resolving to 127.0.0.1)."""

    def __init__(self, app, extra: Iterable[str] = ()):
        self.app, self.allowed = app, set(LOOPBACK_HOSTS) | {host.lower().strip("[]") for host in extra}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = host_name(dict(scope["headers"]).get(b"host", b""))
            if host not in self.allowed:
                message = f"Host: {host or '(none)'} is not this server's (--allowed_hosts adds names)"
                return await _respond(send, 400, error_body(message, param="Host"))
        await self.app(scope, receive, send)


class RequireApiKey:
    """`Authorization: Bearer KEY` on every path but OPEN_PATHS (the scheme in any case, RFC 7235; the key
    compared in constant time)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            scheme, _, key = dict(scope["headers"]).get(b"authorization", b"").strip().partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self.expected):
                message = "Authorization: this server needs 'Authorization: Bearer <its API key>'"
                return await _respond(send, 401, error_body(message, "authentication_error"),
                                      [(b"www-authenticate", b"Bearer")])  # fmt: skip
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuses a body over `limit` bytes with 413 and a JSON one-line error, by its Content-Length or, when
    chunked, as it arrives (read here and replayed to the app: bodies are small JSON). Starlette's own limit
    answers a declared oversize length in plain text, whatever the app's error handler says."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        too_large = error_body(f"body: larger than the server's limit of {self.limit} bytes", param="body")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _respond(send, 413, too_large)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _respond(send, 413, too_large)
            more = message.get("more_body", False)
        replayed = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return replayed.pop() if replayed else await receive()

        await self.app(scope, replay, send)


class HeaderTimeout(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request head (request line and headers) has
    not arrived `seconds` after the connection opened or its previous response ended. uvicorn arms no timer
    before a request head, and its keep-alive timer is reset by every byte."""

    seconds = 10.0

    def connection_made(self, transport):
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.seconds, self._head_late)

    def on_response_complete(self):
        super().on_response_complete()
        self._head_timer.cancel()
        if not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.seconds, self._head_late)

    def connection_lost(self, exc):
        self._head_timer.cancel()
        super().connection_lost(exc)

    def _head_late(self):
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # no request head yet
            self.transport.close()
