"""Throughput of the activation server under concurrent debugger requests, with and without merging.

Starts `python -m activation_server` twice on the default model, once with
`--max-merged-rows 1` (requests queue and run one at a time) and once with merging (requests
waiting together share one engine pass), sends N concurrent `/batched_tdb` requests with different
prompts, and prints requests/s of each and their ratio. Also prints the HTTP overhead: one request's
latency divided by the same engine call made in-process.

    .venv/bin/python bench/server.py [--concurrency 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
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


def start(extra: list[str]) -> tuple[subprocess.Popen[bytes], str]:
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
        env={**os.environ},
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
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
