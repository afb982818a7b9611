"""The request-body limit (`--max-body-bytes`, docs/api.md "Limits"): a body over it is a 413 before
anything parses it, and is never held in memory whole.

A declared `Content-Length` over the limit is refused at once, unread. A body without one (chunked)
is counted while it streams in and refused once it passes the limit: what the client still sends,
up to the limit again, is read and dropped first, so that a client that sends its whole body before
reading the answer (most do) gets the 413 rather than a connection reset in mid-send (the answer
lost with it); a longer one gets the 413 as the connection closes. Memory stays one chunk. A body
within the limit is read here and handed on in one piece; endpoints would have read it whole anyway
to parse it.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from activation_server.errors import error_response

DEFAULT_MAX_BODY_BYTES = 10 * 2**20  # the largest real request (64 prompts of 8k tokens) is ~3 MB


class BodyLimitMiddleware:
    """Answers 413 with the error contract's body (`detail: {field: "body", kind: "too_large"}`)
    to a request whose body is over `max_bytes`. Sits inside the request-id middleware, so the
    refusal carries a request id."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send, f"{declared:,} bytes")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                if message.get("more_body", False):
                    await _drop_rest(receive, self.max_bytes)
                await self._refuse(scope, receive, send, f"more than {self.max_bytes:,} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, whenever it comes

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: str) -> None:
        rid = str(scope.get("state", {}).get("request_id", ""))
        message = (
            f"body: the request body ({size}) is over the limit of {self.max_bytes:,} bytes "
            "(the server's --max-body-bytes)"
        )
        response = error_response(413, message, rid, {"field": "body", "kind": "too_large"})
        # The unread rest of the body is not wanted: close the connection after the answer.
        response.headers["connection"] = "close"
        await response(scope, receive, send)


async def _drop_rest(receive: Receive, up_to: int) -> None:
    """Read and drop the rest of a body, at most `up_to` bytes of it."""
    dropped = 0
    while dropped <= up_to:
        message = await receive()
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
