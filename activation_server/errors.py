"""The error contract (docs/api.md): every error is JSON `{message, detail, requestId}`.

- invalid input: 4xx with a message naming the field and `detail.field` the same path (422 for
  schema violations and malformed JSON; 400 for values the library rejects, 413 for what is over
  a limit: the library's `RequestError` says which with its `kind`, and names the field by a path
  in its own terms, which `wire_field` maps to this endpoint's field names);
- inference without a model: 503 saying how to start one;
- anything unexpected: 500 with a generic message; the traceback goes to the server log under the
  request id the response carries, never to the client.

The request-id middleware sits inside the CORS middleware, so error responses carry the same CORS
headers as successful ones and the UI can show the server's message.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError, ResponseValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from pydantic.alias_generators import to_camel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from activation_server.schemas import ErrorResponse
from activation_server.worker import ClientGone, RequestTimedOut
from neuron_explainer.activations import FieldPath, RequestError
from neuron_explainer.activations.limits import LimitError
from neuron_explainer.models.cancellation import Cancelled

log = logging.getLogger("activation_server")
REQUEST_ID_HEADER = "x-request-id"


class NoModelError(Exception):
    """An inference endpoint was called on a server started without a model."""


class NotFoundError(LookupError):
    """A dataset, component or record that does not exist (404)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


_SEE_LOG = "the server log has the details under request id {rid}"
NO_MODEL_MESSAGE = (
    "this server was started without a model (--no-model); inference endpoints need one: "
    "start it with `tdb serve --model smollm2-135m` (or a Hugging Face folder / .gguf path)"
)


def error_response(
    status: int,
    message: str,
    request_id: str,
    detail: Any = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = {"message": message, "detail": detail, "requestId": request_id}
    return Response(
        orjson.dumps(body), status_code=status, media_type="application/json", headers=headers
    )


def request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or "")


# Library field names whose wire names are not just their camelCase.
WIRE_NAMES = {
    "layer": "layerIndex",
    "token": "tokenIndex",
    "component": "componentIndex",
    "attended_token": "attendedTokenIndex",
    "top_and_bottom_k": "topAndBottomKForNodeTable",
    "components": "componentIndices",
    "query_token": "queryTokenIndex",
    "request": "inferenceRequestSpec",
    "queries": "processingRequestSpecByName",  # followed by a query's name, kept as it is
}
# Per endpoint: the wire field holding what the library's paths start from (the list of
# sub-requests), and names that differ there.
ENDPOINT_FIELDS: dict[str, tuple[str, dict[str, str]]] = {
    "/batched_tdb": ("subRequests", {}),
    "/batched": ("subRequests", {}),
    "/derived_attention_scalars": ("", {"component": "headIndex"}),
    # OpenAI's field names are snake_case.
    "/v1/chat/completions": ("", {"top_logprobs": "top_logprobs"}),
}
STATUS_OF_KIND = {"invalid": 400, "too_large": 413}

# What each error status means, for the OpenAPI document: every operation lists those it can answer
# (`responses=documented(...)`), all with the contract's body (schemas.ErrorResponse).
ERROR_STATUSES = {
    400: "a value the model or the datasets reject (named by the message and detail.field)",
    404: "a dataset, layer or component that no collated dataset holds (detail.field names it)",
    413: "over a limit: the request body (--max-body-bytes), a prompt (--max-prompt-tokens), the "
    "response's estimated size (--max-response-mb) or memory; the message names the fields to lower",
    422: "a field missing, of the wrong type, out of its bounds or unknown; malformed JSON",
    503: "no model loaded (a --no-model server)",
    504: "the request ran past the server's --request-timeout (its work was stopped)",
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` of an operation answering these error statuses."""
    return {
        status: {"model": ErrorResponse, "description": ERROR_STATUSES[status]}
        for status in statuses
    }


def wire_field(path: FieldPath, endpoint: str) -> str:
    """A library field path as the endpoint's request names it:
    (1, "node_ablations", 0, "node", "layer") -> "subRequests[1].nodeAblations[0].node.layerIndex"."""
    out, renames = ENDPOINT_FIELDS.get(endpoint, ("", {}))
    verbatim = False
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        name = part if verbatim else renames.get(part) or WIRE_NAMES.get(part) or to_camel(part)
        verbatim = part == "queries"
        out += f".{name}" if out else name
    return out


def field_path(loc: Sequence[int | str]) -> str:
    """("body", "subRequests", 0, "prompt") -> "subRequests[0].prompt"."""
    out = ""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path"):
        parts = parts[1:]
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in ("str", "int", "float", "bool") or p.startswith(
            ("function-", "list[", "union[", "literal[", "constrained-")
        ):
            continue  # pydantic's union-member tags say nothing to a user (a field `stream` does)
        else:
            out += f".{p}" if out else p
    return out


def _validation_message(errors: Sequence[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    detail = [
        {"field": field_path(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type")}
        for e in errors
    ]
    if any(e.get("type") == "json_invalid" for e in errors):
        err = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (err.get("ctx") or {}).get("error", "")
        loc = err.get("loc", ())
        at = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
        message = f"malformed JSON in the request body{at}: {reason}".rstrip(": ")
        return message, [{"field": "body", "message": message, "type": "json_invalid"}]
    first = detail[0] if detail else {"field": "", "message": "invalid request"}
    more = f" (and {len(detail) - 1} more)" if len(detail) > 1 else ""
    where = f"{first['field']}: " if first["field"] else "request body: "
    return f"{where}{first['message']}{more}", detail


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> Response:
        message, detail = _validation_message(list(exc.errors()))
        return error_response(422, message, request_id(request), detail)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError) -> Response:
        field = wire_field(exc.path, request.url.path)
        message = f"{field}: {exc.message}" if field else exc.message
        if isinstance(exc, LimitError):  # "; lower subRequests[0].tokenViewK or ..."
            message += exc.advice(lambda path: wire_field(path, request.url.path))
        return error_response(
            STATUS_OF_KIND.get(exc.kind, 400),
            message,
            request_id(request),
            {"field": field, "kind": exc.kind},
        )

    @app.exception_handler(RequestTimedOut)
    async def on_timeout(request: Request, exc: RequestTimedOut) -> Response:
        ran = "never started" if exc.ran_s is None else f"ran {exc.ran_s:.1f} s"
        return error_response(
            504,
            f"the request did not finish within the server's limit of {exc.limit_s:g} s "
            f"(--request-timeout): it waited {exc.waited_s:.1f} s for the model and {ran}; its "
            "work was stopped. Ask for less (fewer sub-requests, shorter prompts, smaller "
            "topAndBottomKForNodeTable or tokenViewK), or start the server with a longer limit",
            request_id(request),
        )

    @app.exception_handler(ClientGone)
    async def on_client_gone(request: Request, exc: ClientGone) -> Response:
        # Nobody reads this answer (the connection is closed); 499 is nginx's "client closed".
        log.info("%s %s: %s", request.method, request.url.path, exc)
        return error_response(499, str(exc), request_id(request))

    @app.exception_handler(Cancelled)
    async def on_cancelled(request: Request, exc: Cancelled) -> Response:
        return error_response(503, f"the request was stopped: {exc}", request_id(request))

    @app.exception_handler(NotFoundError)
    async def on_not_found(request: Request, exc: NotFoundError) -> Response:
        return error_response(
            404, f"{exc.field}: {exc.message}", request_id(request), {"field": exc.field}
        )

    @app.exception_handler(NoModelError)
    async def on_no_model(request: Request, exc: NoModelError) -> Response:
        return error_response(503, NO_MODEL_MESSAGE, request_id(request))

    @app.exception_handler(ValidationError)
    @app.exception_handler(ResponseValidationError)
    async def on_invalid_response(
        request: Request, exc: ValidationError | ResponseValidationError
    ) -> Response:
        """A response model refusing what an endpoint computed: a bug, so a 500, but one whose
        message says when the cause is a non-finite number (JSON has no NaN, and a `null` where
        the schema says number would be an invalid body)."""
        rid = request_id(request)
        log.error("invalid response to %s (request id %s)", request.url.path, rid, exc_info=exc)
        non_finite = [e for e in exc.errors() if e.get("type") == "finite_number"]
        if not non_finite:
            return error_response(500, f"internal server error; {_SEE_LOG.format(rid=rid)}", rid)
        where = field_path(non_finite[0].get("loc", ()))
        return error_response(
            500,
            f"the computation produced a non-finite number ({non_finite[0].get('input')}) at "
            f"{where} of the response, which JSON cannot carry: the model's arithmetic overflowed; "
            + _SEE_LOG.format(rid=rid),
            rid,
        )

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and isinstance(exc.__cause__, ValueError):
            # FastAPI's "There was an error parsing the body": a body that is no JSON text, e.g.
            # not UTF-8. Malformed JSON, like any, is a 422 (docs/api.md).
            message = f"malformed JSON in the request body: {exc.__cause__}"
            detail = [{"field": "body", "message": message, "type": "json_invalid"}]
            return error_response(422, message, request_id(request), detail)
        message = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(
            exc.status_code, message, request_id(request), headers=getattr(exc, "headers", None)
        )


class RequestIdMiddleware:
    """Gives every request an id (echoed in `x-request-id`) and turns any unhandled exception into
    the contract's 500 body, logging the traceback under that id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex[:12]
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (REQUEST_ID_HEADER.encode(), rid.encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception(
                "request %s %s failed (request id %s)", scope.get("method"), scope.get("path"), rid
            )
            if started:
                raise
            response = error_response(
                500, f"internal server error; {_SEE_LOG.format(rid=rid)}", rid
            )
            await response(scope, receive, send_with_id)
