"""OpenAI-compatible endpoints for the loaded model: `GET /v1/models`, `POST /v1/chat/completions`
and `POST /v1/completions` (with log-probabilities, and `echo` for the prompt's), so OpenAI's own
client, other tools and the LLM explainer can use it. Thin: the work is
`neuron_explainer.explanations.completions`."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from activation_server import schemas as s
from activation_server.errors import documented
from activation_server.routes.inference import Worker
from activation_server.state import model_worker, server_state
from neuron_explainer.activations import RequestError
from neuron_explainer.explanations.completions import (
    Completion,
    TokenLogprob,
    chat_prompt,
    complete,
)

router = APIRouter(prefix="/v1", tags=["openai"])
ERRORS = documented(400, 413, 422, 503, 504)
DEFAULT_MAX_TOKENS = 16


def _served_name(request: Request) -> str:
    state = server_state(request)
    if state.model is None:
        model_worker(request)  # raises the 503
    assert state.model is not None
    return state.model.cfg.name


def _check_model(name: str, served: str) -> None:
    if name != served:
        raise RequestError("model", f"{name!r} is not served here; this server serves {served!r}")


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _usage(c: Completion) -> s.Usage:
    return s.Usage(
        prompt_tokens=len(c.prompt_ids),
        completion_tokens=len(c.new_ids),
        total_tokens=len(c.prompt_ids) + len(c.new_ids),
    )


async def _complete(
    worker: Worker,
    prompt: str | list[int],
    options: s.OpenAIOptions,
    max_tokens: int | None,
    top_logprobs: int,
    echo: bool = False,
) -> Completion:
    engine = worker.engine
    engine.check_prompt_size(prompt)
    if isinstance(prompt, list):
        vocab = engine.model.cfg.vocab_size
        for j, token_id in enumerate(prompt):
            if token_id >= vocab:
                raise RequestError(("prompt", j), f"token id {token_id} is not below {vocab}")
    n = max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS

    def run() -> Completion:
        try:
            return complete(
                engine.model,
                prompt,
                max_tokens=n,
                temperature=options.temperature,
                top_p=options.top_p if options.top_p < 1 else None,
                top_logprobs=top_logprobs,
                echo=echo,
                stop=_stops(options.stop),
                seed=options.seed,
            )
        except ValueError as e:
            raise RequestError("prompt", str(e)) from e

    return await worker.call(run)


@router.get("/models", response_model=s.ModelList, responses=documented(503))
async def list_models(request: Request) -> s.ModelList:
    """The one model this server runs."""
    return s.ModelList(data=[s.ModelCard(id=_served_name(request), created=0, owned_by="tdb")])


def _top(t: TokenLogprob) -> list[s.TopLogprob]:
    return [
        s.TopLogprob(token=text, logprob=lp, bytes=list(text.encode())) for _, text, lp in t.top
    ]


@router.post("/chat/completions", response_model=s.ChatCompletion, responses=ERRORS)
async def chat_completions(
    body: s.ChatCompletionRequest, request: Request, worker: Worker
) -> s.ChatCompletion:
    """The assistant's reply to the messages, rendered with the model's chat template."""
    served = _served_name(request)
    _check_model(body.model, served)
    tokenizer = worker.engine.model.tokenizer
    if tokenizer is None:
        raise RequestError("messages", "this model has no tokenizer")
    prompt = chat_prompt(tokenizer, [(m.role, m.content) for m in body.messages])
    if body.top_logprobs and not body.logprobs:
        raise RequestError("top_logprobs", "needs logprobs: true")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens else body.max_tokens
    c = await _complete(worker, prompt, body, max_tokens, body.top_logprobs or 0)
    logprobs = None
    if body.logprobs:
        logprobs = s.ChatLogprobs(
            content=[
                s.ChatTokenLogprob(
                    token=t.token,
                    logprob=t.logprob,
                    bytes=list(t.token.encode()),
                    top_logprobs=_top(t),
                )
                for t in c.logprobs
            ]
        )
    choice = s.ChatChoice(
        index=0,
        message=s.AssistantMessage(content=c.text),
        logprobs=logprobs,
        finish_reason=c.finish_reason,
    )
    return s.ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=served,
        choices=[choice],
        usage=_usage(c),
    )


@router.post("/completions", response_model=s.TextCompletion, responses=ERRORS)
async def completions(
    body: s.CompletionRequest, request: Request, worker: Worker
) -> s.TextCompletion:
    """A continuation of the prompt; `logprobs: N` adds each token's log-probability and the N
    most likely alternatives, `echo` the prompt's text and tokens (the first with null)."""
    served = _served_name(request)
    _check_model(body.model, served)
    c = await _complete(
        worker, body.prompt, body, body.max_tokens, body.logprobs or 0, echo=body.echo
    )
    tokenizer = worker.engine.model.tokenizer
    assert tokenizer is not None
    prompt_text = tokenizer.decode(c.prompt_ids)
    text = (prompt_text if body.echo else "") + c.text
    logprobs = None
    if body.logprobs is not None:
        entries: list[tuple[str, float | None, dict[str, float] | None]] = []
        if body.echo and c.prompt_logprobs is not None:
            first = tokenizer.decode(c.prompt_ids[:1])
            entries.append((first, None, None))
            entries += [
                (t.token, t.logprob, {text: lp for _, text, lp in t.top})
                for t in c.prompt_logprobs[1:]
                if t is not None
            ]
        entries += [(t.token, t.logprob, {text: lp for _, text, lp in t.top}) for t in c.logprobs]
        offsets, at = [], 0
        for token, _, _ in entries:
            offsets.append(at)
            at += len(token)
        logprobs = s.CompletionLogprobs(
            tokens=[e[0] for e in entries],
            token_logprobs=[e[1] for e in entries],
            top_logprobs=[e[2] for e in entries],
            text_offset=offsets,
        )
    return s.TextCompletion(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=served,
        choices=[
            s.CompletionChoice(index=0, text=text, logprobs=logprobs, finish_reason=c.finish_reason)
        ],
        usage=_usage(c),
    )
