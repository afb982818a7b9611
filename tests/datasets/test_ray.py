"""`tdb collate --ray` and `tdb explain --ray` on a real Ray cluster: a head and two worker nodes
started with `ray start` on this machine (CPU only), each its own processes, the `tdb` driver a
subprocess that joins it by address.

Collating in 3 shards through the cluster gives the store of one single-process run, table by
table; so does a run whose worker process is killed with SIGKILL in the middle of a shard (Ray
retries the task, which resumes the shard store from its last commit). Explaining through the
cluster writes the table of a single-process run, and an endpoint never sees more than
--concurrency requests at once from the whole cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from neuron_explainer.datasets import collate
from neuron_explainer.datasets.collate import shard_range
from neuron_explainer.datasets.corpus import folder_corpus
from neuron_explainer.datasets.distributed import RAY_INSTALL, shard_paths
from neuron_explainer.explanations import (
    BASELINE_METHOD,
    BaselineExplainer,
    BaselineSimulator,
    explain_store,
)
from neuron_explainer.models import HookedTransformer
from tests.datasets.helpers import assert_same_dataset
from tests.datasets.test_resume_and_shards import N_TOKENS, cli_args, committed_progress
from tests.servers import ROOT, Proxy, free_port, proxy_to, start_server, stop_server

# Ray's own processes make no call home (usage statistics); the cluster takes only clients with
# its token (Ray's token authentication: the nodes and the `tdb` drivers share it), whatever
# ~/.ray holds.
RAY_ENV = {
    **os.environ,
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "token",
    "RAY_AUTH_TOKEN": secrets.token_hex(32),
}
OBJECT_STORE_BYTES = "100000000"
WORKER_CPUS = 2  # declared, as Ray allows: 4 task slots on this 2-core machine

SETTINGS = dict(
    n_tokens=N_TOKENS,
    window_length=16,
    batch_size=8,
    k=4,
    random_sample_size=3,
    quantile_sample_size=2,
    calibration_windows=20,  # more than one batch: shards 1 and 2 calibrate first
)


@dataclass
class Cluster:
    address: str
    nodes: list[subprocess.Popen[bytes]]


def _start_node(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    ray = Path(sys.executable).with_name("ray")
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(ray), "start", "--block", *args], stdout=out, stderr=subprocess.STDOUT, env=RAY_ENV
        )


def _wait_started(node: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while "block forever" not in log.read_text(errors="replace"):
        if node.poll() is not None:
            raylet_logs = sorted(log.parent.glob("session_latest/logs/raylet*"))
            details = "".join(f"\n{p}:\n{p.read_text()[-3000:]}" for p in raylet_logs)
            pytest.fail(f"ray start exited:\n{log.read_text()}{details}")
        assert time.monotonic() < deadline, f"ray start did not finish:\n{log.read_text()}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Cluster]:
    """A head node (no CPUs: tasks go to the workers) and two worker nodes, each `ray start
    --block`, which stops its node's processes when it is terminated."""
    # Ray's session folder holds Unix sockets, whose paths are limited to 107 bytes: a short one.
    temp = Path(tempfile.mkdtemp(prefix="tdbray", dir="/tmp"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address=127.0.0.1", f"--object-store-memory={OBJECT_STORE_BYTES}"]
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        head_log = temp / "head.log"
        head = _start_node(
            [
                "--head",
                f"--port={port}",
                "--num-cpus=0",
                "--include-dashboard=false",
                f"--temp-dir={temp}",
                *common,
            ],
            head_log,
        )
        nodes.append(head)
        _wait_started(head, head_log)
        for i in range(2):  # one after the other: a node waits only 30 s for its raylet
            log = temp / f"worker{i}.log"
            worker_args = [f"--address={address}", f"--num-cpus={WORKER_CPUS}", *common]
            nodes.append(_start_node(worker_args, log))
            _wait_started(nodes[-1], log)
        yield Cluster(address, nodes)
    finally:
        for node in reversed(nodes):
            node.terminate()
        for node in nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
        shutil.rmtree(temp, ignore_errors=True)


def tdb(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "neuron_explainer.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=RAY_ENV,
    )


def collate_args(model_dir: Path, corpus: Path, out: Path) -> list[str]:
    return [
        "collate",
        f"--model={model_dir}",
        f"--corpus={corpus}",
        f"--out={out}",
        f"--tokens={N_TOKENS}",
        *(
            f"--{key.replace('_', '-')}={value}"
            for key, value in SETTINGS.items()
            if key != "n_tokens"
        ),
        "--device=cpu",
        "--threads=1",
    ]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_metadata(path: Path) -> dict[str, object]:
    with sqlite3.connect(path) as conn:
        return {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM metadata")}


def test_collation_in_three_shards_equals_a_single_process_run(
    ray_cluster: Cluster,
    tiny_model: HookedTransformer,
    tiny_model_dir: Path,
    prose_dir: Path,
    tmp_path: Path,
    one_thread: None,
) -> None:
    corpus = folder_corpus(prose_dir)
    single = tmp_path / "single.sqlite"
    collate(tiny_model, corpus, single, progress=False, **SETTINGS)  # type: ignore[arg-type]
    out = tmp_path / "ray.sqlite"
    # Shard 0 is complete already, as a driver stopped after it finished would leave it.
    paths = shard_paths(out, 3)
    paths[0].parent.mkdir()
    collate(tiny_model, corpus, paths[0], shard=(0, 3), progress=False, **SETTINGS)  # type: ignore[arg-type]
    before = digest(paths[0])

    args = [*collate_args(tiny_model_dir, prose_dir, out), "--ray", ray_cluster.address]
    run = tdb(*args, "--shards=3", "--keep-shards")
    assert run.returncode == 0, run.stderr
    assert "shards 3 done, 0 running, 0 queued, 0 failed" in run.stderr
    assert "3 shards (1 complete already, 0 empty)" in run.stderr
    assert digest(paths[0]) == before  # reused as it was
    for i, path in enumerate(paths):
        meta = shard_metadata(path)
        assert meta["shard"] == f"{i}/3" and meta["status"] == "complete"
    assert_same_dataset(single, out)

    # Run again: nothing to do, the store keeps its bytes.
    merged = digest(out)
    again = tdb(*args, "--shards=3")
    assert again.returncode == 0, again.stderr
    assert "already complete; nothing to do" in again.stderr
    assert digest(out) == merged


def holder(path: Path) -> int | None:
    """The process that has `path` open, if any (/proc/PID/fd)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in fds):
                return int(pid)
        except OSError:  # gone, or not ours to read
            continue
    return None


def test_a_worker_killed_mid_shard_is_retried_and_the_store_is_the_same(
    ray_cluster: Cluster,
    tiny_model: HookedTransformer,
    tiny_model_dir: Path,
    prose_dir: Path,
    tmp_path: Path,
    one_thread: None,
) -> None:
    # One window per batch and a commit after each: a shard commits many times.
    settings = SETTINGS | dict(batch_size=1, calibration_windows=8)
    single = tmp_path / "single.sqlite"
    collate(
        tiny_model,
        folder_corpus(prose_dir),
        single,
        commit_every_batches=1,
        progress=False,
        **settings,  # type: ignore[arg-type]
    )
    out = tmp_path / "ray.sqlite"
    args = [a for a in cli_args(tiny_model_dir, prose_dir, out) if a != "--quiet"]
    driver = subprocess.Popen(
        [*args, "--ray", ray_cluster.address, "--shards=3"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env=RAY_ENV,
    )
    paths = shard_paths(out, 3)
    n_windows = N_TOKENS // 16
    killed = None
    try:
        deadline = time.monotonic() + 180
        while killed is None:
            assert driver.poll() is None, f"the run ended first: {driver.communicate()[1]}"
            assert time.monotonic() < deadline, "no shard committed within 180 s"
            time.sleep(0.005)
            for i, path in enumerate(paths):
                progress = committed_progress(path)
                start, end = shard_range(n_windows, 1, (i, len(paths)))
                if progress is None or not start < progress[0] < end:
                    continue
                # The Ray worker writing shard i holds its lock file open until the shard is done.
                pid = holder(Path(f"{path}.lock"))
                if pid is not None:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    assert cmdline.startswith(b"ray::collate_shard"), cmdline
                    os.kill(pid, signal.SIGKILL)
                    killed = i
                    break
        _, stderr = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, stderr
    assert f"shard {killed} (2 attempts)" in stderr
    assert_same_dataset(single, out)
    assert not paths[0].parent.exists()  # the shard stores are deleted once merged


def test_explaining_through_the_cluster_writes_the_single_process_table(
    ray_cluster: Cluster, tiny_store: Path, tmp_path: Path
) -> None:
    from tests.explanations.test_explain_cli import table

    reference = tmp_path / "reference.sqlite"
    shutil.copy(tiny_store, reference)
    explain_store(reference, BaselineExplainer(), BaselineSimulator(), BASELINE_METHOD)
    store = tmp_path / "store.sqlite"
    shutil.copy(tiny_store, store)
    run = tdb("explain", str(store), "--chunk=64", "--ray", ray_cluster.address)
    assert run.returncode == 0, run.stderr
    assert "parts 4/4 done" in run.stderr  # 200 components in parts of 64
    assert table(store) == table(reference)


class CountingProxy(Proxy):
    """In front of a real server: counts the requests in flight, holding each 1 s so that the
    requests of tasks running at the same time overlap."""

    lock = threading.Lock()
    in_flight = 0
    peak = 0
    total = 0

    def answer(self, body: bytes | None) -> tuple[int, dict[str, str], bytes]:
        cls = type(self)
        with cls.lock:
            cls.in_flight += 1
            cls.total += 1
            cls.peak = max(cls.peak, cls.in_flight)
        try:
            time.sleep(1.0)
            return super().answer(body)
        finally:
            with cls.lock:
                cls.in_flight -= 1


def test_an_endpoint_gets_at_most_concurrency_requests_from_the_whole_cluster(
    ray_cluster: Cluster, tiny_model_dir: Path, tiny_store: Path, tmp_path: Path
) -> None:
    # The tiny model with a context long enough for the explanation prompts, served. Its replies
    # hold no explanation (it is random), so each component is one request and a failed row.
    model = tmp_path / "tiny-long"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 2048}))
    server = start_server(["--model", str(model), "--device", "cpu"], tmp_path / "server.log")
    store = tmp_path / "store.sqlite"
    shutil.copy(tiny_store, store)
    try:
        with proxy_to(server, CountingProxy) as url:
            run = tdb(
                "explain",
                str(store),
                f"--explainer={url}",
                "--families=mlp_neuron",
                "--limit=24",
                "--chunk=6",  # 4 parts
                "--concurrency=6",  # two tasks of 3 requests at once
                "--no-cache",
                "--ray",
                ray_cluster.address,
            )
    finally:
        stop_server(server)
    assert run.returncode == 0, run.stderr
    with sqlite3.connect(store) as conn:
        rows = conn.execute("SELECT family, layer, idx FROM explanations").fetchall()
    assert len(rows) == len(set(rows)) == 24  # one row per component, each once
    assert CountingProxy.total >= 24
    # Two tasks at a time overlap (more than one task's 3), never more than 6 in all; without
    # the bound the cluster's 4 task slots would send up to 12.
    assert 3 < CountingProxy.peak <= 6


def test_without_ray_the_commands_say_how_to_get_it(tiny_store: Path, tmp_path: Path) -> None:
    # `ray` unimportable, as when the extra is not installed.
    code = (
        "import sys; sys.modules['ray'] = None; from neuron_explainer.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    for args in (
        ["collate", "--out", str(tmp_path / "x.sqlite"), "--ray"],
        ["explain", str(tiny_store), "--ray"],
    ):
        run = subprocess.run(
            [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True
        )
        assert run.returncode == 2, run.stderr
        assert f"--ray needs Ray: {RAY_INSTALL}" in run.stderr
        assert "Traceback" not in run.stderr
