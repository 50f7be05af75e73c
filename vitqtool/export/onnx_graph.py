"""Lower the traced marker graph (`onnx_trace`) into a standard QDQ ONNX graph that onnxruntime runs on integer kernels.

One set of graph rules for every model family; the rules look at ops and tensors, never at module names.

- **Weights** (`vitqtool::Weight`): integer codes as initializers, DequantizeLinear with the step (one per
  tensor, or one per output channel). A Linear's weight transpose is folded into the codes (`[in, out]`,
  per-column scale), and a 2-D Gemm (a classifier on pooled features) becomes a 3-D MatMul + Add:
  onnxruntime turns a 2-D MatMul + Add into a float Gemm before its QDQ fusion. 3/4-bit codes are stored
  two per byte, 2-bit codes four per byte, in a uint8 initializer unpacked by a small constant subgraph
  (BitShift, BitwiseAnd, Cast, Sub on int8) that onnxruntime folds once at session start.
- **Activations** (`vitqtool::Act`): QuantizeLinear, plus an integer Clip below 8 bits
  (`round(clamp(x/s))` = `clamp(round(x/s))` for integer bounds, so the codes are vitqtool's). Signed
  codes are uint8 with zero point `2^(b-1)` (u8 x s8 is the fast integer kernel on x86) or int8 with zero
  point 0 when they are the right operand of an activation x activation MatMul (K, V); unsigned codes
  are uint8 with zero point 0. The DequantizeLinear moves forward through data movement (Reshape,
  Transpose, Slice, Gather, Split, ..., MaxPool) onto the 8-bit tensor, a multiplication by a positive
  constant scalar (the attention scale) is folded into its scale, and every consumer gets its own
  DequantizeLinear: each matmul/conv input is then a DequantizeLinear of integer codes, the pattern
  onnxruntime fuses into an integer kernel. A learned offset `beta` (the GELU output) is a Sub before the
  QuantizeLinear; the `+ beta` after it is folded into the consumer's bias (`bias + beta * sum_i W_hat[:, i]`).
- **Convolutions**: a BatchNormalization after a quantized conv is folded into its per-output-channel
  weight scale and bias (exact in real arithmetic). When the conv's output (after that BatchNorm and a
  ReLU) is read only by one quantizer, the group DQ -> Conv -> (Relu) -> Q is left for onnxruntime's
  QLinearConv (the requantization is the quantizer vitqtool applies there anyway; an unsigned quantizer's
  saturation at 0 is the ReLU); its weight codes are scaled by 2^k (and the scale by 2^-k) so that the
  bias, which QLinearConv rounds to the accumulator's grid, is rounded 2^k times finer. Any other dense
  quantized conv keeps its output in float, as vitqtool does (integer accumulation, exact, then a float
  rescale and the exact float bias). An unpadded 1x1 conv becomes a matmul over channels: [Slice with
  steps for a stride] -> Transpose to NHWC -> DQ -> MatMul -> Add bias -> Transpose back, which onnxruntime
  fuses into MatMulIntegerToFloat (u8 x s8) and whose transposes its layout optimizer cancels against the
  NHWC ones around QLinearConv (a bottleneck's last conv and its shortcut: about a third of the kernel time of
  ConvInteger and its int32 rescale, `benchmarks/inference.py`). Any other (a 7x7 stem, a patch
  embedding) becomes ConvInteger (uint8 codes, int32 accumulation) and one DequantizeLinear of the
  accumulator (x_scale * w_scale per channel).
- **Float layers**: a quantized layer whose input is float (no input quantizer, as a patch merging's
  reduction) and a grouped conv with a float output (onnxruntime's ConvInteger runs a depthwise conv at
  0.04x the speed of its float conv: `benchmarks/onnx_conv_kernels.py`) multiply float values by their
  weights dequantized by Cast and Mul, folded once at session start; the file still stores integer codes.
- What stays float is what vitqtool computes in float: norms, softmax, GELU, residual adds, biases and
  position embeddings (`onnx_export.STAYS_FLOAT` says it in one line).

Differences from vitqtool's logits come from float summation order (integer accumulation is exact), the
folded scales and BatchNorms and QLinearConv's bias rounding, which can move a value across a rounding
boundary of a later quantizer (a one-step change of that code).
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from ..errors import ExportFormatError
from .onnx_trace import DOMAIN, ActInfo, QuantTables, WeightInfo, trace_model

OPSET = 20
IR_VERSION = 10
# ops that only move or select elements: they run on the 8-bit codes as well as on floats (data input 0)
MOVEMENT = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Gather", "Split", "Expand", "MaxPool"})


@dataclass
class GraphTables:
    """What the lowering recorded: quantized layers and activation quantizers (for inspect, tests and the summary)."""

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    activations: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class _QDQ:
    """A DequantizeLinear the lowering created for an activation quantizer's codes: the quantizer and the scale it applies."""

    info: ActInfo
    scale: float


class Graph:
    """A mutable ONNX graph: nodes, numpy initializers, producer and consumer maps kept up to date."""

    def __init__(self, proto: Any) -> None:
        from onnx import numpy_helper

        g = proto.graph
        self.proto = proto
        self.inits: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.nodes: dict[int, Any] = {}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = collections.defaultdict(list)
        self.outputs = [o.name for o in g.output]
        self.used: set[str] = set(self.inits) | {i.name for i in g.input} | set(self.outputs)
        self.dq: dict[int, _QDQ] = {}  # id(DequantizeLinear node) of an activation -> what it dequantizes
        self.weights: dict[str, dict[str, Any]] = {}  # code initializer -> {"layer", "bits", "offset_binary"}
        self.kernels: dict[str, tuple[str, int]] = {}  # layer -> (onnxruntime kernel, input bits) decided by _lower_convs
        for node in g.node:
            self.add(node)

    # ------------------------------------------------------------------ bookkeeping

    def fresh(self, base: str) -> str:
        """A new unique tensor/node name starting with `base`."""
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name

    def add(self, node: Any) -> Any:
        """Insert a node (order does not matter: `to_model` sorts)."""
        self.nodes[id(node)] = node
        self.used.update(node.output)
        self.used.add(node.name)
        for o in node.output:
            self.producer[o] = node
        for i in node.input:
            if i:
                self.consumers[i].append(node)
        return node

    def remove(self, node: Any) -> None:
        """Delete a node (its outputs must be unused or re-produced)."""
        del self.nodes[id(node)]
        self.dq.pop(id(node), None)
        for o in node.output:
            if self.producer.get(o) is node:
                del self.producer[o]
        for i in node.input:
            if i and node in self.consumers[i]:
                self.consumers[i].remove(node)

    def set_input(self, node: Any, index: int, name: str) -> None:
        """Point input `index` of `node` at tensor `name`."""
        old = node.input[index]
        if old and node in self.consumers[old]:
            self.consumers[old].remove(node)
        node.input[index] = name
        if name:
            self.consumers[name].append(node)

    def replace_uses(self, old: str, new: str) -> None:
        """Every reader of `old` reads `new` instead (graph outputs keep their name through an Identity)."""
        for node in list(self.consumers[old]):
            for k, name in enumerate(node.input):
                if name == old:
                    self.set_input(node, k, new)
        if old in self.outputs:
            self.op("Identity", [new], old, name_out=old)

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer (None for a computed tensor)."""
        return self.inits.get(name)

    def add_const(self, base: str, value: Any, dtype: Any = None) -> str:
        """A new initializer and its name."""
        name = self.fresh(base)
        self.inits[name] = np.asarray(value, dtype=dtype)
        return name

    def op(self, op_type: str, inputs: list[str], base: str, outputs: int = 1, name_out: str | None = None, **attrs: Any) -> Any:
        """Append one node; returns its output name (a list when `outputs` > 1)."""
        from onnx import helper

        outs = [name_out] if name_out else [self.fresh(base if outputs == 1 else f"{base}_{i}") for i in range(outputs)]
        self.add(helper.make_node(op_type, inputs, outs, name=self.fresh(f"{base}/{op_type}"), **attrs))
        return outs[0] if outputs == 1 else outs

    def rename_output(self, node: Any, index: int, name: str) -> None:
        """Make `node` write output `index` under a new tensor name (readers of the old name are not moved)."""
        old = node.output[index]
        if self.producer.get(old) is node:
            del self.producer[old]
        node.output[index] = name
        self.producer[name] = node

    def readers(self, name: str) -> list[Any]:
        """The nodes reading tensor `name`."""
        return list(self.consumers.get(name, []))

    def only_reader(self, name: str) -> Any | None:
        """The single node reading `name` (None when it has several readers or is a graph output)."""
        readers = self.readers(name)
        return readers[0] if len(readers) == 1 and name not in self.outputs else None

    def attr(self, node: Any, name: str, default: Any = None) -> Any:
        """A node attribute's value."""
        from onnx import helper

        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def set_attr(self, node: Any, name: str, value: Any) -> None:
        """Set (or add) a node attribute."""
        from onnx import helper

        for k, a in enumerate(node.attribute):
            if a.name == name:
                del node.attribute[k]
                break
        node.attribute.append(helper.make_attribute(name, value))

    def prune(self) -> None:
        """Drop nodes whose outputs nobody reads, and unread initializers."""
        changed = True
        while changed:
            changed = False
            for node in list(self.nodes.values()):
                if not any(self.consumers.get(o) or o in self.outputs for o in node.output):
                    self.remove(node)
                    changed = True
        for name in [n for n in self.inits if not self.consumers.get(n)]:
            del self.inits[name]

    def to_model(self) -> Any:
        """The ModelProto: nodes in topological order, opset `OPSET` (no private domain left)."""
        import onnx
        from onnx import helper, numpy_helper

        self.prune()
        ready = set(self.inits) | {i.name for i in self.proto.graph.input} | {""}
        pending = list(self.nodes.values())
        ordered = []
        waiting: dict[str, list[Any]] = collections.defaultdict(list)
        missing = {id(n): sum(1 for i in n.input if i not in ready) for n in pending}
        queue = collections.deque(n for n in pending if missing[id(n)] == 0)
        for n in pending:
            for i in n.input:
                if i not in ready:
                    waiting[i].append(n)
        while queue:
            node = queue.popleft()
            ordered.append(node)
            for o in node.output:
                for reader in waiting.pop(o, []):
                    missing[id(reader)] -= list(reader.input).count(o)
                    if missing[id(reader)] == 0:
                        queue.append(reader)
        if len(ordered) != len(pending):
            raise ExportFormatError("internal error: the lowered ONNX graph has a cycle or an unproduced input")
        g = self.proto.graph
        graph = helper.make_graph(ordered, "vitqtool", list(g.input), list(g.output),
                                  [numpy_helper.from_array(v, k) for k, v in self.inits.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="vitqtool")
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        return model


# ---------------------------------------------------------------------- entry point


def build_graph(model: nn.Module, input_size: tuple[int, int, int], requantized_convs: bool = True) -> tuple[Any, GraphTables]:
    """The QDQ ONNX ModelProto of a prepared, calibrated vitqtool model (eval, CPU) and its layer/quantizer tables.

    Input `[batch, *input_size]` (batch dynamic, image size fixed). `requantized_convs=False` gives every dense
    quantized conv a float output (exact float bias: ConvInteger, or MatMulIntegerToFloat for a 1x1) instead of
    QLinearConv. Raises ExportFormatError when the model cannot be traced.
    """
    proto, tables = trace_model(model, input_size)
    g = Graph(proto)
    _drop_identities(g)
    _lower_weights(g, tables)
    _lower_acts(g, tables)
    _fold_batchnorms(g)
    _float_layers(g)
    _lower_convs(g, requantized_convs)
    out = GraphTables()
    _describe(g, tables, out)
    _pack_weights(g)
    return g.to_model(), out


# ---------------------------------------------------------------------- passes


def _drop_identities(g: Graph) -> None:
    """Identity nodes (the exporter's aliases of shared parameters) read through."""
    for node in [n for n in g.nodes.values() if n.op_type == "Identity" and n.output[0] not in g.outputs]:
        g.remove(node)
        g.replace_uses(node.output[0], node.input[0])
    for node in [n for n in g.nodes.values() if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value"]:
        from onnx import numpy_helper

        g.remove(node)
        g.inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)


def _marker_name(g: Graph, node: Any) -> str:
    return g.attr(node, "name").decode()


def _weight_dq(g: Graph, w: WeightInfo, codes: np.ndarray, scale: np.ndarray, axis: int) -> str:
    """DequantizeLinear of int8 `codes` (an initializer `{layer}.weight_codes`) with per-tensor or per-`axis` scale."""
    codes_name = g.add_const(f"{w.layer}.weight_codes", codes.astype(np.int8))
    g.weights[codes_name] = {"layer": w.layer, "bits": w.bits, "offset_binary": False}
    scale_name = g.add_const(f"{w.layer}.weight_scale", scale.reshape(()) if scale.size == 1 else scale.astype(np.float32))
    attrs = {"axis": axis} if scale.size > 1 else {}
    return g.op("DequantizeLinear", [codes_name, scale_name], f"{w.layer}/weight_dq", **attrs)


def _lower_weights(g: Graph, tables: QuantTables) -> None:
    """`vitqtool::Weight` -> DequantizeLinear of integer codes; Transpose and Gemm of a Linear's weight folded into the codes."""
    for node in [n for n in g.nodes.values() if n.domain == DOMAIN and n.op_type == "Weight"]:
        w = tables.weights[_marker_name(g, node)]
        g.remove(node)
        readers = g.readers(node.output[0])
        for reader in readers:
            if reader.op_type == "Transpose" and list(g.attr(reader, "perm", [1, 0])) == [1, 0] and w.codes.ndim == 2:
                g.remove(reader)
                g.replace_uses(reader.output[0], _weight_dq(g, w, w.codes.T, w.scale, 1))
            elif reader.op_type == "Gemm" and reader.input[1] == node.output[0] and w.codes.ndim == 2:
                _gemm_as_matmul(g, reader, w)
            else:
                for k, name in enumerate(reader.input):
                    if name == node.output[0]:
                        g.set_input(reader, k, _weight_dq(g, w, w.codes, w.scale, 0))
        if node.output[0] in g.outputs:
            raise ExportFormatError(f"'{w.layer}': a weight is a graph output")


def _gemm_as_matmul(g: Graph, gemm: Any, w: WeightInfo) -> None:
    """Gemm(x [B, K], W, b) of a quantized Linear -> Squeeze(MatMul(Unsqueeze(x) [B, 1, K], W^T) + b)."""
    if g.attr(gemm, "transA", 0) or g.attr(gemm, "alpha", 1.0) != 1.0 or g.attr(gemm, "beta", 1.0) != 1.0:
        raise ExportFormatError(f"'{w.layer}': a Gemm with transA/alpha/beta is not supported by the ONNX export")
    codes = w.codes.T if g.attr(gemm, "transB", 0) else w.codes  # [K, N]
    axis = 1
    g.remove(gemm)
    row = g.op("Unsqueeze", [gemm.input[0], g.add_const(f"{w.layer}.row_axis", [0], np.int64)], f"{w.layer}/row")
    y = g.op("MatMul", [row, _weight_dq(g, w, codes, w.scale, axis)], f"{w.layer}/matmul")
    if len(gemm.input) > 2 and gemm.input[2]:
        y = g.op("Add", [y, gemm.input[2]], f"{w.layer}/out")
    y = g.op("Squeeze", [y, g.add_const(f"{w.layer}.row_axis", [0], np.int64)], f"{w.layer}/squeeze")
    g.replace_uses(gemm.output[0], y)


def _lower_acts(g: Graph, tables: QuantTables) -> None:
    """`vitqtool::Act` -> [Sub beta] -> QuantizeLinear -> [Clip] on the input; DequantizeLinear per consumer, moved forward."""
    for node in [n for n in g.nodes.values() if n.domain == DOMAIN and n.op_type == "Act"]:
        name, y = _marker_name(g, node), node.output[0]
        info = tables.acts[name]
        requantizes = info.offset is None and _requantizes_integer_matmul(g, node)
        g.remove(node)
        groups: dict[str, list] = collections.defaultdict(list)
        for use in _terminal_uses(g, y, 1.0):
            groups["uint8" if requantizes else _code_type(info, use)].append(use)
        x = node.input[0]
        if info.offset is not None:
            x = g.op("Sub", [x, g.add_const(f"{name}.offset", np.float32(info.offset))], f"{name}/shifted")
        codes = {dtype: _quantize(g, x, name, info, dtype) for dtype in groups}
        for dtype, group in groups.items():
            _emit_uses(g, codes[dtype], group, name, info, dtype)
        if codes:
            _rewire_shapes(g, y, next(iter(codes.values())))
        _prune_float_path(g, y)
        if g.readers(y) or y in g.outputs:  # a reader no rule covers: the float tensor, dequantized once
            dtype = next(iter(codes), "uint8")
            t = codes[dtype] if codes else _quantize(g, x, name, info, dtype)
            _dequantize(g, t, name, info, dtype, 1.0, name_out=y)


def _requantizes_integer_matmul(g: Graph, marker: Any) -> bool:
    """Whether activation `marker` alone reads a quantized MatMul of quantized codes (no bias between them).

    onnxruntime fuses DQ -> MatMul -> Q into QLinearMatMul only when the output codes have the input's type
    (uint8) and then never falls back to MatMulIntegerToFloat: such a quantizer's codes are uint8 for every
    reader (a K or V without a projection bias is then a u8 x u8 integer matmul instead of a float one).
    """
    x = marker.input[0]
    mm = g.producer.get(x)
    if mm is None or mm.op_type != "MatMul" or g.readers(x) != [marker] or x in g.outputs:
        return False
    w = g.producer.get(mm.input[1])
    if w is None or w.op_type != "DequantizeLinear" or w.input[0] not in g.weights:
        return False
    a = g.producer.get(mm.input[0])
    while a is not None and a.op_type in MOVEMENT:
        a = g.producer.get(a.input[0])
    return a is not None and ((a.domain == DOMAIN and a.op_type == "Act") or id(a) in g.dq)


def _zero_point(info: ActInfo, dtype: str) -> int:
    """Offset-binary zero point `2^(b-1)` for signed codes stored as uint8, else 0."""
    return -info.qn if dtype == "uint8" and info.signed else 0


def _quantize(g: Graph, x: str, name: str, info: ActInfo, dtype: str) -> str:
    """QuantizeLinear of `x` into `dtype`, plus a Clip to the b-bit range below 8 bits; the integer tensor."""
    zp = _zero_point(info, dtype)
    npd = np.uint8 if dtype == "uint8" else np.int8
    t = g.op("QuantizeLinear", [x, g.add_const(f"{name}.scale", np.float32(info.scale)), g.add_const(f"{name}.zero_point", zp, npd)],
             f"{name}/q")
    if info.bits < 8:
        t = g.op("Clip", [t, g.add_const(f"{name}.min", info.qn + zp, npd), g.add_const(f"{name}.max", info.qp + zp, npd)], f"{name}/clip")
    return t


def _dequantize(g: Graph, codes: str, name: str, info: ActInfo, dtype: str, mult: float, name_out: str | None = None,
                with_offset: bool = True) -> str:
    """DequantizeLinear of `codes` with the step times `mult` (+ the offset times `mult` unless `with_offset` is False)."""
    zp = _zero_point(info, dtype)
    offset = None if info.offset is None else info.offset * mult
    scale = g.add_const(f"{name}.dq_scale", np.float32(info.scale * mult))
    zp_name = g.add_const(f"{name}.dq_zero_point", zp, np.uint8 if dtype == "uint8" else np.int8)
    last = offset is None or not with_offset
    dq = g.op("DequantizeLinear", [codes, scale, zp_name], f"{name}/dq", name_out=name_out if last else None)
    g.dq[id(g.producer[dq])] = _QDQ(info, info.scale * mult)
    if not last:
        dq = g.op("Add", [dq, g.add_const(f"{name}.offset", np.float32(offset))], f"{name}/unshifted", name_out=name_out)
    return dq


def _rewire_shapes(g: Graph, tensor: str, codes: str) -> None:
    """Shape readers of a float tensor read its integer twin (same shape)."""
    for reader in g.readers(tensor):
        if reader.op_type == "Shape":
            g.set_input(reader, 0, codes)


def _prune_float_path(g: Graph, tensor: str) -> None:
    """Remove the float data-movement nodes below an activation marker that nothing reads any more."""
    for reader in g.readers(tensor):
        if reader.op_type in MOVEMENT or reader.op_type in ("Mul", "Div"):
            for o in reader.output:
                _prune_float_path(g, o)
            if not any(g.readers(o) or o in g.outputs for o in reader.output):
                g.remove(reader)


def _terminal_uses(g: Graph, tensor: str, mult: float, path: tuple = ()) -> list[tuple]:
    """Every path `((node, input index, multiplier)...)` from an activation marker's output to a reader that computes with it.

    Paths go through data movement (input 0) and multiplications by a positive scalar constant.
    """
    out = []
    for reader in g.readers(tensor):
        for k, inp in enumerate(reader.input):
            if inp != tensor or reader.op_type == "Shape":
                continue
            step = (*path, (reader, k, mult))
            scalar = _positive_scalar(g, reader, k)
            if reader.op_type in MOVEMENT and k == 0:
                for o in reader.output:
                    out += _terminal_uses(g, o, mult, step)
            elif scalar is not None:
                out += _terminal_uses(g, reader.output[0], mult * scalar, step)
            else:
                out.append(step)
    if tensor in g.outputs:
        raise ExportFormatError("a quantized activation is a graph output")
    return out


def _positive_scalar(g: Graph, node: Any, k: int) -> float | None:
    """The constant factor when `node` multiplies input `k` by a positive constant scalar (Mul, or Div by one)."""
    if node.op_type not in ("Mul", "Div") or len(node.input) != 2 or (node.op_type == "Div" and k != 0):
        return None
    c = g.const(node.input[1 - k])
    if c is None or c.size != 1 or not np.issubdtype(c.dtype, np.floating) or not float(c.reshape(-1)[0]) > 0:
        return None
    v = float(c.reshape(-1)[0])
    return v if node.op_type == "Mul" else 1.0 / v


def _code_type(info: ActInfo, path: tuple) -> str:
    """int8 for the right operand of a MatMul of two activations (K, V), uint8 otherwise."""
    node, k, _ = path[-1]
    return "int8" if info.signed and node.op_type == "MatMul" and k == 1 else "uint8"


def _emit_uses(g: Graph, codes: str, paths: list[tuple], name: str, info: ActInfo, dtype: str) -> None:
    """Re-create the data-movement tree of `paths` on the integer tensor `codes`; a DequantizeLinear at each end.

    The `+ offset` is folded into the reader's bias where that is exact (a quantized MatMul or unpadded Conv).
    """
    by_node: dict[int, list[tuple]] = collections.defaultdict(list)
    for p in paths:
        by_node[id(p[0][0])].append(p)
    for group in by_node.values():
        node = group[0][0][0]
        if len(group[0]) == 1:  # a reader that computes: its own DequantizeLinear
            for (reader, k, m), in group:
                fold = info.offset is not None and _fold_offset(g, reader, k, info.offset * m)
                g.set_input(reader, k, _dequantize(g, codes, name, info, dtype, m, with_offset=not fold))
        elif node.op_type in MOVEMENT:
            clone = g.op(node.op_type, [codes, *node.input[1:]], f"{name}/{node.op_type.lower()}", outputs=len(node.output),
                         **{a.name: g.attr(node, a.name) for a in node.attribute})
            for out_name, int_name in zip(node.output, clone if isinstance(clone, list) else [clone]):
                _rewire_shapes(g, out_name, int_name)
                sub = [p[1:] for p in group if p[1][0] in g.readers(out_name)]
                if sub:
                    _emit_uses(g, int_name, sub, name, info, dtype)
        else:  # a positive scalar Mul/Div: folded into the scale
            _emit_uses(g, codes, [p[1:] for p in group], name, info, dtype)


def _weight_of(g: Graph, node: Any) -> tuple[np.ndarray, str, Any] | None:
    """(dequantized float64 weight, code initializer, DequantizeLinear node) of a matmul/conv's weight input 1."""
    if len(node.input) < 2:
        return None
    dq = g.producer.get(node.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in g.weights:
        return None
    codes = g.const(dq.input[0]).astype(np.float64)
    scale = g.const(dq.input[1]).astype(np.float64)
    axis = g.attr(dq, "axis", 1)
    if scale.size > 1:
        shape = [1] * codes.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
    return codes * scale, dq.input[0], dq


def _fold_offset(g: Graph, reader: Any, k: int, offset: float) -> bool:
    """Fold `+ offset` on input `k` of a quantized MatMul (or unpadded Conv) into its bias: `offset * sum_i W_hat[:, i]`."""
    weight = _weight_of(g, reader) if k == 0 else None
    if weight is None:
        return False
    w_hat, codes, _ = weight
    layer = g.weights[codes]["layer"]
    if reader.op_type == "MatMul" and w_hat.ndim == 2:
        fold = (offset * w_hat.sum(axis=0)).astype(np.float32)  # [out]
        add = g.only_reader(reader.output[0])
        if add is not None and add.op_type == "Add":
            j = 1 if add.input[0] == reader.output[0] else 0
            bias = g.const(add.input[j])
            if bias is not None and bias.shape == fold.shape:
                g.set_input(add, j, g.add_const(f"{layer}.bias", bias + fold))
                return True
        g.op("Add", [_detach_output(g, reader), g.add_const(f"{layer}.bias", fold)], f"{layer}/out", name_out=reader.output[0])
        return True
    pads = g.attr(reader, "pads", [0])
    if reader.op_type == "Conv" and not any(pads) and g.attr(reader, "auto_pad", b"NOTSET") in (b"NOTSET", b"VALID"):
        fold = (offset * w_hat.reshape(w_hat.shape[0], -1).sum(axis=1)).astype(np.float32)
        old = g.const(reader.input[2]) if len(reader.input) > 2 and reader.input[2] else np.zeros_like(fold)
        if old is None:
            return False
        bias = g.add_const(f"{layer}.bias", old + fold)
        if len(reader.input) > 2:
            g.set_input(reader, 2, bias)
        else:
            reader.input.append(bias)
            g.consumers[bias].append(reader)
        return True
    return False


def _detach_output(g: Graph, node: Any) -> str:
    """Give `node` a fresh output name and return it, so that a new node can produce the old name (insert after)."""
    new = g.fresh(node.output[0])
    g.rename_output(node, 0, new)
    return new


def _fold_batchnorms(g: Graph) -> None:
    """Conv (quantized weight) -> BatchNormalization: the norm folded into the per-output-channel weight scale and the bias."""
    for conv in [n for n in g.nodes.values() if n.op_type == "Conv"]:
        weight = _weight_of(g, conv)
        bn = g.only_reader(conv.output[0])
        if weight is None or bn is None or bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        params = [g.const(i) for i in bn.input[1:5]]
        if any(p is None for p in params) or g.attr(bn, "training_mode", 0):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        k = gamma / np.sqrt(var + float(g.attr(bn, "epsilon", 1e-5)))
        _, codes, dq = weight
        layer = g.weights[codes]["layer"]
        scale = np.broadcast_to(g.const(dq.input[1]).astype(np.float64).reshape(-1), k.shape)
        g.set_input(dq, 1, g.add_const(f"{layer}.weight_scale", (scale * k).astype(np.float32)))
        g.set_attr(dq, "axis", 0)
        bias = g.const(conv.input[2]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] else np.zeros_like(k)
        new_bias = g.add_const(f"{layer}.bias", ((bias - mean) * k + beta).astype(np.float32))
        if len(conv.input) > 2:
            g.set_input(conv, 2, new_bias)
        else:
            conv.input.append(new_bias)
            g.consumers[new_bias].append(conv)
        g.remove(bn)
        g.replace_uses(bn.output[0], conv.output[0])


def _requantized(g: Graph, conv: Any) -> bool:
    """Whether the conv's output (through an optional ReLU) is read only by one QuantizeLinear (onnxruntime's QLinearConv)."""
    reader = g.only_reader(conv.output[0])
    relu = reader is not None and reader.op_type == "Relu"
    if relu:
        reader = g.only_reader(reader.output[0])
    if reader is None or reader.op_type != "QuantizeLinear":
        return False
    zp = g.const(reader.input[2])
    return zp is not None and zp.dtype == np.uint8 and (not relu or int(zp) == 0)


def _refine_bias_grid(g: Graph, codes: str, wdq: Any, act_bits: int) -> None:
    """Weight codes times 2^k and the weight scale divided by 2^k, the largest k that keeps codes int8 and u8 x s8 pairs in int16.

    onnxruntime's QLinearConv adds the bias on the int32 accumulator's grid (`x_scale * w_scale`), rounding it
    by up to half a step; each halving of that grid halves the chance that the rounding moves an output across
    a rounding boundary of the requantization. The products are unchanged. The int16 bound keeps the pairwise
    sums of x86's u8 x s8 instructions from saturating on processors without VNNI.
    """
    meta = g.weights[codes]
    top = 1 << (meta["bits"] - 1)  # largest |code|
    k = 0
    while top << (k + 1) <= 128 and 2 * ((1 << act_bits) - 1) * (top << (k + 1)) <= 32767:
        k += 1
    if k:
        meta["multiplier"] = 1 << k
        g.set_input(wdq, 1, g.add_const(f"{meta['layer']}.weight_scale", g.const(wdq.input[1]) / np.float32(1 << k)))


def _lower_convs(g: Graph, requantized: bool = True) -> None:
    """A quantized conv of quantized codes: left for QLinearConv when requantized (and `requantized` allows it), else
    a matmul (1x1) or ConvInteger, with one float rescale."""
    for conv in [n for n in g.nodes.values() if n.op_type == "Conv"]:
        weight = _weight_of(g, conv)
        dq = g.producer.get(conv.input[0])
        if weight is None or dq is None or id(dq) not in g.dq:
            continue
        _, codes_name, wdq = weight
        meta = g.weights[codes_name]
        layer, bits = meta["layer"], meta["bits"]
        act = g.dq[id(dq)]
        if requantized and _requantized(g, conv):
            _refine_bias_grid(g, codes_name, wdq, act.info.bits)
            g.kernels[layer] = ("QLinearConv", act.info.bits)
            continue
        if int(g.attr(conv, "group", 1)) > 1:
            # onnxruntime has no fast integer grouped conv with a float output: ConvInteger runs a depthwise conv at
            # 0.04x the speed of its float conv (benchmarks/onnx_conv_kernels.py); the float conv reads the dequantized codes
            _dequantize_at_load(g, conv, wdq, layer)
            g.kernels[layer] = ("Conv (float, grouped)", act.info.bits)
            continue
        if _pointwise(g, conv, g.const(codes_name)):
            _pointwise_as_matmul(g, conv, dq, wdq, layer)
            continue
        codes = g.const(codes_name).astype(np.int16)
        w_zp = 1 << (bits - 1)
        w_u8 = g.add_const(f"{layer}.weight_codes", (codes + w_zp).astype(np.uint8))
        g.weights[w_u8] = {"layer": layer, "bits": bits, "offset_binary": True}
        w_scale = g.const(wdq.input[1]).astype(np.float64).reshape(-1)
        out_ch = codes.shape[0]
        rescale = np.broadcast_to(act.scale * w_scale, (out_ch,)).astype(np.float32)
        attrs = {a.name: g.attr(conv, a.name) for a in conv.attribute}
        acc = g.op("ConvInteger", [dq.input[0], w_u8, dq.input[2], g.add_const(f"{layer}.weight_zero_point", w_zp, np.uint8)],
                   f"{layer}/conv_integer", **attrs)
        out = conv.output[0]
        has_bias = len(conv.input) > 2 and conv.input[2]
        g.remove(conv)
        # the int32 accumulator times x_scale * w_scale[c]: one DequantizeLinear (per output channel, axis 1)
        y = g.op("DequantizeLinear", [acc, g.add_const(f"{layer}.weight_rescale", rescale)], f"{layer}/rescaled",
                 name_out=None if has_bias else out, axis=1)
        if has_bias:
            bias = g.const(conv.input[2])
            g.op("Add", [y, g.add_const(f"{layer}.bias", bias.reshape(1, out_ch, 1, 1))], f"{layer}/out", name_out=out)
        g.kernels[layer] = ("ConvInteger", act.info.bits)


def _pointwise(g: Graph, conv: Any, codes: np.ndarray) -> bool:
    """Whether `conv` (weight `codes`) is a dense unpadded 1x1 conv (any stride): a matmul over the channels of (strided) pixels."""
    return (codes.ndim == 4 and codes.shape[2:] == (1, 1) and int(g.attr(conv, "group", 1)) == 1 and not any(g.attr(conv, "pads", [0]))
            and g.attr(conv, "auto_pad", b"NOTSET") in (b"NOTSET", b"VALID"))


def _pointwise_as_matmul(g: Graph, conv: Any, dq: Any, wdq: Any, layer: str) -> None:
    """1x1 conv with a float output -> [Slice with steps] -> Transpose to NHWC -> DQ -> MatMul (+ bias) -> Transpose to NCHW.

    onnxruntime fuses the DQ -> MatMul pair into MatMulIntegerToFloat (u8 x s8, int32 accumulation and the rescale in
    one kernel; the bias stays an Add), about 3x faster than ConvInteger and its int32 DequantizeLinear; its layout
    optimizer cancels the transposes against the NHWC ones it puts around the neighbouring QLinearConvs.
    """
    codes = dq.input[0]
    strides = [int(s) for s in g.attr(conv, "strides", [1, 1])]
    if strides != [1, 1]:  # a strided 1x1 conv reads every s-th pixel
        codes = g.op("Slice", [codes, g.add_const(f"{layer}.stride_start", [0, 0], np.int64),
                               g.add_const(f"{layer}.stride_end", [np.iinfo(np.int64).max] * 2, np.int64),
                               g.add_const(f"{layer}.stride_axes", [2, 3], np.int64),
                               g.add_const(f"{layer}.stride_steps", strides, np.int64)], f"{layer}/strided")
    nhwc = g.op("Transpose", [codes], f"{layer}/nhwc", perm=[0, 2, 3, 1])
    x = g.op("DequantizeLinear", [nhwc, *dq.input[1:]], f"{layer}/input_dq")
    g.dq[id(g.producer[x])] = g.dq[id(dq)]
    codes_oc = g.const(wdq.input[0])
    w_codes = g.add_const(f"{layer}.weight_codes", codes_oc.reshape(codes_oc.shape[0], -1).T)  # [in, out]: per-column scale
    g.weights[w_codes] = {**g.weights[wdq.input[0]], "offset_binary": False}
    scale = g.const(wdq.input[1])
    attrs = {"axis": 1} if scale.size > 1 else {}
    w = g.op("DequantizeLinear", [w_codes, g.add_const(f"{layer}.weight_scale", scale.reshape(-1) if scale.size > 1 else scale.reshape(()))],
             f"{layer}/weight_dq", **attrs)
    y = g.op("MatMul", [x, w], f"{layer}/matmul")
    if len(conv.input) > 2 and conv.input[2]:
        y = g.op("Add", [y, conv.input[2]], f"{layer}/biased")
    g.remove(conv)
    g.op("Transpose", [y], f"{layer}/nchw", name_out=conv.output[0], perm=[0, 3, 1, 2])


def _dequantize_at_load(g: Graph, node: Any, wdq: Any, layer: str) -> None:
    """Input 1 of `node` becomes its integer weight codes dequantized by Cast and Mul, which onnxruntime folds once at session start.

    For a layer that multiplies float inputs: a DequantizeLinear would stay in the graph (onnxruntime keeps
    them for its QDQ fusions), dequantizing the weight at every run and keeping the layer off its fast float
    kernel (or turning a MatMul into MatMulNBits, which by default quantizes the float input to int8).
    """
    codes, scale = wdq.input[0], g.const(wdq.input[1]).astype(np.float32)
    shape = [1] * g.const(codes).ndim
    if scale.size > 1:
        shape[int(g.attr(wdq, "axis", 1))] = -1
    w = g.op("Cast", [codes], f"{layer}/weight_float", to=1)
    w = g.op("Mul", [w, g.add_const(f"{layer}.weight_scale", scale.reshape(shape) if scale.size > 1 else scale.reshape(()))],
             f"{layer}/weight")
    g.set_input(node, 1, w)
    g.remove(wdq)


def _float_layers(g: Graph) -> None:
    """A quantized MatMul/Conv whose input is float (no input quantizer): float kernel over weights dequantized at load."""
    for node in [n for n in g.nodes.values() if n.op_type in ("MatMul", "Conv")]:
        weight = _weight_of(g, node)
        dq = g.producer.get(node.input[0])
        if weight is not None and (dq is None or id(dq) not in g.dq):
            layer = g.weights[weight[1]]["layer"]
            _dequantize_at_load(g, node, weight[2], layer)
            g.kernels[layer] = (f"{node.op_type} (float input)", None)


def _describe(g: Graph, tables: QuantTables, out: GraphTables) -> None:
    """Per-layer and per-quantizer rows: bits, shapes and which onnxruntime kernel computes each layer."""
    kernels = dict(g.kernels)
    for node in g.nodes.values():
        weight = _weight_of(g, node) if node.op_type in ("MatMul", "Conv") else None
        if weight is None:
            continue
        layer = g.weights[weight[1]]["layer"]
        dq = g.producer.get(node.input[0])
        if dq is not None and id(dq) in g.dq:
            kernels[layer] = ("MatMulIntegerToFloat" if node.op_type == "MatMul" else "QLinearConv", g.dq[id(dq)].info.bits)
    for w in tables.weights.values():
        kernel, act_bits = kernels.get(w.layer, ("?", None))
        out.layers[w.layer] = {"type": w.layer_type, "shape": [int(w.codes.shape[0]), int(math.prod(w.codes.shape[1:]))],
                               "weight_bits": w.bits, "per_channel": w.per_channel, "act_bits": act_bits, "kernel": kernel}
    for name, info in tables.acts.items():
        out.activations[name] = {"bits": info.bits, "signed": info.signed, "offset": info.offset, "scale": info.scale}


def _pack_weights(g: Graph) -> None:
    """Codes of at most 4 bits: two (3/4-bit) or four (2-bit) per byte in a uint8 initializer, unpacked by a folded subgraph.

    The unpacking (BitShift, BitwiseAnd, Cast to int8, Sub of the offset, Mul by the code multiplier) runs
    once at session start: onnxruntime folds constant subgraphs. Wider codes are stored as they are.
    """
    for name, meta in list(g.weights.items()):
        if name not in g.inits:
            continue
        mult = meta.get("multiplier", 1)
        if meta["bits"] > 4:
            if mult > 1:
                g.inits[name] = (g.inits[name].astype(np.int16) * mult).astype(np.int8)
            continue
        codes = g.inits.pop(name)
        bits, layer = meta["bits"], meta["layer"]
        width = 2 if bits <= 2 else 4
        per_byte = 8 // width
        offset = 1 << (bits - 1)
        flat = (codes.reshape(-1).astype(np.int16) + (0 if meta["offset_binary"] else offset)).astype(np.uint8)
        n = flat.size
        flat = np.pad(flat, (0, (-n) % per_byte)).reshape(-1, per_byte)
        packed = np.zeros(flat.shape[0], dtype=np.uint8)
        for j in range(per_byte):
            packed |= (flat[:, j] << (j * width)).astype(np.uint8)
        p = g.add_const(f"{layer}.weight_packed{width}", packed)
        col = g.op("Reshape", [p, g.add_const(f"{layer}.unpack_col", [-1, 1], np.int64)], f"{layer}/unpack")
        shifted = g.op("BitShift", [col, g.add_const(f"{layer}.unpack_shifts", [j * width for j in range(per_byte)], np.uint8)],
                       f"{layer}/unpack", direction="RIGHT")
        masked = g.op("BitwiseAnd", [shifted, g.add_const(f"{layer}.unpack_mask", (1 << width) - 1, np.uint8)], f"{layer}/unpack")
        flat_u = g.op("Reshape", [masked, g.add_const(f"{layer}.unpack_flat", [-1], np.int64)], f"{layer}/unpack")
        if flat.size != n:
            flat_u = g.op("Slice", [flat_u, g.add_const(f"{layer}.unpack_start", [0], np.int64),
                                    g.add_const(f"{layer}.unpack_end", [n], np.int64)], f"{layer}/unpack")
        if not meta["offset_binary"]:  # signed codes: (u - 2^(b-1)) * multiplier, in int8 (every value fits)
            flat_u = g.op("Cast", [flat_u], f"{layer}/unpack", to=3)  # INT8: every u < 16 fits
            flat_u = g.op("Sub", [flat_u, g.add_const(f"{layer}.unpack_offset", offset, np.int8)], f"{layer}/unpack")
            if mult > 1:
                flat_u = g.op("Mul", [flat_u, g.add_const(f"{layer}.unpack_multiplier", mult, np.int8)], f"{layer}/unpack")
        out = g.op("Reshape", [flat_u, g.add_const(f"{layer}.weight_shape", list(codes.shape), np.int64)], f"{layer}/weight_codes")
        g.replace_uses(name, out)
