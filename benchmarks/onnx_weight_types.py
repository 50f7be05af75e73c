"""Benchmark: how onnxruntime runs one quantized Linear for three weight storage types in a QDQ graph.

The activation is QuantizeLinear -> DequantizeLinear (uint8, zero point 128) in every case; the weight
DequantizeLinear reads int8 codes (zero point 0), uint8 codes (zero point 8) or ONNX int4 codes
(opset 21). Prints the op types of onnxruntime's optimized graph and the median time of each, taking
turns. This is why `export --format onnx` stores sub-8-bit weights packed in uint8 and unpacks them to
int8 at load time: only the int8 weights get the u8 x s8 integer kernel.

    python benchmarks/onnx_weight_types.py                 # [32, 197, 384] x [384, 1536], 1 thread
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def build(kind: str, k: int, n: int, folder: Path, threads: int):
    """A one-layer QDQ model with `kind` weights; returns (session, optimized op types)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    codes = rng.integers(-8, 8, (k, n)).astype(np.int8)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "za")]
    if kind == "int8":
        inits.append(numpy_helper.from_array(codes, "w"))
        weight = helper.make_node("DequantizeLinear", ["w", "s"], ["wd"])
    elif kind == "uint8+zp":
        inits += [numpy_helper.from_array((codes + 8).astype(np.uint8), "w"), numpy_helper.from_array(np.array(8, np.uint8), "zw")]
        weight = helper.make_node("DequantizeLinear", ["w", "s", "zw"], ["wd"])
    else:
        inits.append(helper.make_tensor("w", TensorProto.INT4, [k, n], codes.reshape(-1).tolist()))
        weight = helper.make_node("DequantizeLinear", ["w", "s"], ["wd"])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "za"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "s", "za"], ["xd"]),
             weight, helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    path = folder / f"{kind}.onnx"
    onnx.save(model, str(path))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = threads, 3
    opts.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session, [node.op_type for node in onnx.load(opts.optimized_model_filepath).graph.node]


def main() -> None:
    """Build the three variants, time them in turns, print a table."""
    import numpy as np
    import onnxruntime

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--k", type=int, default=384)
    p.add_argument("--n", type=int, default=1536)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    x = np.random.default_rng(1).standard_normal((args.batch, args.tokens, args.k), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        built = {kind: build(kind, args.k, args.n, Path(tmp), args.threads) for kind in ("int8", "uint8+zp", "int4")}
        times: dict[str, list[float]] = {kind: [] for kind in built}
        for session, _ in built.values():
            session.run(None, {"x": x})
        for _ in range(args.reps):
            for kind, (session, _) in built.items():
                start = time.perf_counter()
                session.run(None, {"x": x})
                times[kind].append(time.perf_counter() - start)
    base = statistics.median(times["int8"])
    print(f"onnxruntime {onnxruntime.__version__}, [{args.batch}, {args.tokens}, {args.k}] x [{args.k}, {args.n}], "
          f"{args.threads} thread(s), median of {args.reps}")
    print(f"{'weights':10} {'ms':>8} {'x int8':>7}  optimized graph")
    for kind, (_, ops) in built.items():
        ms = 1e3 * statistics.median(times[kind])
        print(f"{kind:10} {ms:8.1f} {ms / 1e3 / base:6.2f}x  {' -> '.join(ops)}")


if __name__ == "__main__":
    main()
