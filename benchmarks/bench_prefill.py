"""Where a cold prompt's time goes, against what this CPU's int8 arithmetic can do.

For an exported model (``--model DIR``), a cold prefill of ``--tokens`` tokens (a fresh document
key each time, so nothing is reused) is timed at each prefill chunk size in ``--chunks`` (the
engine's default is 128), medians of ``--reps``. Printed per chunk size: ms, the multiply-
accumulates of the layers' weight matrices (the int8 ``MatMulInteger`` work: 12 d^2 a token and
layer) and of the prompt path's attention (fp32 MatMuls over the cache), and MAC/s.

Then the limit: one ``MatMulInteger`` node (uint8 activations x int8 weights, as the export
writes them) of a layer's shapes at the chunk's rows, alone in a session on the same threads:
what onnxruntime's int8 GEMM reaches here (on CPUs with AMX-INT8 its MLAS kernels use the tile
unit, far above the AVX-512 VNNI units' ~0.3 T MAC/s on 2 cores). And onnxruntime's own profile
of one prefill (``--profile``): time per op type, and the time outside ``session.run`` (the
Python side: feeds, the prompt chunks' keys and values copied into the cache).

    python benchmarks/bench_prefill.py --model /work/cache/model-350m --tokens 1022 --chunks 64,128,256,512 --profile
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sysconfig
import time
from pathlib import Path

import numpy as np

import codegen_ls  # noqa: F401 - before onnxruntime loads: it turns onnxruntime's telemetry off


def weight_macs(d: int, layers: int, tokens: int) -> float:
    return 12.0 * d * d * layers * tokens  # qkv 3d^2, out d^2, fc_in 4d^2, fc_out 4d^2 per token and layer


def attention_macs(d: int, layers: int, tokens: int, chunk: int) -> float:
    """Scores and weighted values of the prompt path: each chunk's rows against all keys so far."""
    total = 0.0
    for start in range(0, tokens, chunk):
        rows = min(chunk, tokens - start)
        total += 2.0 * rows * (start + rows) * d  # Q K^T and P V over all heads
    return total * layers


def gemm_rate(rows: int, k: int, n: int, threads: int, reps: int = 20) -> tuple[float, float]:
    """MAC/s of one MatMulInteger (uint8 [rows, k] x int8 [k, n]) in its own session: by the
    wall clock, and by the process's CPU time over its threads (medians)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (k, n), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w", "az"], ["y"])],
        "gemm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [rows, n])],
        [onnx.numpy_helper.from_array(w, "w"), onnx.numpy_helper.from_array(np.array(128, np.uint8), "az")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    a = rng.integers(0, 256, (rows, k), dtype=np.uint8)
    for _ in range(3):
        sess.run(None, {"a": a})
    times, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        sess.run(None, {"a": a})
        times.append(time.perf_counter() - t0)
        cpu.append((time.process_time() - c0) / threads)
    return rows * k * n / statistics.median(times), rows * k * n / max(1e-9, statistics.median(cpu))


def prompt_ids(engine: object, tokens: int) -> list[int]:
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    ids = engine.tokenizer.encode(text)  # type: ignore[attr-defined]
    return [engine.eos_id] + ids[: tokens - 1]  # type: ignore[attr-defined]


def time_prefill(engine: object, ids: list[int], reps: int) -> tuple[float, float, float]:
    """Medians: ms of the cold prefill, ms of it inside session.run, and the process's CPU ms
    (all threads) for it: on a machine busy with other work, CPU ms / threads is what the prefill
    would take with the cores to itself."""
    totals, inside, cpu = [], [], []
    for i in range(reps + 1):
        key = f"cold-{time.perf_counter_ns()}"
        s0 = engine.session_ms  # type: ignore[attr-defined]
        t0, c0 = time.perf_counter(), time.process_time()
        engine.forward(ids, doc_key=key)  # type: ignore[attr-defined]
        t1, c1 = time.perf_counter(), time.process_time()
        engine.cache.drop(key)  # type: ignore[attr-defined]
        if i:  # the first run warms the allocator
            totals.append((t1 - t0) * 1000)
            inside.append(engine.session_ms - s0)  # type: ignore[attr-defined]
            cpu.append((c1 - c0) * 1000)
    return statistics.median(totals), statistics.median(inside), statistics.median(cpu)


def profile(model: str, ids: list[int], chunk: int, threads: int) -> None:
    """One cold prefill with onnxruntime's profiler on: ms per op type."""
    import onnxruntime as ort

    from codegen_ls.engine.engine import Engine, EngineOptions

    original = ort.SessionOptions

    def profiling() -> ort.SessionOptions:
        so = original()
        so.enable_profiling = True
        so.profile_file_prefix = "/tmp/codegen-ls-prefill"
        return so

    ort.SessionOptions = profiling  # type: ignore[misc]
    try:
        engine = Engine(model, EngineOptions(threads=threads, prefill_chunk=chunk))
    finally:
        ort.SessionOptions = original  # type: ignore[misc]
    engine.forward(ids, doc_key="warm")
    engine.cache.drop("warm")
    path = engine.session.end_profiling()
    engine.session = None  # type: ignore[assignment]
    # only the last prefill: events after the last "model_run" start minus one prefill's runs
    events = [e for e in json.loads(Path(path).read_text()) if e.get("cat") == "Node"]
    runs = [e for e in json.loads(Path(path).read_text()) if e.get("name") == "model_run"]
    per_prefill = len(range(0, len(ids), chunk))
    start = runs[-per_prefill]["ts"] if len(runs) >= per_prefill else 0
    by_op: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e["ts"] >= start and e["name"].endswith("_kernel_time"):
            by_op[e["args"].get("op_name", "?")] += e["dur"] / 1000
    run_ms = sum(r["dur"] for r in runs[-per_prefill:]) / 1000
    total = sum(by_op.values())
    print(
        f"\nonnxruntime profile, one cold prefill of {len(ids)} tokens in chunks of {chunk} ({per_prefill} runs, "
        f"{run_ms:.0f} ms in session.run, of which {total:.0f} ms in kernels):"
    )
    print("| op | ms | share |\n| --- | ---: | ---: |")
    for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:12]:
        print(f"| {op} | {ms:.1f} | {ms / max(total, 1e-9):.0%} |")
    os.unlink(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=1022)
    ap.add_argument("--chunks", default="128", help="prefill chunk sizes to time (comma-separated)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="also onnxruntime's profile at the first chunk size")
    args = ap.parse_args()
    from codegen_ls.engine.engine import Engine, EngineOptions

    threads = args.threads or os.cpu_count() or 1
    chunks = [int(c) for c in args.chunks.split(",")]
    print(f"{args.model}, {args.tokens}-token cold prefill, {threads} threads, {os.cpu_count()} cores")
    print(
        "| chunk | ms | in session.run ms | CPU ms / threads | weight MACs (G) | attention MACs (G) | T MAC/s "
        "(weights) "
        "| T MAC/s (all) | T MAC/s (all) at CPU ms / threads |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    d = layers = 0
    for chunk in chunks:
        engine = Engine(args.model, EngineOptions(threads=threads, prefill_chunk=chunk))
        d, layers = engine.manifest.n_head * engine.manifest.head_dim, engine.manifest.n_layer
        ids = prompt_ids(engine, args.tokens)
        ms, inside, cpu = time_prefill(engine, ids, args.reps)
        own = cpu / threads
        wm, am = weight_macs(d, layers, len(ids)), attention_macs(d, layers, len(ids), chunk)
        print(
            f"| {chunk} | {ms:.0f} | {inside:.0f} | {own:.0f} | {wm / 1e9:.0f} | {am / 1e9:.1f} | {wm / ms / 1e9:.3f} "
            "| "
            f"{(wm + am) / ms / 1e9:.3f} | {(wm + am) / own / 1e9:.3f} |",
            flush=True,
        )
        del engine
    print("\nonnxruntime's int8 GEMM alone (MatMulInteger, uint8 x int8), this layer's shapes:")
    print("| rows | k x n | T MAC/s | T MAC/s at CPU time / threads |\n| ---: | --- | ---: | ---: |")
    for rows in sorted({*chunks, 512}):
        for k, n in ((d, 3 * d), (d, 4 * d), (4 * d, d)):
            wall, own = gemm_rate(rows, k, n, threads)
            print(f"| {rows} | {k} x {n} | {wall / 1e12:.3f} | {own / 1e12:.3f} |", flush=True)
    if args.profile:
        engine = Engine(args.model, EngineOptions(threads=threads, prefill_chunk=chunks[0]))
        ids = prompt_ids(engine, args.tokens)
        del engine
        profile(args.model, ids, chunks[0], threads)


if __name__ == "__main__":
    main()
