"""`tdb` commands for collated datasets: collate, export-tdb, merge-datasets, dataset-info.

tdb collate --out smollm2.tdb.sqlite --tokens 100000
tdb collate --out /shared/big.sqlite --tokens 100000000 --ray   # one Ray task per shard
tdb export-tdb smollm2.tdb.sqlite tdb-json/
tdb merge-datasets all.sqlite shard-*.sqlite
tdb dataset-info smollm2.tdb.sqlite
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuron_explainer.cli.models import load_from_args
from neuron_explainer.models.registry import DEFAULT_MODEL
from neuron_explainer.progress import at_most_every

if TYPE_CHECKING:
    from neuron_explainer.datasets.store import DatasetMetadata


def _csv(text: str | None) -> list[str] | None:
    return None if not text else [part.strip() for part in text.split(",") if part.strip()]


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of `tdb collate` that a store records (less --shard)."""
    from neuron_explainer.datasets.families import FAMILIES, LatentFamily

    latent = [f for f in _csv(args.families) or [] if isinstance(FAMILIES.get(f), LatentFamily)]
    if latent and not args.autoencoder:
        raise ValueError(f"collating {', '.join(latent)} needs --autoencoder PATH")
    return dict(
        n_tokens=args.tokens,
        families=_csv(args.families),
        batch_size=args.batch_size,
        k=args.k,
        random_sample_size=args.random_sample_size,
        quantile_sample_size=args.quantile_sample_size,
        window_length=args.window_length,
        calibration_windows=args.calibration_windows,
        seed=args.seed,
    )


def cmd_collate(args: argparse.Namespace) -> int:
    if args.ray is not None:
        return _collate_on_ray(args)
    if args.shards is not None or args.keep_shards:
        raise ValueError("--shards and --keep-shards go with --ray")

    import torch

    from neuron_explainer.datasets.collate import check_rerun, collate, parse_layers, parse_shard
    from neuron_explainer.datasets.corpus import load_corpus
    from neuron_explainer.datasets.latents import collate_latents, load_autoencoders
    from neuron_explainer.datasets.store_writer import StoreLock
    from neuron_explainer.models.loading import model_name

    settings = _settings(args) | dict(shard=parse_shard(args.shard) if args.shard else None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    # Everything that can fail or finish without the model does so before it loads (~15 s for
    # the default): a second writer of the store, a corpus that cannot be read, a store that is
    # complete already or was started with other settings.
    with StoreLock(args.out) as lock:
        corpus = load_corpus(args.corpus, text_field=args.text_field)
        if not args.autoencoder:  # a latent store's settings depend on its autoencoders
            dtype = str(getattr(torch, args.dtype or "float32")).removeprefix("torch.")
            done = check_rerun(
                args.out, model_name(args.model), dtype, corpus, layers=args.layers, **settings
            )
            if done is not None:
                print(f"collate: {args.out} is already complete; nothing to do", file=sys.stderr)
                _print_summary(args.out, done)
                return 0
        model = load_from_args(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        options: dict[str, Any] = settings | dict(
            layers=parse_layers(args.layers, model.cfg.n_layers) if args.layers else None,
            commit_every_batches=args.commit_every,
            commit_every_seconds=args.commit_seconds,
            progress=not (args.quiet or args.progress_json),
            on_progress=json_progress() if args.progress_json else None,
            lock=lock,
        )
        if args.autoencoder:
            autoencoders = load_autoencoders(args.autoencoder, model)
            print(f"loaded {len(autoencoders)} autoencoders", file=sys.stderr)
            meta = collate_latents(model, corpus, args.out, autoencoders, **options)
        else:
            meta = collate(model, corpus, args.out, **options)
    _print_summary(args.out, meta)
    return 0


def _collate_on_ray(args: argparse.Namespace) -> int:
    """`tdb collate --ray`: one Ray task per shard, then the merge (datasets/distributed.py)."""
    from neuron_explainer.datasets.distributed import (
        ShardJob,
        collate_on_ray,
        connect,
        print_summary,
        shard_paths,
        task_resources,
    )

    if args.shard:
        raise ValueError(
            "--shard and --ray: --ray cuts the windows into shards itself (--shards N)"
        )
    if args.shards is not None and args.shards < 1:
        raise ValueError(f"--shards {args.shards}: at least 1")
    settings = _settings(args)
    ray = connect(args.ray, "tdb collate")
    resources = task_resources(ray, args.device, args.threads)
    n_shards = args.shards or resources.slots(ray)
    job = ShardJob(
        model=shared_path(args.model),
        corpus=args.corpus if args.corpus == "default" else shared_path(args.corpus),
        text_field=args.text_field,
        layers=args.layers,
        autoencoders=tuple(_shared_autoencoder(a) for a in args.autoencoder),
        device=resources.device,
        dtype=args.dtype,
        threads=args.threads,
        settings=settings,
        commit_every_batches=args.commit_every,
        commit_every_seconds=args.commit_seconds,
    )
    show = not (args.quiet or args.progress_json)
    if show:
        cluster = ray.cluster_resources()
        gpu = f", {resources.num_gpus} GPU" if resources.num_gpus else ""
        print(
            f"collate: {n_shards} shards on a Ray cluster of {cluster.get('CPU', 0):g} CPUs and "
            f"{cluster.get('GPU', 0):g} GPUs, each task {resources.num_cpus} CPU{gpu} "
            f"({resources.device}); shard stores in "
            f"{shard_paths(Path(args.out).resolve(), n_shards)[0].parent}",
            file=sys.stderr,
        )
    run = collate_on_ray(
        job,
        args.out,
        n_shards,
        resources,
        keep_shards=args.keep_shards,
        progress=show,
        on_progress=json_progress() if args.progress_json else None,
    )
    if run.nothing_to_do:
        print(f"collate: {args.out} is already complete; nothing to do", file=sys.stderr)
    elif not args.quiet:
        print_summary(run)
    _print_summary(args.out, run.metadata)
    return 0


def shared_path(spec: str) -> str:
    """An existing local path made absolute (Ray workers do not run in this folder); anything
    else (a registry name) as it is."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _shared_autoencoder(spec: str) -> str:
    from neuron_explainer.models.autoencoder_formats import parse_autoencoder_spec

    hook, path = parse_autoencoder_spec(spec)
    return f"{hook}={shared_path(str(path))}" if hook else shared_path(str(path))


def _print_summary(out: str, meta: DatasetMetadata) -> None:
    print(
        f"{out}: {meta.n_tokens:,} tokens, families {', '.join(meta.families)}, "
        f"layers {_layer_ranges(meta.layers)}, status {meta.status}",
        file=sys.stderr,
    )


def json_progress() -> Callable[[int, int, float], None]:
    """Progress as one JSON object per line on stdout, for a supervising process (the server's
    background collation job reads these), at most one a second."""

    def report(done: int, total: int, rate: float) -> None:
        line = {"tokens": done, "totalTokens": total, "tokensPerSecond": round(rate, 1)}
        print(json.dumps(line), flush=True)

    return at_most_every(1.0, report)


def _layer_ranges(layers: Sequence[int]) -> str:
    parts: list[str] = []
    for layer in layers:
        if parts and parts[-1].split("-")[-1] == str(layer - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{layer}"
        else:
            parts.append(str(layer))
    return ",".join(parts)


def cmd_export_tdb(args: argparse.Namespace) -> int:
    from neuron_explainer.datasets.tdb_format import export_tdb

    layers = [int(x) for x in _csv(args.layers) or []] or None
    n = export_tdb(args.store, args.out_dir, families=_csv(args.families), layers=layers)
    print(f"wrote {n} records under {args.out_dir}", file=sys.stderr)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from neuron_explainer.datasets.latents import merge_shards

    meta = merge_shards(args.inputs, args.out)
    print(f"{args.out}: {meta.n_tokens:,} tokens, windows {meta.window_ranges}", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from neuron_explainer.datasets.latents import stored_autoencoders
    from neuron_explainer.datasets.store import DatasetStore

    with DatasetStore(args.store) as store:
        info: dict[str, Any] = store.metadata().to_json()
        info["components"] = len(store.components())
    autoencoders = stored_autoencoders(args.store)
    if autoencoders is not None:
        info["autoencoders"] = autoencoders
    print(json.dumps(info, indent=2))
    return 0


def add_parser(subparsers: Any) -> None:
    """Register `collate`, `export-tdb`, `merge-datasets` and `dataset-info` on an argparse
    subparsers object (each sets `fn`, a function (args) -> exit code)."""
    p = subparsers.add_parser(
        "collate",
        help="build a collated activation dataset (top-activating excerpts per component)",
        description="Stream a corpus through a model and keep, per component, the top-k "
        "excerpts, random samples and statistics in a SQLite store. Rerun the same command to "
        "resume an interrupted run. See datasets.md.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="registry name, HF folder or .gguf file")
    p.add_argument(
        "--corpus",
        default="default",
        help="'default' (Jane Austen, from Debian), a .txt file, a folder of .txt, or .jsonl",
    )
    p.add_argument("--text-field", default="text", help="JSONL field holding the text")
    p.add_argument("--out", required=True, help="the SQLite store to write (or resume)")
    p.add_argument("--tokens", type=int, default=None, help="token budget (default: all)")
    p.add_argument("--layers", default=None, help="e.g. 0,1,5-7 (default: all)")
    p.add_argument(
        "--families",
        default=None,
        help="comma-separated: mlp_neuron, attention_head, mlp_autoencoder_latent, "
        "attention_autoencoder_latent (default: mlp_neuron,attention_head; with --autoencoder, "
        "the latent families of the autoencoders given)",
    )
    p.add_argument(
        "--autoencoder",
        action="append",
        default=[],
        metavar="[HOOK=]PATH",
        help="autoencoders whose latents to collate (repeatable), as for `tdb serve "
        "--autoencoder`: a native or SAELens folder, an OpenAI .pt, or a folder holding several "
        "(e.g. what `make autoencoders` writes); --layers then defaults to the layers they cover",
    )
    p.add_argument("--batch-size", type=int, default=32, help="windows per forward pass")
    p.add_argument("--k", type=int, default=20, help="top-activating excerpts per component")
    p.add_argument("--random-sample-size", type=int, default=20)
    p.add_argument("--quantile-sample-size", type=int, default=5, help="excerpts per bin")
    p.add_argument("--window-length", type=int, default=64, help="tokens per excerpt")
    p.add_argument("--calibration-windows", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="seed of the random samples")
    p.add_argument("--shard", default=None, help="I/N: process the I-th of N window ranges")
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="collate on a Ray cluster, one task per shard, then merge into --out: the cluster at "
        "ADDRESS (HOST:PORT), or without one the cluster ray.init() finds ($RAY_ADDRESS, `ray "
        "start` on this machine) or a new local one. Needs the ray extra; see datasets.md",
    )
    p.add_argument(
        "--shards",
        type=int,
        default=None,
        help="with --ray: the number of shards (default: as many as the cluster runs at once)",
    )
    p.add_argument(
        "--keep-shards",
        action="store_true",
        help="with --ray: keep the shard stores (OUT.shards/) after the merge",
    )
    p.add_argument("--commit-every", type=int, default=None, help="commit every N batches")
    p.add_argument(
        "--commit-seconds",
        type=float,
        default=60.0,
        help="commit every S seconds (default), or every 10x the last commit's duration if longer",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if any)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument(
        "--progress-json",
        action="store_true",
        help="progress as JSON lines on stdout ({tokens, totalTokens, tokensPerSecond})",
    )
    p.set_defaults(fn=cmd_collate)

    p = subparsers.add_parser(
        "export-tdb", help="write a store as TDB JSON files (<family>/<layer>/<index>.json)"
    )
    p.add_argument("store")
    p.add_argument("out_dir")
    p.add_argument("--families", default=None)
    p.add_argument("--layers", default=None, help="comma-separated layer indices")
    p.set_defaults(fn=cmd_export_tdb)

    p = subparsers.add_parser("merge-datasets", help="merge complete shard stores into one")
    p.add_argument("out")
    p.add_argument("inputs", nargs="+")
    p.set_defaults(fn=cmd_merge)

    p = subparsers.add_parser("dataset-info", help="print a store's metadata as JSON")
    p.add_argument("store")
    p.set_defaults(fn=cmd_info)
