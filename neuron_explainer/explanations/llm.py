"""The LLM explainer and simulators (Bills et al. 2023, as in OpenAI's TDB), and their backends.

Explainer: the model sees the top-activating explanation excerpts as `token<TAB>activation` lines,
activations rescaled to integers 0-10 (10 = the largest activation shown, negatives shown as 0)
and is asked to complete "the main thing this neuron does is find ..."; for attention heads it sees
the strongest (query token, attended token) pairs instead. Its reply's first line is the
explanation; an empty reply is a failure (ExplanationError) recorded for that component.

"All at once" simulator: one prompt per excerpt gives the explanation and lists the excerpt's
tokens, each followed by a tab and the placeholder `unknown`; the model's next-token distribution
at each placeholder, restricted to "0".."10" and renormalized, gives the expected value Σ p(v)·v
(log-probabilities of the prompt's own tokens: a completions endpoint with `echo` and `logprobs`).
Heads are simulated per token and each pair gets its attended (key) token's value: a coarse
reading, so this simulator's head scores mean little.

Backends: `OpenAIBackend` (any OpenAI-compatible endpoint: base URL, model, key; bounded
concurrency, retries with backoff on 429 and 5xx, an on-disk cache keyed by the request) and
`LocalBackend` (a model loaded in this process, through completions.py; no network). The local
backend reads all simulation prompts of one excerpt set in one batched forward that runs their
shared prefix (instructions and explanation) once and unembeds only the placeholder positions
(`logprobs_at`): the numbers of one echo completion per prompt, up to rounding.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from neuron_explainer.datasets.records import ActivationRecord, ComponentRecord, is_per_pair
from neuron_explainer.explanations.completions import (
    chat_prompt,
    complete,
    prompt_top_logprobs,
)
from neuron_explainer.explanations.methods import (
    BackendUnreachableError,
    ExcerptLimits,
    ExplanationError,
    Method,
)
from neuron_explainer.models.transformer import HookedTransformer

PROMPT_VERSION = "bills2023-1"
# What an LLM method reads and is scored on: TDB's 5 explanation excerpts; few scored ones, since
# each costs a model call.
LLM_LIMITS = ExcerptLimits(explain_top=5, score_top=5, score_random=5, with_quantiles=False)
PLACEHOLDER = "unknown"
TOP_LOGPROBS = 15

SYSTEM = (
    "We're studying neurons in a neural network. Each neuron looks for some particular thing in a "
    "short document. Look at the parts of the document the neuron activates for and summarize in "
    "a single sentence what the neuron is looking for. Don't list examples of words.\n\n"
    "The activation format is token<tab>activation. Activation values range from 0 to 10. A "
    "neuron finding what it's looking for is represented by a non-zero activation value. The "
    "higher the activation value, the stronger the match."
)
HEAD_SYSTEM = (
    "We're studying attention heads in a neural network. Each head looks at every pair of tokens "
    "in a short token sequence and activates for pairs of tokens that fit what it is looking for. "
    "Look at the pairs the head activates for and summarize in a single sentence what it is "
    "looking for. Each pair is written (attending token, attended token): activation."
)
LEAD = "the main thing this neuron does is find"
HEAD_LEAD = "the main thing this attention head does is attend from"


# ---- backends ------------------------------------------------------------------------------------


class Backend(Protocol):
    name: str  # the model, as the method records it

    def chat(self, messages: Sequence[tuple[str, str]], max_tokens: int) -> str: ...

    def prompt_logprobs(self, prompt: str, top: int) -> list[tuple[int, dict[str, float]]]:
        """(character offset, {token text: log-probability}) of the next-token distribution at
        every token of `prompt` but the first, the token starting at that offset."""
        ...


class LocalBackend:
    """A model loaded in this process (default: the default model); greedy, so deterministic."""

    def __init__(self, model: HookedTransformer, batch: int = 16) -> None:
        self.model = model
        self.name = model.cfg.name
        self.batch = batch  # simulation prompts per forward (logprobs_at)
        self._lock = threading.Lock()  # one call at a time on the model

    def chat(self, messages: Sequence[tuple[str, str]], max_tokens: int) -> str:
        assert self.model.tokenizer is not None
        prompt = chat_prompt(self.model.tokenizer, messages)
        with self._lock:
            return complete(self.model, prompt, max_tokens=max_tokens, temperature=0.0).text

    def prompt_logprobs(self, prompt: str, top: int) -> list[tuple[int, dict[str, float]]]:
        with self._lock:
            c = complete(self.model, prompt, max_tokens=0, top_logprobs=top, echo=True)
        tok = self.model.tokenizer
        assert tok is not None and c.prompt_logprobs is not None
        out, at = [], len(tok.decode(c.prompt_ids[:1]))
        for t in c.prompt_logprobs[1:]:
            assert t is not None
            out.append((at, {text: lp for _, text, lp in t.top}))
            at += len(t.token)
        return out

    def logprobs_at(
        self, prompts: Sequence[str], offsets: Sequence[Sequence[int]], top: int
    ) -> list[list[dict[str, float] | None]]:
        """For each prompt and each character offset of it: what `prompt_logprobs` gives for the
        token starting there (None where no token starts), computed for `batch` prompts at a time
        in one forward that runs their shared prefix once and unembeds only these positions
        (completions.prompt_top_logprobs)."""
        tok = self.model.tokenizer
        assert tok is not None
        texts: dict[int, str] = {}

        def text(i: int) -> str:
            if i not in texts:
                texts[i] = tok.decode([i])
            return texts[i]

        out: list[list[dict[str, float] | None]] = []
        for c in range(0, len(prompts), self.batch):
            ids, positions, wanted = [], [], []
            for prompt, want in zip(
                prompts[c : c + self.batch], offsets[c : c + self.batch], strict=True
            ):
                p_ids = tok.encode(prompt, allow_special=True)
                starts, at = {}, len(tok.decode(p_ids[:1]))
                for j in range(1, len(p_ids)):
                    starts[at] = j
                    at += len(text(p_ids[j]))
                ids.append(p_ids)
                wanted.append([starts.get(o) for o in want])
                positions.append(sorted({j for j in wanted[-1] if j is not None}))
            with self._lock:
                tops = prompt_top_logprobs(self.model, ids, positions, top)
            for want_j, js, top_j in zip(wanted, positions, tops, strict=True):
                by_j = {j: {text(i): lp for i, lp in t} for j, t in zip(js, top_j, strict=True)}
                out.append([None if j is None else by_j[j] for j in want_j])
        return out


@dataclass
class OpenAIBackend:
    """An OpenAI-compatible endpoint: `base_url` ends in /v1 (OPENAI_BASE_URL), `api_key`
    (OPENAI_API_KEY), `model` (default: the first the endpoint lists). Temperature 0. At most
    `concurrency` requests at once; 429 and 5xx are retried with exponential backoff (or the
    server's Retry-After) up to `retries` times; answers are cached on disk under `cache_dir`,
    keyed by the request, so a rerun asks nothing twice."""

    base_url: str
    model: str = ""
    api_key: str = ""
    concurrency: int = 4
    retries: int = 6
    backoff_s: float = 0.5
    timeout_s: float = 300.0
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self.api_key = self.api_key or os.environ.get("OPENAI_API_KEY", "")
        self._slots = threading.Semaphore(self.concurrency)
        self.retried = 0  # requests retried after a 429 or 5xx (for reports and tests)
        if not self.model:
            models = self._request("GET", "/models", None).get("data") or []
            if not models:
                raise BackendUnreachableError(f"{self.base_url}/models lists no model")
            self.model = str(models[0]["id"])
        self.name = self.model

    def check(self) -> None:
        """BackendUnreachableError naming the URL unless the endpoint answers GET /models."""
        self._request("GET", "/models", None)

    def _request(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        url = self.base_url + path
        key = None
        if body is not None and self.cache_dir is not None:
            blob = json.dumps([url, body], sort_keys=True).encode()
            key = self.cache_dir / f"{hashlib.sha256(blob).hexdigest()}.json"
            if key.is_file():
                cached: dict[str, Any] = json.loads(key.read_text())
                return cached
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with self._slots, urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                    answer: dict[str, Any] = json.loads(resp.read())
                break
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:500]
                if (e.code == 429 or e.code >= 500) and attempt < self.retries:
                    self.retried += 1
                    retry_after = e.headers.get("Retry-After")
                    wait = float(retry_after) if retry_after and retry_after.isdigit() else delay
                    time.sleep(min(wait, 60.0))
                    delay *= 2
                    continue
                if e.code == 429 or e.code >= 500 or e.code in (401, 403, 404):
                    raise BackendUnreachableError(f"{url} answered {e.code}: {detail}") from e
                raise ExplanationError(f"{url} answered {e.code}: {detail}") from e
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise BackendUnreachableError(f"cannot reach {url}: {reason}") from e
        if key is not None:
            key.parent.mkdir(parents=True, exist_ok=True)
            tmp = key.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(answer))
            tmp.replace(key)  # whole or absent, whatever happens
        return answer

    def chat(self, messages: Sequence[tuple[str, str]], max_tokens: int) -> str:
        body = {
            "model": self.model,
            "messages": [{"role": r, "content": c} for r, c in messages],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        answer = self._request("POST", "/chat/completions", body)
        try:
            return str(answer["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError) as e:
            raise ExplanationError(f"malformed chat completion from {self.base_url}") from e

    def prompt_logprobs(self, prompt: str, top: int) -> list[tuple[int, dict[str, float]]]:
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": 0,
            "temperature": 0,
            "logprobs": top,
            "echo": True,
        }
        answer = self._request("POST", "/completions", body)
        try:
            lp = answer["choices"][0]["logprobs"]
            offsets, tops = lp["text_offset"], lp["top_logprobs"]
            return [(int(o), dict(t)) for o, t in zip(offsets, tops, strict=True) if t is not None]
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ExplanationError(
                f"{self.base_url}/completions gave no prompt log-probabilities (echo + logprobs); "
                "use the text simulator for such endpoints"
            ) from e


# ---- explainer ---------------------------------------------------------------------------------


def _scaled_ints(values: Sequence[float], scale: float) -> list[int]:
    if not scale > 0:
        return [0] * len(values)
    return [round(min(max(v / scale, 0.0), 1.0) * 10) for v in values]


def _excerpt_lines(record: ActivationRecord, scale: float) -> str:
    values = _scaled_ints(record.activations, scale)
    return "\n".join(f"{t}\t{v}" for t, v in zip(record.tokens, values, strict=True))


def _head_pairs(records: Sequence[ActivationRecord], scale: float, per_excerpt: int = 5) -> str:
    lines = []
    for r in records:
        acts = np.asarray(r.activations)
        q, k = np.tril_indices(len(r.tokens))
        for j in np.argsort(-acts, kind="stable")[:per_excerpt]:
            v = _scaled_ints([float(acts[j])], scale)[0]
            lines.append(f"({r.tokens[q[j]]!r}, {r.tokens[k[j]]!r}): {v}")
    return "\n".join(lines)


def clean_explanation(reply: str, lead: str) -> str:
    """The explanation in a reply: its first non-empty line, without the lead phrase, quotes or a
    final full stop. ExplanationError when nothing is left."""
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    low = text.lower()
    for prefix in (lead, "the main thing this neuron does is", "explanation:"):
        if low.startswith(prefix):
            text = text[len(prefix) :].strip()
            low = text.lower()
    text = text.rstrip(" .").strip(" \"'`").rstrip(" .")
    if not text:
        raise ExplanationError(f"the explainer's reply holds no explanation: {reply[:200]!r}")
    return text


class LLMExplainer:
    def __init__(self, backend: Backend, max_tokens: int = 24) -> None:
        self.backend = backend
        self.max_tokens = max_tokens

    def explain(self, record: ComponentRecord, excerpts: Sequence[ActivationRecord]) -> str:
        scale = max((max(r.activations) for r in excerpts if r.activations), default=0.0)
        if is_per_pair(record.family):
            body = _head_pairs(excerpts, scale)
            user = f"Attention head\nActivating pairs:\n{body}\n\nComplete: {HEAD_LEAD} ..."
            messages = [("system", HEAD_SYSTEM), ("user", user)]
            return clean_explanation(self.backend.chat(messages, self.max_tokens), HEAD_LEAD)
        blocks = "\n\n".join(f"<start>\n{_excerpt_lines(r, scale)}\n<end>" for r in excerpts)
        user = (
            f"Neuron\nActivations:\n{blocks}\n\nReply with one short phrase completing: "
            f'"{LEAD} ..."'
        )
        messages = [("system", SYSTEM), ("user", user)]
        return clean_explanation(self.backend.chat(messages, self.max_tokens), LEAD)


# ---- simulators --------------------------------------------------------------------------------


def _simulation_prompt(explanation: str, tokens: Sequence[str]) -> tuple[str, list[int]]:
    """The all-at-once prompt and the character offset of each token's placeholder."""
    head = (
        f"{SYSTEM}\n\nNeuron\nExplanation of neuron behavior: {LEAD} {explanation}\n"
        "Activations:\n<start>\n"
    )
    parts, offsets, at = [head], [], len(head)
    for t in tokens:
        line = f"{t}\t"
        offsets.append(at + len(line))
        line += f"{PLACEHOLDER}\n"
        parts.append(line)
        at += len(line)
    parts.append("<end>\n")
    return "".join(parts), offsets


def expected_value(top: dict[str, float]) -> float:
    """Σ p(v)·v over the values "0".."10" among the alternatives, renormalized; 0 if none."""
    probs: dict[int, float] = {}
    for text, lp in top.items():
        s = text.strip()
        if s.isdigit() and int(s) <= 10 and math.isfinite(lp):
            probs[int(s)] = probs.get(int(s), 0.0) + math.exp(lp)
    total = sum(probs.values())
    return sum(v * p for v, p in probs.items()) / total if total > 0 else 0.0


class AllAtOnceSimulator:
    def __init__(
        self, backend: Backend, top_logprobs: int = TOP_LOGPROBS, batched: bool = True
    ) -> None:
        self.backend = backend
        self.top = top_logprobs
        self.batched = batched  # False: one prompt_logprobs call per excerpt (the reference)

    def _distributions(
        self, prompts: Sequence[str], offsets: Sequence[Sequence[int]]
    ) -> list[list[dict[str, float] | None]]:
        """The next-token distribution at each placeholder: all prompts at once where the backend
        can (LocalBackend.logprobs_at), else from each prompt's log-probabilities."""
        many = getattr(self.backend, "logprobs_at", None)
        if many is not None and self.batched:
            return list(many(prompts, offsets, self.top))
        out = []
        for prompt, want in zip(prompts, offsets, strict=True):
            at_offset = dict(self.backend.prompt_logprobs(prompt, self.top))
            out.append([at_offset.get(o) for o in want])
        return out

    def simulate(
        self, explanation: str, family: str, excerpts: Sequence[ActivationRecord]
    ) -> list[np.ndarray]:
        built = [_simulation_prompt(explanation, r.tokens) for r in excerpts]
        prompts, offsets = [p for p, _ in built], [o for _, o in built]
        out = []
        for want, dists in zip(offsets, self._distributions(prompts, offsets), strict=True):
            missing = [o for o, d in zip(want, dists, strict=True) if d is None]
            if missing:
                raise ExplanationError(
                    f"the simulation prompt's placeholder at character {missing[0]} does not "
                    "start a token; this tokenizer cannot be simulated all at once"
                )
            per_token = np.array([expected_value(d) for d in dists if d is not None])
            out.append(in_record_layout(family, per_token))
        return out


def in_record_layout(family: str, per_token: np.ndarray) -> np.ndarray:
    """A simulator's per-token predictions laid out as the family's records are: as they are, or
    for a per-pair family (heads) each pair (q, k <= q) given its key token's value, row by row
    over the lower triangle."""
    if not is_per_pair(family):
        return per_token
    _, k = np.tril_indices(len(per_token))
    return per_token[k]


def llm_method(backend: Backend, simulator: str = "all_at_once") -> Method:
    return Method("llm", simulator, backend.name, PROMPT_VERSION)
