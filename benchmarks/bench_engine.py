"""Engine benchmark: transformers vs optimum ORT vs our engine; decode flatness; server-like RSS.

A random-weight CodeGen of a chosen shape (``--shape 350m`` is codegen-350M-mono's exact shape:
n_embd 1024, 20 layers, 16 heads, rotary_dim 32, vocab 51200, 2048 positions; ``--shape small``
is the embedded model's) is built and exported with our own export (int8; once per graph kind:
``optimum``, ``gqa`` and its ``-int4`` / ``-kv4`` / ``-kv8`` variants), then, in one run, with the same prompts
(Python source, tokenized with the embedded tokenizer) and the same number of new tokens (EOS is suppressed, so
every run decodes exactly ``--new-tokens``):

(a) transformers PyTorch ``generate``, fp32, the full prompt every request;
(b) optimum ``ORTModelForCausalLM.generate`` on our int8 ONNX (the optimum export);
(c) our engine, cold (empty prompt cache), per graph kind, with its greedy agreement with (a);
(d) our engine on a keystroke replay: the prompt grows by one character per request.

Then decode ms/token at growing context (and the part of it inside ``session.run``), the
floor the flatness ratio cannot go below at this machine's streaming read rate (a step reads
the whole KV cache once), and the peak RSS of a fresh process that only loads the engine and
generates 3 candidates at 2048 tokens of context. ``gqa`` is the default export, whose KV cache
``--kv-bits auto`` picks by the machine (4-bit where our kernel runs it with AVX-512 VNNI, else
int8; the tables say which); ``gqa-kv8`` and ``gqa-kv4`` force the int8 and the 4-bit cache;
``gqa-kv8-ort`` runs the int8 one with onnxruntime's GroupQueryAttention instead of our kernel.
Prints markdown tables (the
numbers in the README come from here). On a shared machine, ``--wait-quiet`` waits for other
processes to leave the CPUs before each measurement::

    python benchmarks/bench_engine.py --shape 350m --graphs optimum,gqa,gqa-kv8,gqa-kv8-ort,gqa-int4 --wait-quiet
    600 python benchmarks/bench_engine.py --shape small --new-tokens 8 --requests 2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from codegen_ls.engine.engine import Engine, EngineOptions  # noqa: E402

TOKENIZER = REPO / "models" / "codegen-ls-small" / "tokenizer.json"
SHAPES: dict[str, dict[str, int]] = {
    "350m": dict(n_embd=1024, n_layer=20, n_head=16, rotary_dim=32, vocab_size=51200, n_positions=2048),
    "small": dict(n_embd=384, n_layer=6, n_head=8, rotary_dim=24, vocab_size=8192, n_positions=2048),
    # codegen-2B's exact shape: an 11 GB float32 checkpoint, too big to build in memory with
    # transformers here: make it with benchmarks/make_checkpoint.py and pass --checkpoint
    "2b": dict(n_embd=2560, n_layer=32, n_head=32, rotary_dim=64, vocab_size=51200, n_positions=2048),
}
SOURCES = ["inspect.py", "dataclasses.py", "argparse.py", "typing.py", "functools.py"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def busy_fraction(seconds: float = 1.0) -> float:
    """Share of all CPUs busy (any process) over ``seconds``, from /proc/stat (0 where unreadable)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4], sum(v)  # busy (all but idle, iowait), total

    try:
        b0, t0 = sample()
        time.sleep(seconds)
        b1, t1 = sample()
    except OSError:
        return 0.0
    return (b1 - b0) / max(1, t1 - t0)


def wait_quiet(max_wait_s: float, what: str) -> None:
    """Shared machines: wait (up to ``max_wait_s``) until other processes leave the CPUs idle."""
    deadline = time.time() + max_wait_s
    while max_wait_s > 0 and time.time() < deadline:
        busy = busy_fraction()
        if busy < 0.15:
            return
        log(f"waiting for a quiet machine before {what} (CPUs {100 * busy:.0f}% busy) ...")
        time.sleep(10)


def corpus() -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    return "\n\n".join((lib / name).read_text() for name in SOURCES)


def build(shape: str, workdir: Path, variant: str, checkpoint: Path | None = None) -> tuple[Path, Path]:
    """(checkpoint dir, exported model dir) for ``variant`` (optimum, gqa, gqa-int4, gqa-kv4,
    gqa-kv8, gqa-int4-kv4; ``-ort``: the same model
    without our decode-attention kernel; ``kv4`` / ``kv8``: ``--kv-bits 4`` / ``8``, else the
    export's default, which for gqa picks by this machine), reused when built. ``checkpoint``: this
    checkpoint instead of a random one built here."""
    from codegen_ls.export.pipeline import default_kv_bits, export, random_checkpoint

    base = workdir / shape
    parts = variant.split("-")
    graph, int4 = parts[0], "int4" in parts  # "ort": an engine option
    head_dim = SHAPES[shape]["n_embd"] // SHAPES[shape]["n_head"]
    bits = 4 if "kv4" in parts else 8 if "kv8" in parts else default_kv_bits(graph, head_dim=head_dim)
    suffix = "-kv4" if bits == 4 and graph == "gqa" else ""
    src, out = checkpoint or base / "src", base / f"{'int4' if int4 else 'int8'}-{graph}{suffix}"
    if not (src / "config.json").is_file():
        log(f"building a random {shape} checkpoint in {src} ...")
        shutil.rmtree(src, ignore_errors=True)
        random_checkpoint(src, tokenizer=TOKENIZER, **SHAPES[shape])
    if not (out / "manifest.json").is_file():
        log(f"exporting {src} -> {out} ({variant}) ...")
        export(
            str(src),
            out,
            quantize_int8=True,
            force=True,
            graph=graph,
            int4=int4,
            kv_bits=bits if graph == "gqa" else 8,
        )
    return src, out


def prompts_for(engine: Engine, text: str, tokens: int, count: int) -> tuple[int, list[str]]:
    """A start offset and ``count`` prompts of about ``tokens`` tokens, each one character longer."""
    start = text.index("\ndef ") + 1
    end = start + 4 * tokens
    while len(engine.tokenizer.encode(text[start:end])) > tokens:
        end -= 16
    while len(engine.tokenizer.encode(text[start:end])) < tokens - 2:
        end += 1
    return start, [text[start : end + k] for k in range(count)]


def timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def run_transformers(
    src: Path, prompts: list[list[int]], new_tokens: int, threads: int
) -> tuple[list[float], list[list[int]]]:
    import torch
    from transformers import CodeGenForCausalLM

    torch.set_num_threads(threads)
    model = CodeGenForCausalLM.from_pretrained(str(src)).eval()
    times, tokens = [], []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            t = time.perf_counter()
            out = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
            )
            times.append((time.perf_counter() - t) * 1000)
            tokens.append([int(i) for i in out[0, len(ids) :]])
    model = None
    gc.collect()
    return times, tokens


def run_optimum(src: Path, model_dir: Path, prompts: list[list[int]], new_tokens: int, threads: int) -> list[float]:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    ort_dir = model_dir.parent / "optimum-view"  # optimum wants config.json next to model.onnx
    ort_dir.mkdir(exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        shutil.copyfile(src / name, ort_dir / name)
    if not (ort_dir / "model.onnx").exists():
        os.symlink(model_dir / "model.onnx", ort_dir / "model.onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    model = ORTModelForCausalLM.from_pretrained(ort_dir, session_options=so, use_cache=True)
    times = []
    for ids in prompts:
        x = torch.tensor([ids])
        times.append(
            timed(
                lambda: model.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    do_sample=False,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    pad_token_id=0,
                )
            )
        )
    model = None
    gc.collect()
    return times


def run_engine_cold(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[list[float], list[list[int]]]:
    times, tokens = [], []
    for i, ids in enumerate(prompts):
        engine.cache.drop(f"cold{i}")
        t = time.perf_counter()
        gen = engine.generate(ids, doc_key=f"cold{i}", n=1, max_new_tokens=new_tokens)
        times.append((time.perf_counter() - t) * 1000)
        tokens.append(gen.candidates[0].token_ids)
        engine.cache.drop(f"cold{i}")
    return times, tokens


def run_keystrokes(engine: Engine, prompts: list[str], new_tokens: int, n: int) -> tuple[list[float], int]:
    """ms per request after the first (cold) one, and the tokens fed for the whole replay."""
    key = f"replay{n}"
    engine.cache.drop(key)
    engine.generate(prompts[0], doc_key=key, n=n, max_new_tokens=new_tokens)
    fed = engine.tokens_fed
    times = [timed(lambda: engine.generate(p, doc_key=key, n=n, max_new_tokens=new_tokens)) for p in prompts[1:]]
    engine.cache.drop(key)
    return times, engine.tokens_fed - fed


def decode_flatness(
    engine: Engine, ids: list[int], contexts: list[int], new_tokens: int, rounds: int = 1
) -> list[tuple[int, float, float]]:
    """(context, ms/token end to end, ms/token inside session.run) for greedy decode at each
    context: the median over ``rounds`` rounds, each round every context in turn, so that the
    machine's drift over minutes (often more than the growth being measured, on a shared host)
    lands on every context alike. Each context's prompt stays cached between rounds."""
    times: dict[int, list[tuple[float, float]]] = {ctx: [] for ctx in contexts}
    for _ in range(rounds):
        for ctx in contexts:
            gen = engine.generate(ids[: ctx - new_tokens], doc_key=f"flat{ctx}", n=1, max_new_tokens=new_tokens)
            steps = max(1, gen.stats.steps)
            times[ctx].append((gen.stats.decode_ms / steps, gen.stats.decode_session_ms / steps))
    for ctx in contexts:
        engine.cache.drop(f"flat{ctx}")
    return [
        (ctx, float(np.median([t[0] for t in times[ctx]])), float(np.median([t[1] for t in times[ctx]])))
        for ctx in contexts
    ]


def rss_probe(model_dir: str, context: int, n: int, new_tokens: int, threads: int) -> None:
    """Run in a fresh process: load the engine, generate n candidates at ``context`` tokens."""

    def rss_mb(field: str = "VmRSS") -> float:  # VmHWM: peak; ru_maxrss would include the parent's at fork
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        return 0.0

    engine = Engine(model_dir, EngineOptions(threads=threads))
    loaded = rss_mb()
    ids = [int(t) for t in np.random.default_rng(0).integers(1, engine.tokenizer.vocab_size, context)]
    prompt = ids[: context - new_tokens]
    engine.generate(prompt, doc_key="rss", n=n, max_new_tokens=new_tokens)
    peak = rss_mb("VmHWM")
    print(
        json.dumps(
            {"loaded_mb": loaded, "after_mb": rss_mb(), "peak_mb": peak, "cache_mb": engine.cache.nbytes / 2**20}
        )
    )


def own_kernel(variant: str) -> bool:
    """Whether ``variant`` runs with our decode-attention kernel (``-ort``: onnxruntime's instead)."""
    return "ort" not in variant.split("-")


def measure_rss(
    model_dir: Path, context: int, n: int, new_tokens: int, threads: int, kernel: bool = True
) -> dict[str, float]:
    env = dict(os.environ, **({} if kernel else {"CODEGEN_LS_KERNEL": "off"}))
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--rss-probe",
            str(model_dir),
            "--context",
            str(context),
            "--n",
            str(n),
            "--new-tokens",
            str(new_tokens),
            "--threads",
            str(threads),
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def mean(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else float("nan")


def agreement(engine: Engine, prompts: list[list[int]], got: list[list[int]], ref: list[list[int]]) -> str:
    """Greedy tokens vs (a): whole sequences equal, and teacher-forced (argmax after (a)'s tokens)."""
    same = sum(g == r for g, r in zip(got, ref))
    forced = total = 0
    for i, (ids, r) in enumerate(zip(prompts, ref)):
        _, argmax, _ = engine.score(ids, r, doc_key=f"agree{i}")
        engine.cache.drop(f"agree{i}")
        forced += sum(a == b for a, b in zip(argmax, r))
        total += len(r)
    return f"vs (a): {same}/{len(ref)} sequences equal, {forced}/{total} tokens teacher-forced"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="350m")
    ap.add_argument("--workdir", type=Path, default=REPO / "build" / "bench")
    ap.add_argument(
        "--checkpoint", type=Path, help="use this checkpoint of the shape (e.g. benchmarks/make_checkpoint.py's)"
    )
    ap.add_argument(
        "--graphs",
        default="optimum,gqa",
        help="our engine's exports to run: optimum, gqa, gqa-int4, gqa-kv4, gqa-kv8, gqa-int4-kv4; "
        "gqa-ort: gqa without our decode-attention kernel",
    )
    ap.add_argument("--context", type=int, default=1024, help="prompt tokens of (a)-(d)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--requests", type=int, default=3, help="requests for (a), (b), (c)")
    ap.add_argument("--keystrokes", type=int, default=20, help="requests for (d)")
    ap.add_argument("--n", type=int, default=3, help="candidates for the RSS probe and the n-candidate replay")
    ap.add_argument("--flat-contexts", default="64,512,1024,2048")
    ap.add_argument("--flat-rounds", type=int, default=5, help="decode flatness: rounds over the contexts (medians)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip", default="", help="comma list of: torch,optimum,rss,flatness")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each measurement, wait up to this long for other processes to leave the CPUs idle",
    )
    ap.add_argument("--rss-probe", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_probe:
        rss_probe(args.rss_probe, args.context, args.n, args.new_tokens, args.threads)
        return
    skip = set(filter(None, args.skip.split(",")))
    graphs = [g for g in args.graphs.split(",") if g]
    nt = args.new_tokens
    results: dict[str, float] = {}
    notes: dict[str, str] = {}
    labels: dict[str, str] = {}
    flatness: dict[str, list[tuple[int, float, float]]] = {}
    rss: dict[str, dict[str, float]] = {}
    kv_bytes: dict[str, float] = {}
    caches: dict[str, str] = {}
    tokens: dict[str, list[list[int]]] = {}
    text = corpus()

    # the optimum export loads the whole model in float32: skipped, the first graph's model tokenizes
    src, optimum_dir = build(
        args.shape, args.workdir, "optimum" if "optimum" not in skip else graphs[0], args.checkpoint
    )
    probe = Engine(optimum_dir, EngineOptions(threads=args.threads))
    _, prompts = prompts_for(probe, text, args.context, max(args.requests, args.keystrokes + 1))
    prompt_ids = [probe.tokenizer.encode(p) for p in prompts[: args.requests]]
    del probe
    if "torch" not in skip:  # first: its tokens are the reference of the agreement column
        wait_quiet(args.wait_quiet, "(a)")
        log("(a) transformers generate ...")
        times, tokens["a"] = run_transformers(src, prompt_ids, nt, args.threads)
        results["a"], labels["a"] = mean(times), "(a) transformers PyTorch fp32 `generate`, full prompt"
    for graph in graphs:
        _, model_dir = build(args.shape, args.workdir, graph, args.checkpoint)
        engine = Engine(model_dir, EngineOptions(threads=args.threads, native_kernel=own_kernel(graph)))
        log(f"[{graph}] decode attention: {engine.attention}")
        caches[graph] = f"`{graph}`: {engine.manifest.extra.get('kv_dtype')} KV cache, {engine.attention}"
        wait_quiet(args.wait_quiet, f"[{graph}] (c)")
        log(f"[{graph}] (c) engine cold ...")
        engine.generate(prompts[0][:200], doc_key="warmup", max_new_tokens=2)
        times, tokens[f"c-{graph}"] = run_engine_cold(engine, prompt_ids, nt)
        results[f"c-{graph}"] = mean(times)
        labels[f"c-{graph}"] = f"(c) our engine, `{graph}` graph, cold cache"
        if "a" in tokens:
            notes[f"c-{graph}"] = agreement(engine, prompt_ids, tokens[f"c-{graph}"], tokens["a"])
        wait_quiet(args.wait_quiet, f"[{graph}] (d)")
        log(f"[{graph}] (d) keystroke replay ...")
        times, fed = run_keystrokes(engine, prompts[: args.keystrokes + 1], nt, 1)
        results[f"d-{graph}"] = mean(times)
        labels[f"d-{graph}"] = f"(d) our engine, `{graph}` graph, keystroke replay"
        notes[f"d-{graph}"] = (
            f"{fed / len(times):.1f} tokens fed/request (prompt + decode), p90 {np.percentile(times, 90):.0f} ms"
        )
        times, fed = run_keystrokes(engine, prompts[: args.keystrokes + 1], nt, args.n)
        results[f"d{args.n}-{graph}"] = mean(times)
        labels[f"d{args.n}-{graph}"] = f"(d) `{graph}` graph, keystroke replay, {args.n} candidates"
        notes[f"d{args.n}-{graph}"] = f"{fed / len(times):.1f} tokens fed/request"
        if "flatness" not in skip:
            wait_quiet(args.wait_quiet, f"[{graph}] flatness")
            log(f"[{graph}] decode flatness ...")
            contexts = [min(int(c), engine.context_length) for c in args.flat_contexts.split(",")]
            flatness[graph] = decode_flatness(engine, engine.tokenizer.encode(text), contexts, 32, args.flat_rounds)
            kv_bytes[graph] = kv_bytes_per_token(engine, contexts[-1])
        del engine
        gc.collect()
        if "rss" not in skip:
            wait_quiet(args.wait_quiet, f"[{graph}] RSS")
            log(f"[{graph}] RSS probe ...")
            rss[graph] = measure_rss(model_dir, engine_context(model_dir), args.n, nt, args.threads, own_kernel(graph))

    if "optimum" not in skip:
        wait_quiet(args.wait_quiet, "(b)")
        log("(b) optimum ORTModelForCausalLM.generate ...")
        results["b"] = mean(run_optimum(src, optimum_dir, prompt_ids, nt, args.threads))
        labels["b"] = "(b) optimum `ORTModelForCausalLM.generate`, our int8 ONNX"

    shape = SHAPES[args.shape]
    print(f"\n### Engine benchmark: {args.shape} shape, random weights, int8 (int4 where noted)\n")
    print(
        f"Shape {shape}. {len(prompt_ids[0])}-token prompts, {nt} new tokens (greedy, 1 candidate unless "
        f"noted), {args.threads} threads on {os.cpu_count()} cores.\n"
    )
    print("KV caches and decode attention: " + "; ".join(caches.values()) + ".\n")
    print("| run | ms/request | (a) / this | (b) / this | notes |")
    print("|---|---:|---:|---:|---|")
    for key in ["a", "b"] + [k for k in results if k not in ("a", "b")]:
        if key not in results:
            continue
        ms = results[key]
        ra = f"{results['a'] / ms:.1f}x" if "a" in results else "-"
        rb = f"{results['b'] / ms:.1f}x" if "b" in results else "-"
        print(f"| {labels[key]} | {ms:.0f} | {ra} | {rb} | {notes.get(key, '')} |")

    if flatness:
        print(
            f"\nDecode (32 new tokens, greedy) at growing context: ms/token end to end, and inside `session.run` "
            f"(medians of {args.flat_rounds} rounds over the contexts).\n"
        )
        print("| context tokens | " + " | ".join(f"`{g}` ms/token | `{g}` in session.run" for g in flatness) + " |")
        print("|---:|" + "---:|---:|" * len(flatness))
        for i, (ctx, *_) in enumerate(next(iter(flatness.values()))):
            print(
                f"| {ctx} | "
                + " | ".join(f"{flatness[g][i][1]:.1f} | {flatness[g][i][2]:.1f}" for g in flatness)
                + " |"
            )
    for graph, r in rss.items():
        print(
            f"\nServer-like RSS, `{graph}` graph ({args.n} candidates, {engine_context(optimum_dir)} tokens of "
            f"context, fresh process): {r['loaded_mb']:.0f} MB after load, peak {r['peak_mb']:.0f} MB, "
            f"{r['after_mb']:.0f} MB after (prompt cache {r['cache_mb']:.0f} MB)."
        )
    print_targets(graphs, results, flatness, rss)
    if kv_bytes:
        print_bandwidth_floor(flatness, kv_bytes)
    print(
        f"\nCommand: `python benchmarks/bench_engine.py {' '.join(sys.argv[1:])}` "
        f"(load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())})"
    )


def print_targets(
    graphs: list[str],
    results: dict[str, float],
    flatness: dict[str, list[tuple[int, float, float]]],
    rss: dict[str, dict[str, float]],
) -> None:
    """The engine issue's targets on this machine, per graph: measured value, then met or not."""
    rows = []
    for g in graphs:
        d = results.get(f"d-{g}")
        if d and "a" in results:
            rows.append((g, "keystroke replay >= 15x (a)", f"{results['a'] / d:.1f}x", results["a"] / d >= 15))
        if d and "b" in results:
            rows.append((g, "keystroke replay >= 3x (b)", f"{results['b'] / d:.1f}x", results["b"] / d >= 3))
        if flatness.get(g):
            first, last = flatness[g][0], flatness[g][-1]
            ratio = last[1] / first[1]
            rows.append((g, f"ms/token at {last[0]} <= 1.2x at {first[0]}", f"{ratio:.2f}x", ratio <= 1.2))
            overhead = max(r[1] / r[2] for r in flatness[g] if r[2] > 0)
            rows.append((g, "ms/token <= 1.15x its session.run", f"{overhead:.2f}x", overhead <= 1.15))
        if g in rss:
            rows.append(
                (
                    g,
                    "peak RSS <= 700 MB (3 candidates, full context)",
                    f"{rss[g]['peak_mb']:.0f} MB",
                    rss[g]["peak_mb"] <= 700,
                )
            )
    if rows:
        print("\nTargets (the engine issue's, on this machine):\n")
        print("| graph | target | measured | |")
        print("|---|---|---:|---|")
        for g, what, value, ok in rows:
            print(f"| `{g}` | {what} | {value} | {'met' if ok else '**not met**'} |")


def kv_bytes_per_token(engine: Engine, context: int) -> float:
    """Bytes of KV cache one decode step reads at ``context`` tokens (keys and values, all layers;
    the 4-bit cache: half a byte a value plus a float16 scale per token, head and keys/values)."""
    m = engine.manifest
    kv = str(m.extra.get("kv_dtype", "float32"))
    if kv == "int4":
        return 2.0 * m.n_layer * m.n_head * context * (m.head_dim / 2 + 2)
    itemsize = {"int8": 1, "float16": 2}.get(kv, 4)
    return 2.0 * m.n_layer * m.n_head * m.head_dim * context * itemsize


def gemv_gbs(w: np.ndarray, x: np.ndarray, evict: np.ndarray | None = None, reps: int = 5) -> float:
    """GB/s of a BLAS matrix-vector product over ``w`` (every thread): a streaming read. With
    ``evict``, a product over that larger matrix runs before each timed one, so ``w`` comes from
    memory as a decode step's KV cache does (the weights stream through the caches in between)."""
    w @ x
    times = []
    for _ in range(reps):
        if evict is not None:
            evict @ x
        t0 = time.perf_counter()
        w @ x
        times.append(time.perf_counter() - t0)
    return w.nbytes / float(np.median(times)) / 1e9


def print_bandwidth_floor(flatness: dict[str, list[tuple[int, float, float]]], kv_bytes: dict[str, float]) -> None:
    """What the flatness ratio cannot go below: at the last context a decode step reads the whole
    cache once, so even at this machine's streaming rates that adds bytes / rate to the step."""
    x = np.ones(4096, np.float32)
    big = np.ones((512 * 2**20 // 4 // 4096, 4096), np.float32)
    best = gemv_gbs(big, x)
    print(
        f"\nBandwidth floor of the flatness ratio: a step at the last context reads its whole KV cache once. "
        f"Streaming rates here (BLAS gemv, all threads): {best:.1f} GB/s over 512 MB repeated (the best case); "
        f"cold, as the cache is read after the weights: the column below. A floor only where the weights and "
        f"the cache do not fit in the CPU's caches together (the 350m shape, not the small one).\n"
    )
    print(
        "| graph | KV read per token at the last context | cold read rate | ratio floor, cold | ratio floor, best "
        "rate | measured |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for g, rows in flatness.items():
        if g not in kv_bytes:
            continue
        first, last = rows[0], rows[-1]
        kv = np.ones((max(1, int(kv_bytes[g]) // 4 // 4096), 4096), np.float32)
        cold = gemv_gbs(kv, x, evict=big)
        floor = [(first[1] + kv_bytes[g] / (r * 1e9) * 1e3) / first[1] for r in (cold, best)]
        print(
            f"| `{g}` | {kv_bytes[g] / 1e6:.0f} MB | {cold:.1f} GB/s | {floor[0]:.2f}x | {floor[1]:.2f}x | "
            f"{last[1] / first[1]:.2f}x |"
        )


def engine_context(model_dir: Path) -> int:
    return int(json.loads((model_dir / "manifest.json").read_text())["context_length"])


if __name__ == "__main__":
    main()
