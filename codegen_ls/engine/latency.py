"""Latency targeting: this machine's speed for a model, and the request sizes that fit a target.

:func:`measure` times a few short runs of a loaded engine (a cold prompt, a keystroke's few new
tokens on a cached prompt, decode steps with one and with N candidate rows). The result is cached
per model and machine in ``$XDG_CACHE_HOME/codegen-ls/speeds.json`` (:func:`speeds_for`), so
later loads skip the runs (for ``MAX_AGE_S``: a machine that was busy when measured is measured
again). :func:`plan` turns the speeds and a target (``latencyTargetMs``) into a
prompt budget and a new-token count:

- new tokens: as many decode steps as fit in the target after a keystroke's prefill
  (``MIN_NEW_TOKENS`` .. ``DEFAULT_NEW_TOKENS``); the deadline-first continuation and the
  type-ahead cache bring the rest of a longer suggestion;
- prompt budget: the tokens a cold prompt (a document's first request, when the warm-up has not
  run) prefills in ``COLD_FACTOR`` times the target (``MIN_CONTEXT`` .. ``DEFAULT_CONTEXT``,
  a multiple of 64), so a slow model on a slow machine reads less context instead of stalling.

The user's explicit ``contextTokens`` / ``maxNewTokens`` always win (the pipeline applies the plan
only where they are unset). Knows nothing of LSP.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT = 2  # bump when the measurement changes: older entries are measured again
DEFAULT_CONTEXT = 1024  # the budgets without a target (and the most the plan picks)
DEFAULT_NEW_TOKENS = 48
MIN_CONTEXT = 256
MIN_NEW_TOKENS = 4  # a word or two: the continuation brings the rest while the user reads
COLD_FACTOR = 10  # a cold prompt may take this many targets (the warm-up usually hides it)
PROBE_TOKENS = 256  # the cold prompt measured (two of the engine's default prefill chunks)
PROBE_EXTEND = 4  # a keystroke's new prompt tokens
PROBE_STEPS = 8  # decode steps measured per row count
CACHE_ENTRIES = 32  # models x machines remembered
MAX_AGE_S = 7 * 86400  # measured again after a week (a measurement taken while the machine was busy does not stay)


@dataclass(frozen=True)
class Speeds:
    """Measured on this machine for one model (milliseconds)."""

    prefill_ms_per_token: float  # a cold prompt, chunked as the engine does
    extend_ms: float  # PROBE_EXTEND tokens on a cached prompt: a keystroke's prefill
    step_ms: float  # one decode step, one candidate row
    step_ms_n: float  # one decode step with ``rows`` candidate rows
    rows: int
    measured_ms: float = 0.0  # how long measuring took

    def step_for(self, candidates: int) -> float:
        """Decode step time for ``candidates`` rows (linear between 1 and ``rows``)."""
        if candidates <= 1 or self.rows <= 1:
            return self.step_ms
        per_row = (self.step_ms_n - self.step_ms) / (self.rows - 1)
        return self.step_ms + per_row * (candidates - 1)


@dataclass(frozen=True)
class Plan:
    """The request sizes chosen for a target."""

    context_tokens: int
    max_new_tokens: int
    keystroke_ms: float  # expected: a keystroke's prefill + max_new_tokens decode steps
    cold_ms: float  # expected: a cold prompt of context_tokens


def plan(speeds: Speeds, target_ms: float, candidates: int, context_length: int = 2048) -> Plan:
    """The largest prompt budget and new-token count whose expected times fit ``target_ms``."""
    step = max(1e-3, speeds.step_for(candidates))
    new = int((target_ms - speeds.extend_ms) // step)
    new = max(MIN_NEW_TOKENS, min(DEFAULT_NEW_TOKENS, new))
    context = int(COLD_FACTOR * target_ms / max(1e-3, speeds.prefill_ms_per_token)) // 64 * 64
    context = max(MIN_CONTEXT, min(DEFAULT_CONTEXT, context, context_length - new))
    return Plan(context, new, speeds.extend_ms + new * step, context * speeds.prefill_ms_per_token)


def _timed(fn: Any, threads: int) -> float:
    """Milliseconds ``fn()`` takes on this machine's cores: the wall time, or the process's CPU
    time over its threads where that is less (the machine was busy with other work: its share of
    the cores is not this model's speed)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return 1000 * min(wall, cpu / max(1, threads))


def measure(engine: Any, rows: int = 3) -> Speeds:
    """Time a few short runs of ``engine`` (twice each, the faster kept): about a second for a
    350M model on 2 cores, tens of milliseconds for the embedded one."""
    t0 = time.perf_counter()
    threads = engine.options.threads or os.cpu_count() or 1
    vocab = min(engine.tokenizer.vocab_size, engine.manifest.vocab_size)
    ids = [engine.eos_id] + [(7919 * i) % (vocab - 1) + 1 for i in range(1, PROBE_TOKENS)]
    extra = [(104729 * i) % (vocab - 1) + 1 for i in range(1, PROBE_EXTEND + 1)]
    prefill: list[float] = []
    extend: list[float] = []
    step1: list[float] = []
    stepn: list[float] = []
    for attempt in range(2):
        key = f"codegen-ls:latency-probe:{attempt}"
        try:
            prefill.append(_timed(lambda: engine.forward(ids, doc_key=key), threads) / len(ids))
            extend.append(_timed(lambda: engine.forward(ids + extra, doc_key=key), threads))
            for n, out in ((1, step1), (rows, stepn)):
                gens: list[Any] = []
                ms = _timed(
                    lambda: gens.append(
                        engine.generate(ids + extra, doc_key=key, n=n, max_new_tokens=PROBE_STEPS + 1, temperature=1.0)
                    ),
                    threads,
                )
                if gens[0].stats.steps:  # the whole call over its steps: its one-token prefill is a step's cost
                    out.append(ms / (gens[0].stats.steps + 1))
        finally:
            engine.cache.drop(key)
    return Speeds(
        min(prefill),
        min(extend),
        min(step1 or [0.0]),
        min(stepn or [0.0]),
        rows,
        round((time.perf_counter() - t0) * 1000, 1),
    )


# -- the cache of measurements ---------------------------------------------------------------------


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "codegen-ls" / "speeds.json"


def machine_key(engine: Any, threads: int) -> str:
    """What the speeds depend on: the model's files, this CPU, the threads, the attention code."""
    cpu = ""
    try:
        cpu = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            "",
        )
    except OSError:
        pass
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:  # pragma: no cover - the engine needs it
        ort_version = "?"
    parts = {
        "format": FORMAT,
        "files": dict(sorted(engine.manifest.files.items())),
        "onnx": engine.manifest.onnx,
        "dir": str(engine.model_dir.resolve()),
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "threads": threads or os.cpu_count(),
        "ort": ort_version,
        "attention": engine.attention,
        "chunk": engine.options.prefill_chunk,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def speeds_for(engine: Any, threads: int = 0, rows: int = 3, path: Path | None = None) -> Speeds:
    """The cached speeds of ``engine`` on this machine, measured (and stored) when missing."""
    path = path or cache_path()
    key = machine_key(engine, threads)
    entries = _read(path)
    found = entries.get(key)
    if isinstance(found, dict) and time.time() - float(found.get("when", 0)) < MAX_AGE_S:
        try:
            return Speeds(**{k: v for k, v in found.items() if k != "when"})
        except TypeError:
            pass  # an older layout: measure again
    speeds = measure(engine, rows)
    log.info("measured %s: %s", engine.model_dir, speeds)
    entries[key] = {**asdict(speeds), "when": time.time()}
    while len(entries) > CACHE_ENTRIES:  # the oldest measurements go
        entries.pop(min(entries, key=lambda k: entries[k].get("when", 0) if isinstance(entries[k], dict) else 0))
    _write(path, entries)
    return speeds


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(path: Path, data: dict[str, Any]) -> None:
    """Atomically (a temporary file renamed); a read-only home only loses the cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".speeds-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot store the measured speeds in %s: %s", path, exc)


def describe(speeds: Speeds, target_ms: float, candidates: int, context_length: int = 2048) -> list[str]:
    """Lines for ``doctor``: the speeds and the budgets the target gives."""
    p = plan(speeds, target_ms, candidates, context_length)
    return [
        f"prefill {speeds.prefill_ms_per_token:.2f} ms/token (cold, "
        f"{1000 / max(1e-3, speeds.prefill_ms_per_token):.0f} "
        f"tokens/s); a keystroke's {PROBE_EXTEND} tokens {speeds.extend_ms:.1f} ms; decode "
        f"{speeds.step_ms:.1f} ms/step with 1 candidate, {speeds.step_ms_n:.1f} with {speeds.rows}",
        f"latencyTargetMs {target_ms:g}, {candidates} candidates -> contextTokens {p.context_tokens}, maxNewTokens "
        f"{p.max_new_tokens} (expected: keystroke {p.keystroke_ms:.0f} ms, cold prompt {p.cold_ms:.0f} ms)",
    ]


__all__ = ["Speeds", "Plan", "plan", "measure", "speeds_for", "cache_path", "describe"]
