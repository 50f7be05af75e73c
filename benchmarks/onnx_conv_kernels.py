"""Benchmark: how onnxruntime runs one quantized convolution, for each way a QDQ graph can express it.

Why `export --format onnx` lowers convolutions as it does (`vitqtool/export/onnx_graph.py`). One conv
layer, three shapes (a dense 3x3, a 1x1 and a depthwise 7x7, ResNet-50 / ConvNeXt-T sizes), 4-bit codes
stored in int8/uint8, five graphs taking turns:

- `float`: the float Conv on float weights (onnxruntime's NCHWc kernels), the reference speed;
- `QLinearConv`: DQ -> Conv -> Q fused by onnxruntime; its output is requantized to 8 bits, so the export
  uses it only where vitqtool quantizes the conv's output anyway (a ReLU conv feeding one quantizer);
- `ConvInteger`: uint8 codes, int32 accumulation, one DequantizeLinear of the accumulator and a bias Add:
  exact with a float output;
- `DQ -> float Conv`: the input codes dequantized, then the float conv on weights dequantized at load
  (Cast/Mul, constant-folded): exact, float kernel;
- `DQ -> Conv (DQ weights)`: the same with a DequantizeLinear on the weights, which onnxruntime keeps in the
  graph (no constant folding of DQ, no NCHWc kernel).

Prints the optimized graph's op types and the median time of each (1 thread, batch 8).

    python benchmarks/onnx_conv_kernels.py > benchmarks/results/onnx_conv_kernels.txt
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

SHAPES = {  # name: (channels in, channels out, spatial size, kernel, groups)
    "3x3 dense 64->64 @56": (64, 64, 56, 3, 1),
    "1x1 dense 64->256 @56": (64, 256, 56, 1, 1),
    "7x7 depthwise 384 @14": (384, 384, 14, 7, 384),
}


def graphs(cin: int, cout: int, size: int, k: int, groups: int) -> dict:
    """name -> (nodes, initializers) of the five ways to run one quantized conv."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    codes = rng.integers(-8, 8, (cout, cin // groups, k, k)).astype(np.int8)
    w_scale = ((rng.random(cout) + 0.5) * 0.01).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    x_scale = np.float32(0.05)
    init = numpy_helper.from_array
    conv = {"kernel_shape": [k, k], "pads": [k // 2] * 4, "group": groups}
    common = [init(x_scale, "sx"), init(np.uint8(8), "zx")]
    q = helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"])
    dq = helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"])
    w_float = (codes * w_scale[:, None, None, None]).astype(np.float32)
    fold = [helper.make_node("Cast", ["wq"], ["wc"], to=TensorProto.FLOAT), helper.make_node("Mul", ["wc", "ws4"], ["wf"])]
    return {
        "float": ([helper.make_node("Conv", ["x", "w", "b"], ["y"], **conv)], [init(w_float, "w"), init(bias, "b")]),
        "QLinearConv": ([q, dq, helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], axis=0),
                         helper.make_node("Conv", ["xd", "wd", "b"], ["c"], **conv),
                         helper.make_node("QuantizeLinear", ["c", "so", "zo"], ["cq"]),
                         helper.make_node("DequantizeLinear", ["cq", "so", "zo"], ["y"])],
                        [*common, init(codes, "wq"), init(w_scale, "ws"), init(bias, "b"), init(np.float32(0.1), "so"), init(np.uint8(128), "zo")]),
        "ConvInteger": ([q, helper.make_node("ConvInteger", ["xq", "wu", "zx", "zw"], ["acc"], **conv),
                         helper.make_node("DequantizeLinear", ["acc", "rs"], ["m"], axis=1), helper.make_node("Add", ["m", "b4"], ["y"])],
                        [*common, init((codes.astype(np.int16) + 8).astype(np.uint8), "wu"), init(np.uint8(8), "zw"),
                         init(x_scale * w_scale, "rs"), init(bias.reshape(1, -1, 1, 1), "b4")]),
        "DQ -> float Conv": ([q, dq, *fold, helper.make_node("Conv", ["xd", "wf", "b"], ["y"], **conv)],
                             [*common, init(codes, "wq"), init(w_scale.reshape(-1, 1, 1, 1), "ws4"), init(bias, "b")]),
        "DQ -> Conv (DQ weights)": ([q, dq, helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], axis=0),
                                     helper.make_node("Conv", ["xd", "wd", "b"], ["y"], **conv)],
                                    [*common, init(codes, "wq"), init(w_scale, "ws"), init(bias, "b")]),
    }


def session(nodes: list, inits: list, cin: int, cout: int, size: int, folder: Path, name: str):
    """An onnxruntime session (1 thread, all optimizations) and its optimized graph's op types."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", cin, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", cout, size, size])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    path = folder / f"{name.replace(' ', '_').replace('>', '')}.onnx"
    onnx.save(model, str(path))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = 1, 1, 3
    opts.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess, [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


def main() -> None:
    """Build the graphs of each shape, time them in turns, print one table per shape."""
    import numpy as np
    import onnxruntime

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=9)
    args = p.parse_args()
    print(f"onnxruntime {onnxruntime.__version__}, 1 thread, batch {args.batch}, 4-bit codes, median of {args.reps} "
          "rotated runs (a shared machine: compare within a table)")
    with tempfile.TemporaryDirectory() as tmp:
        for shape, (cin, cout, size, k, groups) in SHAPES.items():
            x = np.abs(np.random.default_rng(1).standard_normal((args.batch, cin, size, size))).astype(np.float32)
            runs = {}
            for name, (nodes, inits) in graphs(cin, cout, size, k, groups).items():
                runs[name] = session(nodes, inits, cin, cout, size, Path(tmp), f"{shape}-{name}")
            times: dict[str, list[float]] = {name: [] for name in runs}
            for sess, _ in runs.values():
                sess.run(None, {"x": x})
            order = list(runs)
            for turn in range(args.reps):
                for name in order[turn % len(order):] + order[:turn % len(order)]:
                    start = time.perf_counter()
                    runs[name][0].run(None, {"x": x})
                    times[name].append(time.perf_counter() - start)
            base = statistics.median(times["float"])
            print(f"\n{shape}")
            print(f"{'graph':26s} {'ms':>8s} {'vs float':>9s}  optimized graph")
            for name, (_, ops) in runs.items():
                ms = statistics.median(times[name])
                print(f"{name:26s} {1e3 * ms:8.2f} {base / ms:8.2f}x  {' -> '.join(ops)}")


if __name__ == "__main__":
    main()
