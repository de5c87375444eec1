"""``codegen-ls model export``: a Hugging Face CodeGen checkpoint -> a self-contained ONNX model dir.

This module checks the options and orders the steps; each step has its own module. Pipeline
(needs the ``export`` extra: torch, transformers, optimum-onnx; serving never imports it):

1. resolve SRC: a local checkpoint directory, or a hub id downloaded when online
   (:mod:`codegen_ls.export.checkpoint`);
2. build our own graph from the checkpoint, read one tensor at a time
   (:mod:`codegen_ls.export.gqa_export`, :mod:`codegen_ls.export.graph_builder`), each weight
   quantized and written out as it is made, so memory holds about one weight, never the model:
   ``--graph gqa`` (the default; GroupQueryAttention over one in-place cache per layer: when
   quantized a 4-bit cache where our kernel runs it fast and it costs the checkpoint little
   (:mod:`codegen_ls.export.kv_check`, run one layer at a time: :mod:`codegen_ls.export.calibrate`),
   else int8, its scales calibrated here on standard-library source); or export with past
   key/values through optimum-onnx (``--graph optimum``, ``text-generation-with-past``, the
   reference, which loads the whole model: :mod:`codegen_ls.export.optimum_export`);
3. weights int8 as ``onnxruntime.quantization``'s dynamic quantization stores them (our graphs:
   while building, :mod:`codegen_ls.export.quantize`; optimum's: ``quantize_dynamic``);
   ``--no-quantize`` keeps fp32; our graphs also store the token embedding as int8 rows, and
   ``--int4`` makes their layer weights 4-bit ``MatMulNBits`` blocks; checkpoints over 1.8 GB in
   float32 get ONNX external data (``model.onnx.data``);
4. write ``manifest.json`` (shapes, special ids, checksums: :mod:`codegen_ls.export.manifest`);
   ``tokenizer.json`` is written into OUT first, as the int8 KV cache's calibration encodes
   text with it.

Only safe weight formats are loaded: safetensors, or ``.bin`` through
``torch.load(weights_only=True)`` (memory-mapped). Peak memory, measured (random weights of the real
shapes): see benchmarks/README.md, "Real checkpoint shapes".
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from codegen_ls.engine import kernels, kvcache
from codegen_ls.engine.modeldir import Manifest
from codegen_ls.errors import CodegenLsError
from codegen_ls.export.checkpoint import (
    RandomCheckpoint,
    check_config,
    random_checkpoint,
    resolve_source,
    save_tokenizer,
)
from codegen_ls.export.gqa_export import INT4_BLOCK, GqaExport, GqaResult, calibration_batches, export_gqa
from codegen_ls.export.manifest import ExportRecord, write_export_manifest
from codegen_ls.export.optimum_export import export_optimum, quantize
from codegen_ls.export.progress import step

GRAPHS = ("gqa", "optimum")


@dataclass(frozen=True)
class ExportOptions:
    """How :func:`export` exports (``codegen-ls model export``'s options).

    ``graph``: ``gqa`` (our graph on GroupQueryAttention, :mod:`codegen_ls.export.graph_builder`;
    with ``quantize_int8`` its KV cache is int8 too) or ``optimum`` (optimum-onnx's export, the
    reference); the manifest records it as ``extra.graph`` (and the cache's type as
    ``extra.kv_dtype``) and the engine picks its backend from it. Our graph's int8 export also
    stores the token embedding as int8 rows; ``int4`` makes the layers' weights 4-bit
    ``MatMulNBits`` blocks (lm_head stays int8). ``kv_bits`` 4 (gqa, quantized) makes the gqa
    cache 4-bit with a scale per token and head: half the int8 cache's memory and bandwidth, for
    a little accuracy; only our compiled kernel runs its decode attention. None (the default):
    :func:`default_kv_bits`, 4 where this machine runs that kernel fast and
    :mod:`codegen_ls.export.kv_check` finds it costs the checkpoint little, else 8.

    ``external_data``: None decides by size (ONNX external data when the fp32 export is past
    ~1.8 GB, as 2 GB is the protobuf limit); True/False force it (tests use True to cover the
    big-model path). ``force``: overwrite a non-empty OUT. ``name``: the manifest's model name.
    """

    quantize_int8: bool = True
    force: bool = False
    external_data: bool | None = None
    graph: str = "gqa"
    int4: bool = False
    name: str | None = None
    kv_bits: int | None = None


def export(src: str, out: Path, options: ExportOptions | None = None, **overrides: Any) -> Manifest:
    """Export ``src`` into ``out`` and return the manifest written there.

    ``options`` says how (:class:`ExportOptions`); keyword ``overrides`` replace its fields
    (``export(src, out, graph="optimum")``).
    """
    t0 = time.time()
    opts = replace(options or ExportOptions(), **overrides)
    _check_options(opts)
    source = resolve_source(src)
    config = check_config(source)
    head_dim = int(config["n_embd"]) // int(config["n_head"])
    kv_bits = _choose_kv_bits(opts, head_dim)
    _prepare_out(out, opts.force)
    save_tokenizer(source, out)  # first: the int8 KV cache's calibration encodes text with it

    checked = None
    if opts.graph == "gqa":
        built = _export_ours(source, out, opts, kv_bits)
        kv_bits, checked = built.kv_bits, built.checked
    else:
        export_optimum(source, out, opts.quantize_int8, opts.external_data)
    step("[3/3] writing manifest.json (tokenizer.json is already there) ...")
    record = ExportRecord(src, _quantization(opts), opts.graph, _kv_dtype(opts, kv_bits), t0, opts.name, checked)
    return write_export_manifest(out, config, record)


def default_kv_bits(graph: str = "gqa", quantize_int8: bool = True, head_dim: int = 64) -> int:
    """The KV cache's bits when ``--kv-bits`` is not given: 4 for a quantized gqa graph where our
    kernel runs the 4-bit cache's attention vectorized here (library built and not turned off;
    AVX-512 VNNI, or AVX2; head sizes a multiple of 8, as CodeGen's all are), which is faster
    at long context and half the memory; else 8, which runs fast anywhere."""
    fast4 = graph == "gqa" and quantize_int8 and not kernels.disabled_by_env() and kernels.vector4(True, head_dim)
    return 4 if fast4 else 8


def _check_options(opts: ExportOptions) -> None:
    """The option combinations that cannot be exported, each as one line."""
    if opts.graph not in GRAPHS:
        raise CodegenLsError(f"unknown graph kind '{opts.graph}' (gqa or optimum)")
    if opts.int4 and (opts.graph == "optimum" or not opts.quantize_int8):
        raise CodegenLsError("int4 weights need our graph (--graph gqa) and quantization (no --no-quantize)")
    if opts.kv_bits not in (None, 4, 8):
        raise CodegenLsError(f"--kv-bits must be 8 or 4, not {opts.kv_bits}")
    if opts.kv_bits == 4 and (opts.graph != "gqa" or not opts.quantize_int8):
        raise CodegenLsError("a 4-bit KV cache needs the gqa graph and quantization (no --no-quantize)")


def _choose_kv_bits(opts: ExportOptions, head_dim: int) -> int:
    """The KV cache's bits (:func:`default_kv_bits` unless given), said on stderr where chosen
    here; refused where the heads do not fit the 4-bit layout."""
    kv_bits = opts.kv_bits if opts.kv_bits is not None else default_kv_bits(opts.graph, opts.quantize_int8, head_dim)
    if opts.kv_bits is None and opts.graph == "gqa" and opts.quantize_int8:
        step(
            f"KV cache: 4-bit unless the check below finds it costs this checkpoint too much (our kernel runs it here "
            f"with {kernels.path4(best=True)}; --kv-bits 8 for a model that runs fast on any CPU)"
            if kv_bits == 4
            else f"KV cache: int8 (the 4-bit cache needs heads a multiple of 8, here {head_dim}, and to run fast the "
            f"compiled kernel with AVX2 or AVX-512 VNNI: not both here)"
        )
    if kv_bits == 4 and not kvcache.fits(head_dim):
        raise CodegenLsError(
            f"a 4-bit KV cache needs heads a multiple of 8 (at most 256); this checkpoint's are {head_dim}: "
            "use --kv-bits 8"
        )
    if kv_bits == 4 and not kernels.vector4(best=True, head_dim=head_dim):
        step(
            "note: the 4-bit KV cache's attention has no fast path on this machine (it needs the compiled kernel, and "
            "AVX-512 VNNI or AVX2): the model will serve slowly here, or not at all without the kernel"
        )
    return kv_bits


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not force:
            raise CodegenLsError(f"output directory is not empty: {out} (use --force to overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _export_ours(source: Path, out: Path, opts: ExportOptions, kv_bits: int) -> GqaResult:
    step(f"[1/3] building the gqa ONNX graph of {source} weight by weight (codegen_ls.export.graph_builder) ...")
    what = GqaExport(
        quantized=opts.quantize_int8,
        int4=opts.int4,
        kv_bits=kv_bits,
        check_kv4=opts.kv_bits is None and kv_bits == 4,
        external=opts.external_data,
        tokenizer=out / "tokenizer.json",
    )
    built = export_gqa(source, out, what)
    step(
        "[2/3] "
        + (
            "weights quantized as they were written (int8 per tensor, as onnxruntime.quantization's "
            "dynamic quantization)"
            if opts.quantize_int8
            else "keeping fp32 weights (--no-quantize)"
        )
    )
    return built


def _quantization(opts: ExportOptions) -> str:
    if not opts.quantize_int8:
        return "none"
    return f"int4-block{INT4_BLOCK}+int8-dynamic" if opts.int4 else "int8-dynamic"


def _kv_dtype(opts: ExportOptions, kv_bits: int) -> str:
    if opts.graph != "gqa" or not opts.quantize_int8:
        return "float32"
    return "int4" if kv_bits == 4 else "int8"


__all__ = [  # tests and benchmarks import these from here
    "ExportOptions",
    "RandomCheckpoint",
    "calibration_batches",
    "default_kv_bits",
    "export",
    "quantize",
    "random_checkpoint",
]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
