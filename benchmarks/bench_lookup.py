"""Benchmark lookup drafts as speculative decoding: greedy tokens/s with and without a draft.

For cursors at random points of lines of a real stdlib file, with the prompt already in the KV
cache (as after the pipeline's prefill), the rest of the line is decoded three ways:

plain       ``Engine.generate`` greedy, one token per forward pass;
lookup      :func:`codegen_ls.suggest.verify.propose` with the best lookup draft of the file, under
            plain greedy agreement (``min_accept_p=1.0``), so its text is exactly the plain one;
oracle      the same, with the plain greedy text itself as the draft: the speed when the
            draft is fully accepted (one forward pass for the whole line).

Speeds are compared on the cursors where the draft was (at least partly) accepted and the text
is the same as plain greedy. Tokens fed and time inside ``session.run`` are printed too. A last
line measures exact match of the rest of the line for lookup-only, greedy, and verified lookup
(up to 4 drafts, the best by mean log-prob, for several ``min_accept_p``), which says something
only once the model is trained.

    python benchmarks/bench_lookup.py [--file PATH] [--cursors 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from codegen_ls.engine.engine import Engine, EngineOptions
from codegen_ls.suggest.drafts import MIN_ACCEPT_P, Draft, DraftOptions, find_drafts, lookup_only
from codegen_ls.suggest.verify import ProposeOptions, propose

ROOT = Path(__file__).resolve().parents[1]


def newline_stop(text: str) -> int | None:
    i = text.find("\n")
    return i if i != -1 else None


@dataclass
class Tally:
    runs: int = 0
    tokens: int = 0
    ms: float = 0.0
    fed: int = 0
    session_ms: float = 0.0
    calls: list[float] = field(default_factory=list)

    def add(self, tokens: int, ms: float, fed: int, session_ms: float) -> None:
        self.runs += 1
        self.tokens += tokens
        self.ms += ms
        self.fed += fed
        self.session_ms += session_ms

    def line(self, name: str) -> str:
        tps = 1000 * self.tokens / self.ms if self.ms else 0.0
        return (
            f"{name:<8} runs {self.runs:3d}  tokens {self.tokens:5d}  fed {self.fed:5d}  "
            f"total {self.ms:8.1f} ms  session.run {self.session_ms:8.1f} ms  {tps:7.1f} tok/s"
        )


def measure(engine: Engine, fn):  # type: ignore[no-untyped-def]
    fed, sess = engine.tokens_fed, engine.session_ms
    t = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t) * 1000, engine.tokens_fed - fed, engine.session_ms - sess


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "codegen-ls-small"))
    ap.add_argument("--file", default=str(Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"))
    ap.add_argument("--cursors", type=int, default=40)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--accept",
        type=float,
        nargs="*",
        default=[0.0, 0.01, MIN_ACCEPT_P],
        help="min_accept_p values for the exact-match table (up to 4 drafts each)",
    )
    args = ap.parse_args()

    engine = Engine(args.model, EngineOptions(threads=args.threads))
    text = Path(args.file).read_text()
    lines = text.splitlines(keepends=True)
    starts = [0]
    for ln in lines:
        starts.append(starts[-1] + len(ln))
    rng = random.Random(args.seed)
    # Cursors at a random point inside non-blank lines that have a lookup draft; the rest of the
    # line is removed (it is what is being typed), so the suffix starts at the line break.
    picks: list[tuple[int, Draft, str]] = []
    for i in rng.sample(range(len(lines)), len(lines)):
        body = lines[i].rstrip("\n")
        lead = len(body) - len(body.lstrip())
        if len(body.strip()) < 4:
            continue
        pos = starts[i] + rng.randint(lead + 1, len(body) - 1)
        drafts = find_drafts(text[:pos], text[starts[i] + len(body) :], {}, DraftOptions(max_drafts=1))
        if drafts:
            picks.append((pos, drafts[0], text[pos : starts[i] + len(body)]))
        if len(picks) >= args.cursors:
            break

    plain, spec, plain_o, oracle = Tally(), Tally(), Tally(), Tally()
    accepted = full = same = 0
    exact = {"lookup-only": 0, "greedy": 0} | {f"verified@{p:g}": 0 for p in args.accept}
    for n, (pos, draft, truth) in enumerate(picks):
        prefix, suffix = text[:pos], text[pos + len(truth) :]
        prompt = engine.tokenizer.encode(prefix[-4 * args.prompt_tokens :])[-args.prompt_tokens :]
        key = f"bench{n}"
        engine.forward(prompt, key)  # the pipeline's prefill: not part of decode
        gen, ms, fed, sess = measure(
            engine,
            lambda: engine.generate(
                prompt, doc_key=key, temperature=0, max_new_tokens=args.max_new_tokens, stop=newline_stop
            ),
        )
        g = gen.candidates[0]
        exact["greedy"] += g.text.strip() == truth.strip()
        exact["lookup-only"] += (lookup_only(prefix, suffix, {}) or "").strip() == truth.strip()
        p_row = (len(g.token_ids), ms, fed, sess)

        def run(d: Draft | None, p: float = 1.0):  # type: ignore[no-untyped-def]
            return propose(
                engine,
                prompt,
                prefix,
                suffix,
                {},
                ProposeOptions(
                    doc_key=key,
                    stop=newline_stop,
                    cancel=None,
                    max_new_tokens=args.max_new_tokens,
                    min_accept_p=p,
                    find=DraftOptions(multiline=False),
                ),
                drafts=None if d is None else [d],
            )

        engine.forward(prompt, key)
        cands, ms, fed, sess = measure(engine, lambda: run(draft))
        if cands and cands[0].text == g.text:
            accepted += 1
            full += cands[0].source == draft.source
            plain.add(*p_row)
            spec.add(len(cands[0].token_ids), ms, fed, sess)
        if g.text.strip():
            engine.forward(prompt, key)
            cands, ms, fed, sess = measure(engine, lambda: run(Draft(g.text, "lookup:line", "oracle", 0)))
            if cands and cands[0].text == g.text:
                same += 1
                plain_o.add(*p_row)
                oracle.add(len(cands[0].token_ids), ms, fed, sess)
        for p in args.accept:  # all drafts (up to 4), the best lookup candidate by mean log-prob
            best = max(run(None, p), key=lambda c: c.logprob_mean, default=None)
            exact[f"verified@{p:g}"] += best is not None and best.text.strip() == truth.strip()

    print(
        f"model {args.model}  file {args.file}  cursors {len(picks)}  threads {args.threads}  "
        f"prompt <= {args.prompt_tokens} tokens  max_new_tokens {args.max_new_tokens}"
    )
    print(
        f"lookup draft accepted (same text as greedy) at {accepted}/{len(picks)} cursors, "
        f"fully (no model step) at {full}"
    )
    print("-- cursors with an accepted lookup draft: plain greedy vs lookup draft")
    print(plain.line("plain"))
    print(spec.line("lookup"))
    print(f"-- oracle draft (the greedy text itself) at {same} cursors")
    print(plain_o.line("plain"))
    print(oracle.line("oracle"))
    print(
        "-- exact match of the rest of the line, all cursors: "
        + "  ".join(f"{k} {v}/{len(picks)}" for k, v in exact.items())
    )


if __name__ == "__main__":
    main()
