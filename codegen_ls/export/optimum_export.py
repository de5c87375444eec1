"""The reference export (``--graph optimum``): optimum-onnx's ``text-generation-with-past``
graph, which loads the whole model, then ``onnxruntime.quantization``'s dynamic int8 weights.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from codegen_ls.errors import CodegenLsError, ModelError
from codegen_ls.export.progress import step

EXTERNAL_BYTES = 1_800_000_000  # past this, ONNX external data (2 GB is protobuf's limit)


def export_optimum(source: Path, out: Path, quantize_int8: bool, external: bool | None) -> bool:
    """Export ``source`` through optimum into ``out/model.onnx``, int8 or fp32; returns whether
    its weights went to external data (``external`` None: decided by size)."""
    with tempfile.TemporaryDirectory(prefix="codegen-ls-export-") as tmp:
        tmp_dir = Path(tmp)
        step(f"[1/3] exporting {source} to ONNX with past key/values (optimum) ...")
        _main_export(source, tmp_dir)
        files = list(tmp_dir.glob("model.onnx*"))
        if external is None:  # optimum already wrote external data past 2 GB
            size = sum(p.stat().st_size for p in files)
            external = size > EXTERNAL_BYTES or any(p.name != "model.onnx" for p in files)
        if quantize_int8:
            step("[2/3] int8 dynamic quantization (onnxruntime.quantization) ...")
            quantize(tmp_dir / "model.onnx", out / "model.onnx", external)
        else:
            step("[2/3] keeping fp32 weights (--no-quantize)")
            _copy_fp32(tmp_dir, out, external)
    return external


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


def _main_export(source: Path, tmp_dir: Path) -> None:
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
