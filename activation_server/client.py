"""A small client for scripts: `AsyncClient` (aiohttp) and `Client`, its synchronous wrapper.

    from activation_server.client import Client

    with Client("http://127.0.0.1:8000") as tdb:
        result = tdb.batched_tdb(
            [{"prompt": "The capital of France is", "targetTokens": [" Paris"],
              "distractorTokens": [" London"]}]
        )
        for row in result.sub_responses[0].node_table[:5]:
            print(row.node, row.direct_effect)

Requests are plain dicts (camelCase or snake_case keys) or the schema objects of
`activation_server.schemas`; responses are those schema objects. A non-2xx answer raises
`ApiError` carrying the server's message, status and request id.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
import orjson
from pydantic import BaseModel

from activation_server import schemas as s

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


class ApiError(Exception):
    def __init__(self, status: int, message: str, request_id: str | None, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.request_id = request_id
        self.detail = detail


def _body(value: BaseModel | dict[str, Any]) -> bytes:
    if isinstance(value, BaseModel):
        return orjson.dumps(value.model_dump(mode="json", by_alias=True, exclude_none=True))
    return orjson.dumps(value)


class AsyncClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout_s: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self, method: str, path: str, model: type[M], body: BaseModel | dict[str, Any] | None
    ) -> M:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        data = _body(body) if body is not None else None
        headers = {"content-type": "application/json"} if data is not None else {}
        async with self._session.request(
            method, self.base_url + path, data=data, headers=headers
        ) as resp:
            raw = await resp.read()
            if resp.status >= 400:
                try:
                    err = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    err = {"message": raw.decode(errors="replace")}
                raise ApiError(
                    resp.status, str(err.get("message")), err.get("requestId"), err.get("detail")
                )
            return model.model_validate_json(raw)

    async def health(self) -> s.HealthResponse:
        return await self._request("GET", "/health", s.HealthResponse, None)

    async def model_info(self) -> s.ModelInfo:
        return await self._request("GET", "/model_info", s.ModelInfo, None)

    async def batched_tdb(
        self, sub_requests: Sequence[s.TdbSubRequest | dict[str, Any]]
    ) -> s.BatchedTdbResponse:
        items = [
            r.model_dump(mode="json", by_alias=True, exclude_none=True)
            if isinstance(r, BaseModel)
            else r
            for r in sub_requests
        ]
        return await self._request(
            "POST", "/batched_tdb", s.BatchedTdbResponse, {"subRequests": items}
        )

    async def batched(self, request: s.BatchedRequest | dict[str, Any]) -> s.BatchedResponse:
        return await self._request("POST", "/batched", s.BatchedResponse, request)

    async def derived_scalars(
        self, request: s.DerivedScalarsRequest | dict[str, Any]
    ) -> s.DerivedScalarsResponse:
        return await self._request("POST", "/derived_scalars", s.DerivedScalarsResponse, request)

    async def derived_attention_scalars(
        self, request: s.DerivedAttentionScalarsRequest | dict[str, Any]
    ) -> s.DerivedAttentionScalarsResponse:
        return await self._request(
            "POST", "/derived_attention_scalars", s.DerivedAttentionScalarsResponse, request
        )

    async def tokenize(self, text: str, prepend_bos: bool | None = None) -> s.TokenizeResponse:
        return await self._request(
            "POST", "/tokenize", s.TokenizeResponse, {"text": text, "prependBos": prepend_bos}
        )

    async def generate(self, request: s.GenerateRequest | dict[str, Any]) -> s.GenerateResponse:
        return await self._request("POST", "/generate", s.GenerateResponse, request)


class Client:
    """Synchronous wrapper: the async client runs on a private event loop thread, so it also
    works inside programs (notebooks) that already run an event loop."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout_s: float = 600.0) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._async = AsyncClient(base_url, timeout_s)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def health(self) -> s.HealthResponse:
        return self._run(self._async.health())

    def model_info(self) -> s.ModelInfo:
        return self._run(self._async.model_info())

    def batched_tdb(
        self, sub_requests: Sequence[s.TdbSubRequest | dict[str, Any]]
    ) -> s.BatchedTdbResponse:
        return self._run(self._async.batched_tdb(sub_requests))

    def batched(self, request: s.BatchedRequest | dict[str, Any]) -> s.BatchedResponse:
        return self._run(self._async.batched(request))

    def derived_scalars(
        self, request: s.DerivedScalarsRequest | dict[str, Any]
    ) -> s.DerivedScalarsResponse:
        return self._run(self._async.derived_scalars(request))

    def derived_attention_scalars(
        self, request: s.DerivedAttentionScalarsRequest | dict[str, Any]
    ) -> s.DerivedAttentionScalarsResponse:
        return self._run(self._async.derived_attention_scalars(request))

    def tokenize(self, text: str, prepend_bos: bool | None = None) -> s.TokenizeResponse:
        return self._run(self._async.tokenize(text, prepend_bos))

    def generate(self, request: s.GenerateRequest | dict[str, Any]) -> s.GenerateResponse:
        return self._run(self._async.generate(request))
