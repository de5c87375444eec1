"""Lookup drafts at a KV-buffer boundary: draft verification and the next keystroke, in ms.

The gqa graph's in-place KV cache grows in steps of 128 positions. A draft verified on top of the
prompt (``Engine.score``) can cross a step, and the next keystroke's prompt (without the draft)
is shorter again. This replays that pattern around 1024 tokens and prints both times per
keystroke. Build the model first with ``bench_engine.py`` (it is reused from ``build/bench``)::

    python benchmarks/bench_engine.py --shape 350m --graphs gqa-kv8 --skip torch,optimum,rss,flatness
    python benchmarks/bench_boundary.py build/bench/350m/int8-gqa
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codegen_ls.engine.engine import Engine, EngineOptions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", metavar="MODEL_DIR")
    ap.add_argument("--prompt", type=int, default=1020, help="first prompt length (tokens)")
    ap.add_argument("--draft", type=int, default=12, help="draft tokens")
    ap.add_argument("--keystrokes", type=int, default=6)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    engine = Engine(args.model, EngineOptions(threads=args.threads))
    ids = [
        int(t)
        for t in np.random.default_rng(0).integers(
            1, engine.tokenizer.vocab_size, args.prompt + args.keystrokes + args.draft + 1
        )
    ]
    rows = []
    for k in range(args.keystrokes):
        n = args.prompt + k
        engine.forward(ids[:n], "doc")
        t0 = time.perf_counter()
        engine.score(ids[:n], ids[n : n + args.draft], doc_key="doc")
        t1 = time.perf_counter()
        engine.forward(ids[: n + 1], "doc")
        rows.append((n, (t1 - t0) * 1000, (time.perf_counter() - t1) * 1000))
    print("| prompt tokens | draft verify ms | next keystroke ms |")
    print("|---:|---:|---:|")
    for n, verify, nxt in rows[1:]:  # the first one warms up
        print(f"| {n} | {verify:.0f} | {nxt:.0f} |")


if __name__ == "__main__":
    main()
