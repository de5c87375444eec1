"""Our ``gqa`` graph's export: the KV cache's bits decided (the 4-bit check where asked), the int8
cache calibrated on standard-library source, then the graph built weight by weight into OUT.

The calibration and the check run the torch model one layer at a time
(:mod:`codegen_ls.export.calibrate`); the graph is :mod:`codegen_ls.export.graph_builder`'s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from codegen_ls.errors import CodegenLsError, ModelError
from codegen_ls.export import kv_check
from codegen_ls.export.kv_check import KvCheck
from codegen_ls.export.progress import return_freed_memory, step
from codegen_ls.export.source import CheckpointSource

if TYPE_CHECKING:
    from codegen_ls.export.calibrate import Scales

INT4_BLOCK = 32  # MatMulNBits block size of --int4
EXTERNAL_BYTES = 1_800_000_000  # past this float32 size, ONNX external data (2 GB is protobuf's limit)
CALIBRATION_MODULES = ("functools.py", "typing.py", "collections/__init__.py", "enum.py")
CALIBRATION_TOKENS = 4096  # int8 KV scales: the largest keys/values over this much Python


def calibration_batches(tokenizer: Path | None, n_positions: int, vocab_size: int) -> list[list[int]]:
    """Token windows to calibrate the int8 KV cache on: a few standard-library modules of the
    running Python (always on disk, offline), tokenized with the checkpoint's tokenizer; random
    ids where that is impossible (no tokenizer.json)."""
    window = min(1024, n_positions)
    ids: list[int] = []
    if tokenizer is not None and tokenizer.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer))
        stdlib = Path(os.__file__).parent
        for name in CALIBRATION_MODULES:
            if (stdlib / name).is_file() and len(ids) < CALIBRATION_TOKENS:
                ids += [i for i in tok.encode((stdlib / name).read_text(errors="replace")).ids if i < vocab_size]
    if len(ids) < window:
        import numpy as np

        ids += [int(i) for i in np.random.default_rng(0).integers(0, vocab_size, CALIBRATION_TOKENS)]
    ids = ids[:CALIBRATION_TOKENS]
    return [ids[i : i + window] for i in range(0, len(ids) - window + 1, window)]


@dataclass
class GqaExport:
    """What to build: weights ``quantized`` (int8; ``int4``: layer weights 4-bit), the cache's
    ``kv_bits`` (``check_kv4``: 4 only where :mod:`codegen_ls.export.kv_check` finds it costs the
    checkpoint little), ``external`` data (None: by size); ``tokenizer`` encodes the calibration text."""

    quantized: bool
    int4: bool = False
    kv_bits: int = 8
    check_kv4: bool = False
    external: bool | None = None
    tokenizer: Path | None = None


@dataclass
class GqaResult:
    """What was built: whether external data was used, the cache's bits, the 4-bit check's result."""

    external: bool
    kv_bits: int
    checked: KvCheck | None


def export_gqa(src: Path, out: Path, what: GqaExport) -> GqaResult:
    """Build the graph from the checkpoint read tensor by tensor (:mod:`codegen_ls.export.source`)
    straight into ``out`` (``model.onnx``, and ``model.onnx.data`` written weight by weight when
    external). A quantized graph gets an int8 KV cache, calibrated here on text encoded with the
    exported ``tokenizer.json``, or a 4-bit one (a scale per token: nothing to calibrate)."""
    from codegen_ls.export.graph_builder import GraphOptions, build_graph

    return_freed_memory(start=True)
    try:
        source = CheckpointSource(src)
        scales, checked, kv_bits = _calibrate(source, what)
        external = source.fp32_bytes() > EXTERNAL_BYTES if what.external is None else what.external
        options = GraphOptions(
            int8=what.quantized,
            int4_block=INT4_BLOCK if what.int4 else 0,
            kv_int8=scales,
            kv_int4=kv_bits == 4,
        )
        build_graph(source, out / "model.onnx", options, external)
    except CodegenLsError:
        raise
    except Exception as exc:  # unreadable weights, unexpected shapes: one line
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise ModelError(f"cannot export {src}: {lines[0]}") from None
    return GqaResult(external, kv_bits, checked)


def _calibrate(source: CheckpointSource, what: GqaExport) -> tuple[Scales | None, KvCheck | None, int]:
    """The int8 cache's scales (None for a 4-bit or fp32 cache), the 4-bit check's result, the bits."""
    from codegen_ls.export import calibrate

    kv_bits = what.kv_bits
    if not (what.quantized and (kv_bits == 8 or what.check_kv4)):
        return None, None, kv_bits
    step("      calibrating the int8 KV cache (the torch model, one layer at a time) ...")
    cfg = source.config
    n_positions = int(cfg.get("n_positions") or cfg.get("n_ctx") or 2048)
    batches = calibration_batches(what.tokenizer, n_positions, int(cfg["vocab_size"]))
    if what.check_kv4:
        step("      checking what the 4-bit KV cache costs this checkpoint (codegen_ls.export.kv_check) ...")
    scales, checked = calibrate.run(source, batches, check=what.check_kv4)
    return_freed_memory()
    if checked is not None:
        _report_check(checked)
        kv_bits = 4 if checked.four_bit_ok else 8
    return (None if kv_bits == 4 else scales), checked, kv_bits


def _report_check(result: KvCheck) -> None:
    loss = result.loss
    verdict = (
        "the 4-bit cache"
        if result.four_bit_ok
        else f"the int8 cache (the 4-bit one costs more than {kv_check.KV4_TOLERANCE} over it)"
    )
    step(
        f"      loss on {result.tokens} tokens of Python: {loss['exact']:.4f} exact, {loss['int8']:.4f} "
        f"with the int8 KV cache, {loss['int4']:.4f} with the 4-bit one: {verdict}"
    )
