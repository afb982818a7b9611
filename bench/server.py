"""Throughput of the activation server under concurrent debugger requests, with and without merging;
or, with --soak, its stability under a long mixed load; or, with --while-collating, a request's
latency while a collation runs (beside the server, and as the server's own paused job).

Starts `python -m activation_server` twice on the default model, once with
`--max-merged-rows 1` (requests queue and run one at a time) and once with merging (requests
waiting together share one engine pass), sends N concurrent `/batched_tdb` requests with different
prompts, and prints requests/s of each and their ratio. Also prints the HTTP overhead: one request's
latency divided by the same engine call made in-process.

    .venv/bin/python bench/server.py [--concurrency 16] [--rounds 3]

Soak mode (`--soak [SECONDS]`, default 120; 600 for the acceptance figures in the README): one
server on 127.0.0.1, two clients sending a fixed-seed mix of requests for that long: debugger
requests of several lengths and table sizes, ablations, traces, derived scalars, tokenize,
generate, requests over the response cap (413s, expected), and long requests abandoned by their
client mid-request (queued or running). After a warm-up (`--warmup`, default a fifth of the
soak) it reports per endpoint p50 and p99 latency, unexpected errors, how long each abandoned
request stayed on the model after its client hung up (against a debugger request's p50 latency,
as a ratio), and the server's RSS growth (VmRSS of /proc/PID/status) against its value at the end
of the warm-up.

    .venv/bin/python bench/server.py --soak 600
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from activation_server.client import AsyncClient  # noqa: E402

NAMES = ["Mary", "Anna", "Paul", "Lucy", "Tom", "Kate", "Jack", "Emma"]
PLACES = ["store", "park", "school", "beach"]


def prompts(n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        a, b = NAMES[i % 8], NAMES[(i + 3) % 8]
        out.append(
            {
                "prompt": f"When {a} and {b} went to the {PLACES[i % 4]}, {b} gave a drink to",
                "targetTokens": [f" {a}"],
                "distractorTokens": [f" {b}"],
            }
        )
    return out


def start(
    extra: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "activation_server", "--port", str(port)),
            *("--log-level", "warning", *extra),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env or {**os.environ},
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


async def burst(url: str, reqs: list[dict[str, Any]]) -> float:
    async with AsyncClient(url) as client:
        await client.batched_tdb([reqs[0]])  # warm-up
        start_t = time.perf_counter()
        await asyncio.gather(*(client.batched_tdb([r]) for r in reqs))
        return time.perf_counter() - start_t


async def single(url: str, req: dict[str, Any], rounds: int) -> float:
    async with AsyncClient(url) as client:
        await client.batched_tdb([req])
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            await client.batched_tdb([req])
            times.append(time.perf_counter() - t)
        return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--soak",
        type=float,
        nargs="?",
        const=120.0,
        default=None,
        metavar="SECONDS",
        help="soak mode: a mixed load for this long after the warm-up (default 120)",
    )
    ap.add_argument("--warmup", type=float, default=None, help="soak warm-up seconds")
    ap.add_argument(
        "--while-collating",
        action="store_true",
        help="a 64-token request's latency idle, beside a collation, and with one as a server job",
    )
    args = ap.parse_args()
    if args.while_collating:
        while_collating(args.rounds)
        return
    if args.soak is not None:
        soak(args.soak, args.warmup if args.warmup is not None else min(120.0, args.soak / 5))
        return
    reqs = prompts(args.concurrency)
    results = {}
    for label, extra in (("one at a time", ["--max-merged-rows", "1"]), ("merged", [])):
        proc, url = start(extra)
        try:
            best = min(asyncio.run(burst(url, reqs)) for _ in range(args.rounds))
            results[label] = args.concurrency / best
            if label == "merged":
                latency = asyncio.run(single(url, reqs[0], args.rounds))
        finally:
            proc.terminate()
            proc.wait()
        print(f"{label:>14}: {results[label]:6.2f} requests/s ({args.concurrency} concurrent)")
    print(f"merging speed-up: {results['merged'] / results['one at a time']:.2f}x")

    # HTTP + queue + JSON overhead: one request over HTTP vs the same engine call in-process.
    import torch

    from neuron_explainer.activations import Engine, SubRequest
    from neuron_explainer.models import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    engine = Engine(load_model("smollm2-135m", device="cpu"))
    req = SubRequest(reqs[0]["prompt"], reqs[0]["targetTokens"], reqs[0]["distractorTokens"])
    engine.run([req])
    lib = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        engine.run([req])
        lib.append(time.perf_counter() - t)
    print(
        f"one request: {latency * 1000:.0f} ms over HTTP vs {min(lib) * 1000:.0f} ms in-process "
        f"(ratio {latency / min(lib):.2f})"
    )


# ---- latency while collating --------------------------------------------------------------------

# Three finished IOI sentences, then one to complete: about 64 tokens.
IOI_64 = " ".join(
    [
        *(
            f"When {NAMES[i]} and {NAMES[i + 3]} went to the {PLACES[i]}, "
            f"{NAMES[i + 3]} gave a drink to {NAMES[i]}."
            for i in range(3)
        ),
        "When Mary and John went to the store, John gave a drink to",
    ]
)


def latencies(url: str, n: int) -> list[float]:
    body = {"prompt": IOI_64, "targetTokens": [" Mary"], "distractorTokens": [" John"]}

    async def run() -> list[float]:
        async with AsyncClient(url) as client:
            await client.batched_tdb([body])  # warm-up
            times = []
            for _ in range(n):
                t = time.perf_counter()
                await client.batched_tdb([body])
                times.append(time.perf_counter() - t)
                await asyncio.sleep(0.5)  # the collation gets the CPU between requests
            return times

    return asyncio.run(run())


def wait_collating(url: str, timeout_s: float = 300) -> None:
    """Until the server's collation job has committed tokens (its model is loaded and running)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "/jobs", timeout=5) as resp:
            jobs = json.loads(resp.read())["jobs"]
        if jobs and jobs[0]["status"] == "running" and jobs[0]["tokens"] > 0:
            return
        time.sleep(1)
    raise RuntimeError("the collation job did not start")


def while_collating(rounds: int) -> None:
    """A 64-token debugger request's latency (median of 5 per round): on an idle server; beside a
    `tdb collate` started by hand (nice 10, not the server's: the server cannot pause it); and
    with the collation as the server's own job (--auto-dataset), which it pauses while requests
    run. A fresh TDB_CACHE for the collations (the default corpus linked in)."""
    import tempfile

    from neuron_explainer.datasets.corpus import default_corpus_dir

    n = 5
    rows: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        (cache / "corpora").mkdir()
        corpus = default_corpus_dir()
        (cache / "corpora" / corpus.name).symlink_to(corpus, target_is_directory=True)
        env = {**os.environ, "TDB_CACHE": str(cache)}
        for r in range(rounds):
            proc, url = start([])
            try:
                rows["idle server"] += latencies(url, n)
                out = str(cache / f"by-hand-{r}.sqlite")
                command = [sys.executable, "-m", "neuron_explainer.cli", "collate", "--quiet"]
                collate = subprocess.Popen(
                    [*command, "--out", out, "--tokens", "65536"],
                    env=env,
                    preexec_fn=lambda: os.nice(10),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(20)  # its model loaded, collating
                rows["beside `tdb collate` (nice 10)"] += latencies(url, n)
                collate.kill()
                collate.wait()
            finally:
                proc.terminate()
                proc.wait()
            extra = ["--auto-dataset", "--no-auto-explain", "--auto-dataset-tokens", "65536"]
            proc, url = start(extra, env=env)
            try:
                wait_collating(url)
                rows["collation as the server's job (paused per request)"] += latencies(url, n)
            finally:
                proc.terminate()
                proc.wait()
            for f in cache.glob("datasets/*"):
                f.unlink()  # the next round's job starts from scratch
    idle = statistics.median(rows["idle server"])
    print(f"\n64-token debugger request, {rounds} round(s) x {n} requests, medians:")
    print("| server | latency median (range) | ÷ idle |")
    print("|---|---|---|")
    for label, times in rows.items():
        med = statistics.median(times)
        print(f"| {label} | {med:.2f} s ({min(times):.2f}–{max(times):.2f}) | {med / idle:.2f} |")


# ---- soak --------------------------------------------------------------------------------------

LONG = " ".join(
    f"{NAMES[i % 8]} walked to the {PLACES[i % 4]} and talked with {NAMES[(i + 5) % 8]}."
    for i in range(40)
)  # ~480 tokens


def mix(rng: random.Random) -> tuple[str, str, dict[str, Any], int, bool]:
    """One request of the soak: (label, path, body, expected status, abandon it)."""
    ioi = prompts(8)[rng.randrange(8)]
    roll = rng.random()
    if roll < 0.22:
        copies = rng.choice([1, 4, 16])  # ~15, ~60, ~240 tokens
        prompt = " ".join([ioi["prompt"]] * copies)
        sub = ioi | {"prompt": prompt, "topAndBottomKForNodeTable": rng.choice([5, 10, 50])}
        label = f"/batched_tdb ({copies} x IOI)"
        return label, "/batched_tdb", {"subRequests": [sub]}, 200, False
    if roll < 0.32:
        node = {"nodeType": "mlp_neuron", "layerIndex": 3, "tokenIndex": 2, "componentIndex": 7}
        body = {"subRequests": [ioi | {"nodeAblations": [{"node": node}]}, ioi]}
        return "/batched_tdb (ablation)", "/batched_tdb", body, 200, False
    if roll < 0.40:
        node = {"nodeType": "mlp_neuron", "layerIndex": 20, "tokenIndex": 9, "componentIndex": 5}
        body = {"subRequests": [ioi | {"upstreamNodeToTrace": {"node": node}}]}
        return "/batched_tdb (trace)", "/batched_tdb", body, 200, False
    if roll < 0.50:
        body = {"prompt": ioi["prompt"], "layerIndex": 5, "componentIndex": 11}
        return "/derived_scalars", "/derived_scalars", body, 200, False
    if roll < 0.56:
        body = {"prompt": ioi["prompt"], "layerIndex": 7, "headIndex": 2}
        return "/derived_attention_scalars", "/derived_attention_scalars", body, 200, False
    if roll < 0.70:
        return "/tokenize", "/tokenize", {"text": ioi["prompt"]}, 200, False
    if roll < 0.84:
        body = {"prompt": ioi["prompt"], "maxNewTokens": rng.choice([1, 8, 32])}
        return "/generate", "/generate", body, 200, False
    if roll < 0.87:
        sub = ioi | {"topAndBottomKForNodeTable": 1000, "tokenViewK": 200}
        return "/batched_tdb (over the cap)", "/batched_tdb", {"subRequests": [sub]}, 413, False
    # Abandoned: long enough to be running (or still queued) when the client hangs up.
    if rng.random() < 0.5:
        body = {"prompt": ioi["prompt"], "maxNewTokens": 400}
        return "abandoned /generate", "/generate", body, 0, True
    sub = ioi | {"prompt": LONG, "topAndBottomKForNodeTable": 100}
    return "abandoned /batched_tdb", "/batched_tdb", {"subRequests": [sub]}, 0, True


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def health(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/health", timeout=60) as resp:
        out: dict[str, Any] = json.loads(resp.read())
        return out


class Soak:
    def __init__(self, url: str, pid: int) -> None:
        self.url, self.pid = url, pid
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.stop_delays: list[float] = []  # hang-up -> the request is off the model
        self.recording = False
        self.abandoning = threading.Lock()

    def request(self, rng: random.Random) -> None:
        label, path, body, expected, abandon = mix(rng)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=600)
        start = time.perf_counter()
        conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        if abandon:
            with self.abandoning:  # one at a time, so the server's counter tells whose it is
                time.sleep(rng.uniform(0.05, 1.5))  # queued or running by then
                noticed = health(self.url)["requestsCancelled"] + 1
                conn.close()
                hung_up = time.perf_counter()
                while not self.off_the_model(noticed):
                    if time.perf_counter() - hung_up > 300:
                        self.errors.append(f"{label}: still on the model 300 s after the hang-up")
                        break
                    time.sleep(0.02)
                with self.lock:
                    if self.recording:
                        self.stop_delays.append(time.perf_counter() - hung_up)
            return
        response = conn.getresponse()
        response.read()
        elapsed = time.perf_counter() - start
        conn.close()
        with self.lock:
            if not self.recording:
                return
            if response.status != expected:
                self.errors.append(f"{label}: HTTP {response.status}")
            else:
                self.latencies[label].append(elapsed)

    def off_the_model(self, cancelled: int) -> bool:
        """Whether the server has seen `cancelled` hang-ups and holds no abandoned request."""
        h = health(self.url)
        held = h["running"] + h["queue"]
        return h["requestsCancelled"] >= cancelled and not any(r["abandoned"] for r in held)

    def client(self, seed: int, until: float) -> None:
        rng = random.Random(seed)
        while time.monotonic() < until:
            self.request(rng)


def soak(seconds: float, warmup: float) -> None:
    proc, url = start([])
    try:
        run = Soak(url, proc.pid)
        print(
            f"soak: {warmup:.0f} s warm-up, then {seconds:.0f} s, 2 clients, server pid {proc.pid}"
        )
        clients = []
        end = time.monotonic() + warmup + seconds
        for seed in (1, 2):
            t = threading.Thread(target=run.client, args=(seed, end), daemon=True)
            t.start()
            clients.append(t)
        time.sleep(warmup)
        with run.lock:
            run.recording = True
        base = rss_mib(proc.pid)
        samples = [base]
        while time.monotonic() < end:
            time.sleep(min(5.0, max(0.0, end - time.monotonic())))
            samples.append(rss_mib(proc.pid))
        for t in clients:
            t.join()
        final = rss_mib(proc.pid)
        h = health(url)
    finally:
        proc.terminate()
        proc.wait()

    def pct(values: list[float], q: float) -> float:
        return sorted(values)[min(len(values) - 1, int(q * len(values)))]

    print(f"{'endpoint':<40}{'n':>6}{'p50 s':>9}{'p99 s':>9}")
    for label in sorted(run.latencies):
        v = run.latencies[label]
        print(f"{label:<40}{len(v):>6}{statistics.median(v):>9.3f}{pct(v, 0.99):>9.3f}")
    print(f"unexpected errors: {len(run.errors)} {run.errors[:5]}")
    d = run.stop_delays
    tdb = statistics.median(run.latencies.get("/batched_tdb (1 x IOI)", [float("nan")]))
    if d:
        print(
            f"abandoned: {len(d)}; off the model {statistics.median(d):.2f} s (p50), "
            f"{max(d):.2f} s (max) after the hang-up, {max(d) / tdb:.2f}x a short debugger "
            f"request's p50 ({tdb:.2f} s)"
        )
    print(
        f"server: requestsCancelled {h['requestsCancelled']}, runsStopped {h['runsStopped']}, "
        f"requestsTimedOut {h['requestsTimedOut']}, batchesRun {h['batchesRun']}"
    )
    print(
        f"RSS after warm-up {base:.0f} MiB, max {max(samples):.0f} MiB, final {final:.0f} MiB: "
        f"growth {100 * (final - base) / base:+.1f} % (max {100 * (max(samples) - base) / base:+.1f} %)"
    )


if __name__ == "__main__":
    main()
