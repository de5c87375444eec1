"""Requests/s and latency of ``codegen-ls cluster serve`` per replica: keystroke replays over HTTP.

Ray is started here (``--cpus``, a 200 MB object store), the application deployed with each
``--replicas`` count (``--threads`` onnxruntime threads, and as many CPUs, per replica), and
``--concurrency`` simulated developers replay keystrokes at once, closed loop: each has its own
document (``x-session-id``), a prompt of about ``--prompt-tokens`` tokens of a stdlib module, and
sends its next request when the previous one is answered, the prompt one character longer each
time (a keystroke: the replica's KV cache holds all but the last token or two). Each request asks
for ``--n`` candidates of up to ``--max-tokens`` tokens (greedy + samples from one prefill, as the
language server's defaults do, capped by ``--max-tokens``). The first (cold) request of every
developer is left out of the figures.

Also printed: the same replay on an in-process engine with the same threads (no Ray, no HTTP), so
the serving overhead per request is the difference of the two at concurrency 1.

    python benchmarks/bench_cluster.py --model models/codegen-ls-small --replicas 1,2 --concurrency 1,2,4,8
    python benchmarks/bench_cluster.py --model /work/cache/model-350m --replicas 1,2 --concurrency 1,2,4 --keystrokes 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODULES = [
    "argparse",
    "json/decoder",
    "logging/__init__",
    "email/message",
    "http/client",
    "csv",
    "shutil",
    "tarfile",
    "zipfile/__init__",
    "pathlib/_local",
    "textwrap",
    "difflib",
    "calendar",
    "pprint",
    "ftplib",
    "smtplib",
]


def prompts(tokenizer: object, n: int, tokens: int) -> list[str]:
    """One prompt per developer: the start of a stdlib module, about ``tokens`` tokens."""
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for i in range(n):
        name = MODULES[i % len(MODULES)]
        path = lib / f"{name}.py"
        if not path.exists():
            path = lib / "argparse.py"
        text = path.read_text(encoding="utf-8")[i // len(MODULES) * 500 :]
        ids = tokenizer.encode(text)[:tokens]  # type: ignore[attr-defined]
        out.append(tokenizer.decode(ids))  # type: ignore[attr-defined]
    return out


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def replay(send: object, text: str, keystrokes: int) -> list[float]:
    """Latencies (ms) of one developer's keystrokes after a cold first request."""
    cut = len(text) - keystrokes - 1
    send(text[:cut])  # type: ignore[operator]  # cold: not counted
    lat = []
    for k in range(1, keystrokes + 1):
        t0 = time.perf_counter()
        send(text[: cut + k])  # type: ignore[operator]
        lat.append((time.perf_counter() - t0) * 1000)
    return lat


def run_load(make_send: object, texts: list[str], concurrency: int, keystrokes: int) -> tuple[float, list[float]]:
    """(requests/s, latencies) of ``concurrency`` developers replaying at once."""
    barrier = threading.Barrier(concurrency)
    results: list[list[float]] = [[] for _ in range(concurrency)]
    spans: list[float] = [0.0] * concurrency

    def dev(i: int) -> None:
        send = make_send(f"dev-{i}-{time.monotonic_ns()}")  # type: ignore[operator]
        cut = len(texts[i]) - keystrokes - 1
        send(texts[i][:cut])  # cold, before the clock starts
        barrier.wait()
        t0 = time.perf_counter()
        lat = []
        for k in range(1, keystrokes + 1):
            t1 = time.perf_counter()
            send(texts[i][: cut + k])
            lat.append((time.perf_counter() - t1) * 1000)
        spans[i] = time.perf_counter() - t0
        results[i] = lat

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(dev, range(concurrency)))
    all_lat = [x for r in results for x in r]
    return len(all_lat) / max(spans), all_lat


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO / "models" / "codegen-ls-small"))
    p.add_argument("--replicas", default="1,2")
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--keystrokes", type=int, default=16, help="timed keystrokes per developer")
    p.add_argument("--prompt-tokens", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--skip-local", action="store_true")
    args = p.parse_args()
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    for name in ("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"):
        os.environ.setdefault(name, "60")  # a loaded machine: Serve's 5-10 s would kill a slow-starting proxy
    from codegen_ls.engine.engine import Engine, EngineOptions
    from codegen_ls.engine.remote import HttpClient

    concurrency = [int(c) for c in args.concurrency.split(",")]
    engine = Engine(args.model, EngineOptions(threads=args.threads))
    texts = prompts(engine.tokenizer, max(concurrency), args.prompt_tokens)
    body = {"max_tokens": args.max_tokens, "n": args.n, "temperature": 0.8, "heal": True}
    rows = []
    print(
        f"model {args.model}: prompts of {args.prompt_tokens} tokens, {args.keystrokes} keystrokes per developer, "
        f"n={args.n}, max_tokens={args.max_tokens}, {args.threads} thread(s) per replica, {os.cpu_count()} cores"
    )
    if not args.skip_local:
        lock = threading.Lock()

        def local_send(session: str):  # one engine, one request at a time, as one replica runs them
            def send(prompt: str) -> None:
                with lock:
                    engine.generate(prompt, doc_key=session, n=args.n, max_new_tokens=args.max_tokens, heal=True)

            return send

        for c in concurrency:
            rps, lat = run_load(local_send, texts, c, args.keystrokes)
            rows.append(("in-process engine", c, rps, lat))
            print(
                f"  in-process engine, {c} developer(s): {rps:.2f} req/s, p50 {pct(lat, 0.5):.0f} ms, p90 "
                f"{pct(lat, 0.9):.0f} ms",
                flush=True,
            )
    engine = None  # its memory back before the cluster runs

    import ray
    from ray import serve

    from codegen_ls.cluster.app import APP_NAME, ClusterOptions, build_app

    ray.init(
        num_cpus=args.cpus,
        object_store_memory=200 * 1024 * 1024,
        include_dashboard=False,
        namespace="serve",
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 8799})
        for replicas in (int(r) for r in args.replicas.split(",")):
            serve.run(
                build_app(ClusterOptions(args.model, replicas=replicas, threads=args.threads)),
                name=APP_NAME,
                route_prefix="/",
            )

            def http_send(session: str):
                client = HttpClient("http://127.0.0.1:8799")

                def send(prompt: str) -> None:
                    client.call(
                        "POST", "/v1/completions", {**body, "prompt": prompt}, timeout_ms=120_000, session=session
                    )

                return send

            floor_client, floor = HttpClient("http://127.0.0.1:8799"), []
            for _ in range(40):  # the serving floor: one token after a cached 3-token prompt
                t0 = time.perf_counter()
                floor_client.call(
                    "POST",
                    "/v1/completions",
                    {"prompt": "x = 1", "max_tokens": 1, "temperature": 0.0},
                    timeout_ms=60_000,
                    session="floor",
                )
                floor.append((time.perf_counter() - t0) * 1000)
            print(
                f"  cluster {replicas} replica(s): a 1-token request on a cached prompt takes p50 "
                f"{pct(floor[5:], 0.5):.1f} ms, "
                f"p90 {pct(floor[5:], 0.9):.1f} ms (HTTP + proxy + ingress + router + replica)",
                flush=True,
            )
            for c in concurrency:
                rps, lat = run_load(http_send, texts, c, args.keystrokes)
                rows.append((f"cluster, {replicas} replica(s)", c, rps, lat))
                print(
                    f"  cluster {replicas} replica(s), {c} developer(s): {rps:.2f} req/s, p50 {pct(lat, 0.5):.0f} ms, "
                    f"p90 {pct(lat, 0.9):.0f} ms",
                    flush=True,
                )
            serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        ray.shutdown()
    print("\n| serving | developers | requests/s | p50 ms | p90 ms | mean ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, c, rps, lat in rows:
        print(f"| {name} | {c} | {rps:.2f} | {pct(lat, 0.5):.0f} | {pct(lat, 0.9):.0f} | {statistics.mean(lat):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
