"""The 4-bit cache's decode-attention op inside a model-like graph: where its time goes.

A graph of 20 layers at the 350M shape's sizes, each an int8 GEMV (1024 x 3072, the qkv
projection) -> ``codegen_ls.DecodeAttentionQ4`` over that layer's cache (16 heads of 64, bound
in place) -> an int8 GEMV (1024 x 9216, the rest of a layer's weights). A run is one decode
step; it prints ms per step at 64 and 2000 keys of context (rounds alternating, medians) and
the growth between them. The weights stream through the CPU's caches between the ops as in the
model, which is what makes the op's time here differ from the op alone on a warm cache.

    python benchmarks/bench_decode_op.py                  # the installed kernel, scores of spread ~1
    python benchmarks/bench_decode_op.py --spread 25      # peaked attention: many subnormal weights
    python benchmarks/bench_decode_op.py --op none        # the GEMVs alone (no attention)
    python benchmarks/bench_decode_op.py --lib other.so   # another build of the library
    python benchmarks/bench_decode_op.py --rows 3         # 3 query rows a step (3 candidates)

(``--spread``: the qkv GEMV's output scale, so the queries' and keys' size; at 25 a row's
scores span hundreds and most keys' weights fall below float's normal range, which the kernel
flushes to zero.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from codegen_ls.engine import kernels  # noqa: E402
from codegen_ls.engine.kvcache import key_rotation, layout4, quantize4  # noqa: E402

H, D, LAYERS, CAP, E = 16, 64, 20, 2080, 1024


def graph(spread: float, with_op: bool, rows: int = 1) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    f, f16, u8, i32 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.UINT8, TensorProto.INT32
    # int8 weights of magnitude ~73: a GEMV output's spread is ~73 sqrt(1024) x its scale
    qkv_scale = spread / (73.0 * 32.0)
    inits = [
        numpy_helper.from_array(key_rotation(D), "rotation"),
        numpy_helper.from_array(np.array(0.01, np.float32), "scale"),
        numpy_helper.from_array(np.array(qkv_scale, np.float32), "qkv_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "zero"),
        numpy_helper.from_array(np.array([0], np.int64), "start"),
        numpy_helper.from_array(np.array([E], np.int64), "end"),
        numpy_helper.from_array(np.array([2], np.int64), "axis"),
    ]
    inputs = [
        helper.make_tensor_value_info("x", f, [1, rows, E]),
        helper.make_tensor_value_info("seqlens_k", i32, [1]),
        helper.make_tensor_value_info("total", i32, []),
        helper.make_tensor_value_info("bias", f, [1, 1, rows, None]),
    ]
    nodes, outputs, x = [], [], "x"
    for i in range(LAYERS):
        inits.append(numpy_helper.from_array(rng.integers(-127, 128, (E, 3 * E), dtype=np.int8), f"wa{i}"))
        inits.append(numpy_helper.from_array(rng.integers(-127, 128, (E, 9 * E), dtype=np.int8), f"wb{i}"))
        nodes.append(
            helper.make_node(
                "DynamicQuantizeMatMul", [x, f"wa{i}", "qkv_scale", "zero"], [f"qkv{i}"], domain="com.microsoft"
            )
        )
        nodes.append(helper.make_node("Split", [f"qkv{i}"], [f"q{i}", f"k{i}", f"v{i}"], axis=2, num_outputs=3))
        past = [f"past_key.{i}", f"past_value.{i}", f"past_key_scale.{i}", f"past_value_scale.{i}"]
        present = [p.replace("past", "present") for p in past]
        for name, out, t, last in zip(past, present, [u8, u8, f16, f16], [D // 2, D // 2, 1, 1]):
            inputs.append(helper.make_tensor_value_info(name, t, [1, H, CAP, last]))
            outputs.append(helper.make_tensor_value_info(out, t, [1, H, CAP, last]))
        if with_op:
            nodes.append(
                helper.make_node(
                    "DecodeAttentionQ4",
                    [f"q{i}", f"k{i}", f"v{i}", *past, "seqlens_k", "total", "bias", "rotation"],
                    [f"att{i}", *present],
                    domain="codegen_ls",
                )
            )
        else:
            nodes.append(helper.make_node("Identity", [f"q{i}"], [f"att{i}"]))
            nodes += [helper.make_node("Identity", [p], [o]) for p, o in zip(past, present)]
        nodes.append(
            helper.make_node(
                "DynamicQuantizeMatMul", [f"att{i}", f"wb{i}", "scale", "zero"], [f"mlp{i}"], domain="com.microsoft"
            )
        )
        nodes.append(helper.make_node("Slice", [f"mlp{i}", "start", "end", "axis"], [f"sliced{i}"]))
        nodes.append(helper.make_node("Mul", [f"sliced{i}", "scale"], [f"x{i}"]))
        x = f"x{i}"
    outputs.insert(0, helper.make_tensor_value_info(x, f, [1, rows, E]))
    model = helper.make_model(
        helper.make_graph(nodes, "decode_op", inputs, outputs, initializer=inits),
        opset_imports=[
            helper.make_opsetid("", 18),
            helper.make_opsetid("com.microsoft", 1),
            helper.make_opsetid("codegen_ls", 1),
        ],
    )
    return model.SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spread", type=float, default=1.0, help="the queries' and keys' size (scores ~ spread^2)")
    ap.add_argument("--op", choices=["kernel", "none"], default="kernel", help="none: the GEMVs only")
    ap.add_argument("--lib", help="a build of the kernel library (default: the installed one)")
    ap.add_argument("--rows", type=int, default=1, help="query rows a step (the candidates of one request)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
    so.log_severity_level = 3
    if args.lib:
        so.register_custom_ops_library(args.lib)
    elif kernels.register(so, required=True) is None:
        sys.exit("the decode-attention kernel is not built here")
    sess = ort.InferenceSession(
        graph(args.spread, args.op == "kernel", args.rows), so, providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(1)
    caches = []
    for _ in range(LAYERS):
        pk, pks = quantize4(rng.normal(0, args.spread, (1, H, CAP, D)).astype(np.float32))
        pv, pvs = quantize4(rng.normal(0, 1, (1, H, CAP, D)).astype(np.float32))
        caches.append([layout4(pk, False), layout4(pv, True), pks[..., None].copy(), pvs[..., None].copy()])
    out_name = sess.get_outputs()[0].name

    def binding(past: int) -> object:
        n = past + args.rows
        io = sess.io_binding()
        io.bind_cpu_input("x", rng.normal(0, 1, (1, args.rows, E)).astype(np.float32))
        io.bind_cpu_input("seqlens_k", np.array([n - 1], np.int32))
        io.bind_cpu_input("total", np.array(n, np.int32))
        io.bind_cpu_input("bias", np.zeros((1, 1, args.rows, n), np.float32))
        for i, bufs in enumerate(caches):
            for kind, buf in zip(["key", "value", "key_scale", "value_scale"], bufs):
                io.bind_input(f"past_{kind}.{i}", "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
                io.bind_output(f"present_{kind}.{i}", "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        io.bind_output(out_name, "cpu")
        return io

    ios = {past: binding(past) for past in (64, 2000)}
    times: dict[int, list[float]] = {past: [] for past in ios}
    for _ in range(args.rounds):
        for past, io in ios.items():
            t = time.perf_counter()
            sess.run_with_iobinding(io)
            times[past].append((time.perf_counter() - t) * 1e3)
    a, b = (float(np.median(times[p])) for p in (64, 2000))
    print(
        f"{args.op}, spread {args.spread:g}, {args.rows} row(s), {args.threads} threads, "
        f"{Path(args.lib).name if args.lib else 'installed kernel'}: "
        f"64 keys {a:.2f} ms/step, 2000 keys {b:.2f} ms/step, growth {b - a:.2f} ms ({b / a:.3f}x)"
    )


if __name__ == "__main__":
    main()
