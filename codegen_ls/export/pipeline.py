"""``codegen-ls model export``: a Hugging Face CodeGen checkpoint -> a self-contained ONNX model dir.

Pipeline (needs the ``export`` extra: torch, transformers, optimum-onnx; serving never imports it):

1. resolve SRC: a local checkpoint directory, or a hub id downloaded when online;
2. build our own graph from the checkpoint, read one tensor at a time
   (:mod:`codegen_ls.export.source`, :mod:`codegen_ls.export.graph_builder`), each weight
   quantized and written out as it is made, so memory holds about one weight, never the model:
   ``--graph gqa`` (the default; GroupQueryAttention over one in-place cache per layer: when
   quantized a 4-bit cache where our kernel runs it fast and it costs the checkpoint little
   (:mod:`codegen_ls.export.kv_check`, run one layer at a time: :mod:`codegen_ls.export.calibrate`),
   else int8, its scales calibrated here on standard-library source); or export with past
   key/values through optimum-onnx (``--graph optimum``, ``text-generation-with-past``, the
   reference, which loads the whole model);
3. weights int8 as ``onnxruntime.quantization``'s dynamic quantization stores them (our graphs:
   while building, :mod:`codegen_ls.export.quantize`; optimum's: ``quantize_dynamic``);
   ``--no-quantize`` keeps fp32; our graphs also store the token embedding as int8 rows, and
   ``--int4`` makes their layer weights 4-bit ``MatMulNBits`` blocks; checkpoints over 1.8 GB in
   float32 get ONNX external data (``model.onnx.data``);
4. write ``manifest.json`` (shapes, special ids, checksums); ``tokenizer.json`` is written into OUT
   first, as the int8 KV cache's calibration encodes text with it.

Only safe weight formats are loaded: safetensors, or ``.bin`` through
``torch.load(weights_only=True)`` (memory-mapped). Peak memory, measured (random weights of the real
shapes): see benchmarks/README.md, "Real checkpoint shapes".
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from codegen_ls.engine import kernels, kvcache
from codegen_ls.engine.fim import detect as detect_fim
from codegen_ls.engine.modeldir import Manifest, read_manifest, sha256, write_manifest
from codegen_ls.errors import CodegenLsError, ModelError
from codegen_ls.export import kv_check
from codegen_ls.export.kv_check import KvCheck

INT4_BLOCK = 32  # MatMulNBits block size of --int4
WEIGHT_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*")


def _step(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _return_freed_memory(start: bool = False) -> None:
    """glibc: big buffers (a weight, a layer's activations) mapped on their own, so freeing one
    gives its memory back to the system (``start``: past 16 MB, instead of glibc's threshold that
    grows with each freed buffer and leaves them in the heap); and what the heap holds free now
    returned. The export's peak is then what it holds at once, not all it has held. Elsewhere: nothing."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        if start:
            libc.mallopt(-3, 16 << 20)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _resolve_source(src: str) -> Path:
    path = Path(src).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{src} is not a Hugging Face checkpoint directory (no config.json)")
        return path
    if src.count("/") != 1 or src.startswith((".", "/", "~")):
        raise CodegenLsError(f"checkpoint directory not found: {src}")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        _step(f"downloading {src} from the Hugging Face hub ...")
        local = Path(snapshot_download(src, allow_patterns=list(WEIGHT_PATTERNS)))
        if not any(local.glob("*.safetensors")):  # no safetensors: PyTorch .bin (loaded weights_only)
            local = Path(snapshot_download(src, allow_patterns=[*WEIGHT_PATTERNS, "*.bin"]))
    except LocalEntryNotFoundError:
        raise CodegenLsError(
            f"cannot download '{src}': the Hugging Face hub is not reachable (offline?) and it is not "
            "in the local cache; download the checkpoint elsewhere and pass its local directory"
        ) from None
    except Exception as exc:  # unknown repo, gated, auth, HTTP errors: one clear line
        raise CodegenLsError(
            f"cannot download '{src}' ({type(exc).__name__}): unknown, private or gated "
            "model id; pass a local checkpoint directory instead"
        ) from None
    return local


def _check_config(src: Path) -> dict:
    config = json.loads((src / "config.json").read_text())
    if config.get("model_type") != "codegen":
        raise ModelError(f"{src} is a '{config.get('model_type')}' checkpoint; only CodeGen is supported")
    has_safe = any(src.glob("*.safetensors"))
    has_bin = any(src.glob("*.bin"))
    if not (has_safe or has_bin):
        raise ModelError(f"{src} has no weights (*.safetensors or *.bin)")
    if not has_safe:
        _check_pickled_weights(src)
    return config


def _check_pickled_weights(src: Path) -> None:
    """Open every ``*.bin`` with ``torch.load(weights_only=True)`` (tensors only, no code runs).

    transformers loads them the same way; checking first turns a refused pickle into one clear
    line instead of its fallback errors.
    """
    import torch

    for path in sorted(src.glob("*.bin")):
        try:
            torch.load(str(path), map_location="meta", weights_only=True)
        except Exception as exc:
            # torch's own text advises retrying with weights_only=False: we never do (and never say so)
            lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(exc).splitlines()]
            why = next(
                (ln for ln in lines if re.search(r"unsupported|global", ln, re.I) and "weights_only" not in ln),
                "it holds objects other than tensors",
            )
            why = why.removeprefix("WeightsUnpickler error: ").split(". Please")[0].rstrip(".")
            raise ModelError(
                f"{path} is not a plain PyTorch weights file ({why}): codegen-ls reads .bin weights "
                "only with torch.load(weights_only=True), never without it, because unpickling such a "
                "file can run any code on this machine; use the checkpoint's safetensors, or convert "
                "it to safetensors where you trust its source"
            ) from None


def _save_tokenizer(src: Path, out: Path) -> None:
    if (src / "tokenizer.json").is_file():
        shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src), use_fast=True)
    tok.backend_tokenizer.save(str(out / "tokenizer.json"))


def quantize(src_onnx: Path, dst_onnx: Path, external: bool, exclude: list[str] | None = None) -> None:
    """Weight-only int8 dynamic quantization of every MatMul/Gemm (per-tensor, signed).

    ``external``: write the weights as ONNX external data (``model.onnx.data``), required past
    the 2 GB protobuf limit. ``exclude``: node names left in fp32 (activation x activation).
    """
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # its "consider pre-processing" advice is for CNNs
    try:
        quantize_dynamic(
            str(src_onnx),
            str(dst_onnx),
            weight_type=QuantType.QInt8,
            per_channel=False,
            op_types_to_quantize=["MatMul", "Gemm"],
            use_external_data_format=external,
            nodes_to_exclude=exclude or [],
            # ONNX shape inference stops at com.microsoft ops (our graphs): everything is float
            extra_options={"DefaultTensorType": TensorProto.FLOAT},
        )
    finally:
        root.setLevel(level)


def _copy_fp32(tmp_dir: Path, out: Path, external: bool) -> None:
    """Copy the exported fp32 model, converting it to external data when asked and not already."""
    already = any(p.name != "model.onnx" for p in tmp_dir.glob("model.onnx*"))
    if external and not already:
        import onnx

        model = onnx.load(str(tmp_dir / "model.onnx"))
        onnx.save(
            model,
            str(out / "model.onnx"),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location="model.onnx.data",
            size_threshold=1024,
        )
        return
    for p in tmp_dir.glob("model.onnx*"):  # model.onnx (+ model.onnx_data written by optimum past 2 GB)
        shutil.copyfile(p, out / p.name)


def _export_optimum(source: Path, tmp_dir: Path) -> None:
    try:
        from optimum.exporters.onnx import main_export
    except ImportError:
        raise CodegenLsError("export needs the export extra: pip install 'codegen-ls[export]' torch==2.13.0") from None
    try:
        # trust_remote_code stays False; transformers loads *.safetensors, or *.bin with
        # torch.load(weights_only=True), so no pickled code ever runs.
        main_export(
            str(source),
            output=tmp_dir,
            task="text-generation-with-past",
            do_validation=False,
            no_post_process=False,
            device="cpu",
        )
    except Exception as exc:  # unreadable or unsafe weights, unsupported config: one line
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise ModelError(f"cannot export {source}: {lines[0]}") from None


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


def _export_graph(
    src: Path,
    out: Path,
    external: bool | None,
    quantized: bool,
    int4: bool,
    tokenizer: Path | None = None,
    kv_bits: int = 8,
    check_kv4: bool = False,
) -> tuple[bool, int, KvCheck | None]:
    """Build our graph (``gqa``, :mod:`codegen_ls.export.graph_builder`) from the
    checkpoint read tensor by tensor (:mod:`codegen_ls.export.source`) straight into ``out``
    (``model.onnx``, and ``model.onnx.data`` written weight by weight when ``external``). A
    quantized graph gets an int8 KV cache, calibrated here on text encoded with
    ``tokenizer`` (the exported ``tokenizer.json``), or with ``kv_bits`` 4 a 4-bit one (a scale
    per token: nothing to calibrate). ``check_kv4`` (``--kv-bits auto``): first check what the
    4-bit cache costs the checkpoint (:mod:`codegen_ls.export.kv_check`) and take the int8 one
    instead where it costs too much. The calibration and the check run the torch model one layer
    at a time (:mod:`codegen_ls.export.calibrate`).

    Returns (whether external data was used, the KV cache's bits, the check's result or None).
    """
    from codegen_ls.export import calibrate
    from codegen_ls.export.graph_builder import GraphOptions, build_graph
    from codegen_ls.export.source import CheckpointSource

    _return_freed_memory(start=True)
    try:
        source = CheckpointSource(src)
        scales, result = None, None
        if quantized and (kv_bits == 8 or check_kv4):
            _step("      calibrating the int8 KV cache (the torch model, one layer at a time) ...")
            cfg = source.config
            batches = calibration_batches(
                tokenizer, int(cfg.get("n_positions") or cfg.get("n_ctx") or 2048), int(cfg["vocab_size"])
            )
            if check_kv4:
                _step("      checking what the 4-bit KV cache costs this checkpoint (codegen_ls.export.kv_check) ...")
            scales, result = calibrate.run(source, batches, check=check_kv4)
            _return_freed_memory()
            if result is not None:
                loss = result.loss
                verdict = (
                    "the 4-bit cache"
                    if result.four_bit_ok
                    else (f"the int8 cache (the 4-bit one costs more than {kv_check.KV4_TOLERANCE} over it)")
                )
                _step(
                    f"      loss on {result.tokens} tokens of Python: {loss['exact']:.4f} exact, {loss['int8']:.4f} "
                    "with "
                    f"the int8 KV cache, {loss['int4']:.4f} with the 4-bit one: {verdict}"
                )
                kv_bits = 4 if result.four_bit_ok else 8
            if kv_bits == 4:
                scales = None
        if external is None:  # 2 GB is protobuf's limit; decided on the float32 size, as before quantizing
            external = source.fp32_bytes() > 1_800_000_000
        options = GraphOptions(
            int8=quantized,
            int4_block=INT4_BLOCK if int4 else 0,
            kv_int8=scales,
            kv_int4=kv_bits == 4,
        )
        build_graph(source, out / "model.onnx", options, external)
    except CodegenLsError:
        raise
    except Exception as exc:  # unreadable weights, unexpected shapes: one line
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise ModelError(f"cannot export {src}: {lines[0]}") from None
    return external, kv_bits, result


def default_kv_bits(graph: str = "gqa", quantize_int8: bool = True, head_dim: int = 64) -> int:
    """The KV cache's bits when ``--kv-bits`` is not given: 4 for a quantized gqa graph where our
    kernel runs the 4-bit cache's attention vectorized here (library built and not turned off;
    AVX-512 VNNI, or AVX2; head sizes a multiple of 8, as CodeGen's all are), which is faster
    at long context and half the memory; else 8, which runs fast anywhere."""
    fast4 = graph == "gqa" and quantize_int8 and not kernels.disabled_by_env() and kernels.vector4(True, head_dim)
    return 4 if fast4 else 8


def export(
    src: str,
    out: Path,
    quantize_int8: bool = True,
    force: bool = False,
    external_data: bool | None = None,
    graph: str = "gqa",
    int4: bool = False,
    name: str | None = None,
    kv_bits: int | None = None,
) -> Manifest:
    """Export ``src`` into ``out`` and return the manifest written there.

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
    big-model path).
    """
    t0 = time.time()
    if graph not in ("optimum", "gqa"):
        raise CodegenLsError(f"unknown graph kind '{graph}' (gqa or optimum)")
    if int4 and (graph == "optimum" or not quantize_int8):
        raise CodegenLsError("int4 weights need our graph (--graph gqa) and quantization (no --no-quantize)")
    if kv_bits not in (None, 4, 8):
        raise CodegenLsError(f"--kv-bits must be 8 or 4, not {kv_bits}")
    if kv_bits == 4 and (graph != "gqa" or not quantize_int8):
        raise CodegenLsError("a 4-bit KV cache needs the gqa graph and quantization (no --no-quantize)")
    source = _resolve_source(src)
    config = _check_config(source)
    auto = kv_bits is None
    head_dim = int(config["n_embd"]) // int(config["n_head"])
    if kv_bits is None:
        kv_bits = default_kv_bits(graph, quantize_int8, head_dim)
    if auto and graph == "gqa" and quantize_int8:
        _step(
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
        _step(
            "note: the 4-bit KV cache's attention has no fast path on this machine (it needs the compiled kernel, and "
            "AVX-512 VNNI or AVX2): the model will serve slowly here, or not at all without the kernel"
        )
    if out.exists() and any(out.iterdir()):
        if not force:
            raise CodegenLsError(f"output directory is not empty: {out} (use --force to overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(source, out)  # first: the int8 KV cache's calibration encodes text with it

    checked = None
    if graph == "gqa":
        _step(
            f"[1/3] building the {graph} ONNX graph of {source} weight by weight (codegen_ls.export.graph_builder) ..."
        )
        external_data, kv_bits, checked = _export_graph(
            source,
            out,
            external_data,
            quantize_int8,
            int4,
            out / "tokenizer.json",
            kv_bits,
            check_kv4=auto and kv_bits == 4,
        )
        _step(
            "[2/3] "
            + (
                "weights quantized as they were written (int8 per tensor, as onnxruntime.quantization's "
                "dynamic quantization)"
                if quantize_int8
                else "keeping fp32 weights (--no-quantize)"
            )
        )
    else:
        with tempfile.TemporaryDirectory(prefix="codegen-ls-export-") as tmp:
            tmp_dir = Path(tmp)
            _step(f"[1/3] exporting {source} to ONNX with past key/values (optimum) ...")
            _export_optimum(source, tmp_dir)
            exported = tmp_dir / "model.onnx"
            size = sum(p.stat().st_size for p in tmp_dir.glob("model.onnx*"))
            if external_data is None:  # optimum already wrote external data past 2 GB
                external_data = size > 1_800_000_000 or any(p.name != "model.onnx" for p in tmp_dir.glob("model.onnx*"))
            if quantize_int8:
                _step("[2/3] int8 dynamic quantization (onnxruntime.quantization) ...")
                quantize(exported, out / "model.onnx", external_data)
            else:
                _step("[2/3] keeping fp32 weights (--no-quantize)")
                _copy_fp32(tmp_dir, out, external_data)
    _step("[3/3] writing manifest.json (tokenizer.json is already there) ...")
    quantization = "none" if not quantize_int8 else f"int4-block{INT4_BLOCK}+int8-dynamic" if int4 else "int8-dynamic"
    kv_dtype = "float32" if graph != "gqa" or not quantize_int8 else "int4" if kv_bits == 4 else "int8"
    return _write_manifest(src, out, config, quantization, graph, t0, name, kv_dtype, checked)


def _write_manifest(
    src: str,
    out: Path,
    config: dict,
    quantization: str,
    graph: str,
    t0: float,
    name: str | None = None,
    kv_dtype: str = "float32",
    checked: KvCheck | None = None,
) -> Manifest:
    n_head = int(config["n_head"])
    files = {p.name: sha256(p) for p in sorted(out.iterdir()) if p.is_file() and p.name != "manifest.json"}
    manifest = Manifest(
        architecture="codegen",
        vocab_size=int(config["vocab_size"]),
        context_length=int(config.get("n_positions") or config.get("n_ctx") or 2048),
        n_layer=int(config["n_layer"]),
        n_head=n_head,
        head_dim=int(config["n_embd"]) // n_head,
        bos_token_id=int(config.get("bos_token_id") or 0),
        eos_token_id=int(config.get("eos_token_id") or 0),
        quantization=quantization,
        source=str(src),
        files=files,
        name=name or Path(str(src).rstrip("/")).name,
        extra={
            "graph": graph,
            "kv_dtype": kv_dtype,
            "rotary_dim": config.get("rotary_dim"),
            "n_embd": config.get("n_embd"),
            "exported_with": _versions(),
            "export_seconds": round(time.time() - t0, 1),
        },
        fim=fim.to_json() if (fim := detect_fim(out / "tokenizer.json")) is not None else {},
    )
    if graph == "gqa" and kv_dtype == "int8":  # its decode branch is our op (with a GQA function body)
        manifest.extra["decode_attention"] = kernels.OP
    if graph == "gqa" and kv_dtype == "int4":  # our op, which only our kernel implements
        manifest.extra["decode_attention"] = kernels.OP4
        manifest.extra.update(kvcache.manifest_flags())  # the format: keys stored as kR, rows in the kernel's order
    if checked is not None:  # --kv-bits auto: what the 4-bit cache cost the checkpoint
        manifest.extra["kv_check"] = checked.to_json()
    write_manifest(out, manifest)
    read_manifest(out)
    _step(f"done in {time.time() - t0:.1f}s: {out} ({sum(p.stat().st_size for p in out.iterdir()) / 1e6:.1f} MB)")
    return manifest


def random_checkpoint(
    out: Path,
    *,
    vocab_size: int = 8192,
    n_positions: int = 2048,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    rotary_dim: int = 8,
    tokenizer: Path | None = None,
    eos_token_id: int = 0,
    suppress_eos: bool = True,
    seed: int = 0,
    safetensors: bool = True,
) -> Path:
    """Save a random-weight ``CodeGenForCausalLM`` of the given shape (tests and benchmarks).

    ``tokenizer``: a ``tokenizer.json`` copied next to the weights (``vocab_size`` grows to its size
    where it is larger). ``suppress_eos``: a -1e4 bias on the EOS logit, so decoding always runs to
    its length (stable benchmarks and token-for-token comparisons).
    """
    import torch
    from transformers import CodeGenConfig, CodeGenForCausalLM

    if tokenizer is not None:  # the vocabulary grows to fit the tokenizer (its added tokens: FIM)
        from tokenizers import Tokenizer as HFTokenizer

        vocab_size = max(vocab_size, HFTokenizer.from_file(str(tokenizer)).get_vocab_size())
    config = CodeGenConfig(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_ctx=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        rotary_dim=rotary_dim,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = CodeGenForCausalLM(config).eval()
    if suppress_eos:
        with torch.no_grad():
            model.lm_head.bias[eos_token_id] = -1e4
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=safetensors)
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "tokenizer.json")
    return out


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    result = {}
    for name in ("torch", "transformers", "optimum-onnx", "onnxruntime", "onnx"):
        try:
            result[name] = version(name)
        except PackageNotFoundError:
            pass
    return result


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
