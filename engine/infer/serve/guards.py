"""What keeps slow or hostile clients from holding the server: read timeouts, a connection cap, body checks.

Two layers, because uvicorn calls the app only once a request's headers are complete:
  * `http_protocol(header_timeout_s)`: uvicorn's h11 protocol, plus a deadline for the request line and
    headers (from the connection's start, or from the previous response on a kept-alive connection);
    a connection still without complete headers then is closed. uvicorn itself has no such timeout.
  * `RequestGuard`, ASGI middleware in front of every route: the whole body must arrive within
    body_timeout_s (else 408 and the connection closes), may not exceed max_body_bytes (413), must be
    JSON (415 for another Content-Type; none at all is read as JSON), and at most max_requests requests
    other than /health run at once (503 beyond).

How /health stays reachable: `server_config` sets uvicorn's own hard cap (limit_concurrency) to
max_requests + HEALTH_RESERVE connections, so when API requests fill their cap, /health still has
HEALTH_RESERVE connections of its own. Connections that never finish their headers do count against
the hard cap; the header timeout frees them.
"""
from __future__ import annotations

import asyncio
import logging

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.infer.serve.schemas import APIError

log = logging.getLogger("engine.infer.serve")

HEALTH_RESERVE = 8  # connections beyond the API cap that only /health (and uvicorn's 503s) can use
UNCAPPED_PATHS = ("/health",)
CLOSE = {"Connection": "close"}  # the body was not read to its end: the connection cannot serve another request


def _is_json(content_type: bytes) -> bool:
    media = content_type.split(b";")[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class RequestGuard:
    """ASGI middleware: body deadline, size and Content-Type checks, and a cap on concurrent API requests."""

    def __init__(self, app, max_body_bytes: int, body_timeout_s: float, max_requests: int):
        self.app, self.max_body_bytes, self.body_timeout_s = app, max_body_bytes, body_timeout_s
        self.max_requests, self.active = max_requests, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        capped = scope["path"] not in UNCAPPED_PATHS
        if capped and self.active >= self.max_requests:
            return await self._reply(scope, receive, send, APIError(
                503, f"server busy: {self.active} requests are in progress (limit {self.max_requests}); try again "
                "later", type="server_error", code="server_busy"))
        headers = dict(scope["headers"])
        if scope["method"] == "POST":
            content_type = headers.get(b"content-type")
            if content_type is None:  # curl --data-binary, raw sockets: read the body as the JSON it must be
                scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
            elif not _is_json(content_type):
                return await self._reply(scope, receive, send, APIError(
                    415, f"Content-Type: expected application/json, got {content_type.decode('latin-1')!r}",
                    code="unsupported_media_type"))
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await self._reply(scope, receive, send, APIError(413, self._too_large(), code="request_too_large"))
        if capped:
            self.active += 1
        try:
            await self.app(scope, self._guarded(receive), send)
        finally:
            if capped:
                self.active -= 1

    def _guarded(self, receive):
        """`receive`, with the whole body due by the deadline and cut off at max_body_bytes."""
        loop = asyncio.get_running_loop()
        deadline, seen, body_done = loop.time() + self.body_timeout_s, 0, False

        async def guarded_receive():
            nonlocal seen, body_done
            if body_done:  # after the body, receive() waits for a disconnect: no deadline then
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                log.info("closing a connection whose request body did not arrive within %g s", self.body_timeout_s)
                # FastAPI re-raises a Starlette HTTPException from the body read as is; app.py answers it.
                raise StarletteHTTPException(408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                                             headers=CLOSE) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:  # chunked bodies carry no content-length
                    raise StarletteHTTPException(413, self._too_large(), headers=CLOSE)
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        return guarded_receive

    def _too_large(self) -> str:
        return f"request body is larger than this server's limit of {self.max_body_bytes} bytes"

    @staticmethod
    async def _reply(scope, receive, send, error: APIError):
        await JSONResponse(error.body(), status_code=error.status, headers=CLOSE)(scope, receive, send)


def http_protocol(header_timeout_s: float):
    """uvicorn's h11 protocol class, closing connections whose request line + headers take over header_timeout_s."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        _header_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are complete (or the request failed)
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()  # the next request on this kept-alive connection gets its own deadline

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self):
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self):
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("closing a connection that sent no complete request headers within %g s", header_timeout_s)
                self.transport.close()

    return HeaderTimeoutH11


def server_config(app, host: str = "127.0.0.1", port: int = 8000, **uvicorn_kwargs):
    """uvicorn.Config for an app from engine.infer.serve.app.create_app, with its header timeout and connection cap."""
    import uvicorn

    limits = app.state.limits
    return uvicorn.Config(app, host=host, port=port, http=http_protocol(limits.header_timeout_s),
                          limit_concurrency=limits.max_connections + HEALTH_RESERVE, **uvicorn_kwargs)
