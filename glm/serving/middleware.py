"""ASGI middleware of the server, outermost first: every request's latency and outcome in the metrics; the
API key; the body size limit. Pure ASGI (not Starlette's BaseHTTPMiddleware), so streamed responses pass
through untouched and a client's disconnect still reaches the endpoint."""

import hmac
import time

from .protocol import error_body

__all__ = ["Observed", "RequireApiKey", "BodyLimit", "ENDPOINTS"]

ENDPOINTS = ("/", "/health", "/ready", "/metrics", "/v1/models", "/v1/completions", "/fill", "/score")
# Paths that need no key: liveness (a balancer's probe), and the page, a static file a browser loads
# without headers (every call it makes sends the key typed into it).
OPEN_PATHS = ("/health", "/")


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


class RequireApiKey:
    """`Authorization: Bearer KEY` on every path but OPEN_PATHS (compared in constant time)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
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
