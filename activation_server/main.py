"""Start-up: `python -m activation_server` and `tdb serve` (same flags)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from activation_server.access import TOKEN_ENV, allowed_hosts, is_loopback
from activation_server.body_limit import DEFAULT_MAX_BODY_BYTES
from activation_server.jobs import DEFAULT_BUDGET_TOKENS, datasets_dir
from activation_server.state import DEFAULT_MAX_RESPONSE_BYTES
from activation_server.worker import DEFAULT_REQUEST_TIMEOUT_S
from neuron_explainer.models.registry import DEFAULT_MODEL


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it, and "
        "then needs --auth-token or --no-auth)",
    )
    p.add_argument(
        "--auth-token",
        default=None,
        metavar="TOKEN",
        help=f"every API request must carry `Authorization: Bearer TOKEN` (default: ${TOKEN_ENV}); "
        "the UI takes it once from ?access_token=TOKEN. Required when --host is not a loopback "
        "address",
    )
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="serve a non-loopback --host without an access token: anyone who reaches the port "
        "can use the server",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host is NAME (repeatable; *.example.org for subdomains, "
        "* for any). Bound to loopback the server answers only loopback names (127.0.0.1, "
        "localhost, [::1]), against DNS rebinding; bound elsewhere it checks Host only when given",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="registry name, Hugging Face folder or .gguf file"
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)"
    )
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")
    p.add_argument(
        "--autoencoder",
        action="append",
        default=[],
        metavar="[HOOK=]PATH",
        help="a sparse autoencoder whose latents become debugger nodes (repeatable): a SAELens "
        "folder (cfg.json + sae_weights.safetensors), an OpenAI state dict (.pt), a native folder "
        "(tdb train-sae), or a folder holding several of these. The hook point comes from the "
        "config (SAELens hook_name, native hook_name) or, for OpenAI files, from their published "
        "layout <location>/autoencoders/<layer>.pt; HOOK= sets or overrides it, e.g. "
        "blocks.6.hook_mlp_out=6.pt. Hook points: blocks.L.hook_mlp_out or blocks.L.mlp.hook_post "
        "(MLP-side latents), blocks.L.hook_attn_out (attention-side); one per side and layer",
    )
    p.add_argument(
        "--no-model",
        action="store_true",
        help="serve without a model (read-only dataset viewer; inference endpoints answer 503)",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="longest prompt accepted (default: the model's context length)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body accepted; larger ones are a 413, refused before they are read "
        f"whole (default {DEFAULT_MAX_BODY_BYTES:,}: 10 MiB)",
    )
    p.add_argument(
        "--max-response-mb",
        type=float,
        default=DEFAULT_MAX_RESPONSE_BYTES / 2**20,
        metavar="MB",
        help="largest response a request may ask for, estimated before it runs (node table and "
        "token views); larger ones are a 413 naming the fields to lower (default "
        f"{DEFAULT_MAX_RESPONSE_BYTES / 2**20:g} MiB; 0: no cap)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT_S,
        metavar="SECONDS",
        help="a request not answered this long after it was queued for the model is a 504, and "
        f"its work is dropped or stopped (default {DEFAULT_REQUEST_TIMEOUT_S:g}; 0: no deadline)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser pages from this origin (repeatable), e.g. http://localhost:5173",
    )
    p.add_argument(
        "--max-merged-rows",
        type=int,
        default=16,
        help="concurrent debugger requests waiting together are merged into one batch of at most "
        "this many rows (1: no merging)",
    )
    p.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="[FAMILY=]PATH|URL",
        help="a collated dataset to serve (repeatable): a store file (tdb collate), or a TDB JSON "
        "layout in a folder or at an http(s) URL, e.g. attention_head=https://host/heads/",
    )
    p.add_argument(
        "--explanations",
        action="append",
        default=[],
        metavar="[FAMILY=]PATH|URL",
        help="TDB's published explanation files to serve beside the datasets (repeatable): a "
        "folder or http(s) URL of <layer>/<index>.jsonl for FAMILY (default mlp_neuron), or a "
        "folder of <family>/<layer>/<index>.jsonl as tdb export-explanations writes; their "
        "explanations join the stores' in node tables, /neuron_record and /existing_explanations",
    )
    p.add_argument(
        "--auto-dataset",
        action="store_true",
        help="serve the model's default store, building it in the background when it is not "
        f"complete (the default corpus, in {datasets_dir()}; progress at GET /jobs)",
    )
    p.add_argument(
        "--auto-dataset-tokens",
        type=int,
        default=DEFAULT_BUDGET_TOKENS,
        help=f"token budget of --auto-dataset (default {DEFAULT_BUDGET_TOKENS:,})",
    )
    p.add_argument(
        "--no-auto-explain",
        dest="auto_explain",
        action="store_false",
        help="with --auto-dataset: do not explain the finished store's components with the no-LLM "
        "baseline (by default a second background job does, once; tdb explain)",
    )
    p.add_argument("--ui-dir", default=None, help="built UI files (default neuron_viewer/dist)")
    p.add_argument("--log-level", default="info")


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from activation_server.app import create_app
    from activation_server.state import Settings

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    auth_token = access_token(args)  # before loading anything: a refusal is immediate
    model = None
    if not args.no_model:
        from neuron_explainer.models import load_model_reporting

        model = load_model_reporting(args.model, device=args.device, dtype=args.dtype)
        from neuron_explainer.models.autoencoder_formats import load_autoencoder_specs

        for ae in load_autoencoder_specs(args.autoencoder, device=model.device):
            model.attach_autoencoder(ae)
            print(f"attached {ae.extra_repr()} from {ae.cfg.metadata['source']}", file=sys.stderr)
    elif args.autoencoder:
        raise ValueError("--autoencoder needs a model (it cannot be used with --no-model)")
    settings = Settings(
        max_prompt_tokens=args.max_prompt_tokens,
        cors_origins=list(args.cors_origin),
        max_merged_rows=args.max_merged_rows,
        max_body_bytes=args.max_body_bytes,
        max_response_bytes=int(args.max_response_mb * 2**20) if args.max_response_mb > 0 else None,
        request_timeout_s=args.request_timeout if args.request_timeout > 0 else None,
        ui_dir=args.ui_dir,
        datasets=list(args.dataset),
        explanations=list(args.explanations),
        auto_dataset_model=args.model if args.auto_dataset and not args.no_model else None,
        auto_dataset_tokens=args.auto_dataset_tokens,
        auto_explain=args.auto_explain,
        allowed_hosts=allowed_hosts(args.host, args.allowed_host),
        auth_token=auth_token,
    )
    app = create_app(model, settings)
    print(f"serving on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    if auth_token:
        print(
            "API requests need `Authorization: Bearer TOKEN` (the --auth-token); open the UI once "
            f"at http://{args.host}:{args.port}/?access_token=TOKEN",
            file=sys.stderr,
            flush=True,
        )
    elif not is_loopback(args.host):
        print(
            f"WARNING: --no-auth: anyone who can reach port {args.port} of this machine can run "
            "the model, read the datasets and start jobs",
            file=sys.stderr,
            flush=True,
        )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0


def access_token(args: argparse.Namespace) -> str | None:
    """The token API requests must carry: --auth-token, else $TDB_AUTH_TOKEN; none with
    --no-auth. A non-loopback --host without either is refused (ValueError: exit 2)."""
    if args.no_auth:
        if args.auth_token:
            raise ValueError("--auth-token and --no-auth contradict each other: give one")
        return None
    token = args.auth_token if args.auth_token is not None else os.environ.get(TOKEN_ENV) or None
    if token is not None and not token.strip():
        raise ValueError("--auth-token is empty")
    token = token.strip() if token is not None else None
    if token is None and not is_loopback(args.host):
        raise ValueError(
            f"--host {args.host} exposes the server beyond this machine: give it an access token "
            f"(--auth-token TOKEN or {TOKEN_ENV}=TOKEN), or --no-auth to serve without one"
        )
    return token


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m activation_server", description="The transformer debugger's HTTP API"
    )
    add_serve_args(parser)
    args = parser.parse_args(argv)
    from neuron_explainer.datasets import DatasetError
    from neuron_explainer.models import ModelNotFoundError, TokenizerError

    try:
        return serve(args)
    except (ModelNotFoundError, TokenizerError, DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
