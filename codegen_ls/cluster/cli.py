"""``codegen-ls cluster serve``: the command line of the Ray Serve application (Ray imported only when run)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from codegen_ls.errors import CodegenLsError


def add_parser(sub: Any, log_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``cluster serve`` to the main parser's subcommands."""
    c = sub.add_parser(
        "cluster", help="serve the engine to a team: a Ray Serve application (pip install 'codegen-ls[cluster]')"
    )
    csub = c.add_subparsers(dest="cluster_command", metavar="ACTION")
    s = csub.add_parser(
        "serve",
        help="OpenAI-compatible /v1/completions and llama.cpp /infill over N engine replicas",
        description="Run the engine as a Ray Serve application: POST /v1/completions (OpenAI, with "
        "log-probs and cached_tokens), POST /infill (llama.cpp), GET /v1/models, /health. "
        "Requests with the same x-session-id header go to the replica holding that "
        "document's KV cache. Ctrl-C drains the replicas and stops.",
    )
    s.add_argument(
        "--model", metavar="DIR", help="model directory (default: $CODEGEN_LS_MODEL, else the embedded model)"
    )
    s.add_argument("--replicas", type=int, default=2, help="engine replicas (default 2)")
    s.add_argument("--threads", type=int, default=1, help="onnxruntime threads (= CPUs) per replica (default 1)")
    s.add_argument(
        "--cache-mb",
        type=int,
        default=512,
        help="memory for each replica's document KV caches (default 512; docs/scaling.md sizes it)",
    )
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for the team)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--autoscale", metavar="MIN:MAX", help="autoscale between MIN and MAX replicas on ongoing requests")
    s.add_argument(
        "--target-ongoing", type=float, default=2.0, help="autoscaling target of ongoing requests per replica"
    )
    s.add_argument(
        "--max-ongoing", type=int, default=8, help="most requests a replica holds before the router spills over"
    )
    s.add_argument(
        "--api-key-env",
        metavar="NAME",
        default="",
        help="require 'Authorization: Bearer <key>', the key read from this environment variable",
    )
    s.add_argument("--address", help="join this Ray cluster (ray start --head ... elsewhere) instead of starting one")
    s.add_argument("--num-cpus", type=int, help="CPUs of the Ray instance started here (default: all)")
    log_args(s)


def run(args: argparse.Namespace) -> int:
    if args.cluster_command != "serve":
        raise CodegenLsError("usage: codegen-ls cluster serve --model DIR [--replicas N] [--host H --port P]")
    try:
        from codegen_ls.cluster.app import ClusterOptions, serve_forever
    except ImportError as exc:
        raise CodegenLsError(f"the cluster needs Ray Serve: pip install 'codegen-ls[cluster]' ({exc})") from None
    from codegen_ls.engine.modeldir import resolve_model_dir

    low = high = None
    if args.autoscale:
        lo, _, hi = args.autoscale.partition(":")
        if not (lo.isdigit() and hi.isdigit() and 0 < int(lo) <= int(hi)):
            raise CodegenLsError(f"--autoscale expects MIN:MAX (1 <= MIN <= MAX), got '{args.autoscale}'")
        low, high = int(lo), int(hi)
    key = ""
    if args.api_key_env:
        key = os.environ.get(args.api_key_env, "")
        if not key:
            raise CodegenLsError(f"--api-key-env {args.api_key_env}: that environment variable is empty")
    options = ClusterOptions(
        str(resolve_model_dir(args.model)),
        replicas=args.replicas,
        threads=args.threads,
        min_replicas=low,
        max_replicas=high,
        target_ongoing_requests=args.target_ongoing,
        max_ongoing_requests=args.max_ongoing,
        api_key=key,
        cache_mb=args.cache_mb,
    )
    return serve_forever(options, args.host, args.port, address=args.address, num_cpus=args.num_cpus)
