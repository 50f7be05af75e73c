"""Build the ONNX graph (standard opset 21, written with `onnx.helper`) of a vitqtool-quantized timm ViT/DeiT.

Every enabled LSQ quantizer becomes QuantizeLinear -> (Clip) -> DequantizeLinear with its step as the
scale, placed so that onnxruntime's QDQ fusion turns every quantized matmul into an integer one
(MatMulIntegerToFloat, QLinearMatMul): each matmul input is its own DequantizeLinear, and reshapes and
transposes run on the 8-bit tensors between the Q and the DQ (a per-tensor quantizer commutes with them).

- Codes: b-bit signed codes `c` in `[-2^(b-1), 2^(b-1) - 1]` are stored offset-binary in uint8 with zero
  point `2^(b-1)` (u8 activations x s8 weights is the fast integer kernel on x86); the operands on
  the right of the attention matmuls (K, V) are int8 with zero point 0; unsigned codes (softmax, GELU
  output) are uint8 with zero point 0. Below 8 bits an integer Clip after the QuantizeLinear narrows
  the saturation to the b-bit range: `round(clamp(x/s))` = `clamp(round(x/s))` for integer bounds,
  so the codes are exactly vitqtool's.
- Weights are integer initializers: 8-bit (and 5-7-bit) codes as int8 `[in, out]`; 3/4-bit codes two
  per byte and 2-bit codes four per byte in a uint8 initializer, unpacked to int8 by a small constant
  subgraph (BitShift, BitwiseAnd, Cast, Sub on int8: onnxruntime >= 1.21) that onnxruntime folds once at
  session start.
  Per-tensor steps are scalar scales, per-channel steps are per-column (`axis=1`).
- The GELU output quantizer (unsigned with a learned offset beta): `x - beta` (Sub) before the
  QuantizeLinear, as vitqtool computes it; the `+ beta` after the DequantizeLinear is folded into fc2's
  bias (`bias + beta * sum_i W_hat[:, i]`), so fc2 still takes a plain DequantizeLinear and stays an
  integer matmul. Exact in real arithmetic; the cost is one elementwise Sub over the hidden tensor.
- Fused `qkv`: the q, k and v weights (split or not) are one `[dim, 3*dim]` integer matmul with a
  per-column scale (each part's step repeated), then Split; the attention scale `head_dim^-0.5` is
  folded into the scale of Q's DequantizeLinear.
- The patch-embedding convolution (kernel = stride, no padding) is the same arithmetic as a matmul over
  patches: reshape/transpose the (quantized) image into `[B, patches, C*p*p]` and matmul, so it runs as
  an integer matmul too.
- Disabled quantizers are identities: with every quantizer disabled the builder writes the FP graph.
Differences from vitqtool's logits come from float summation order (integer accumulation is exact) and
the folded scales, which can move a value across a rounding boundary of a later quantizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ExportFormatError
from ..quant import QConv2d, QLinear, QuantAttention, Quantizer

OPSET = 21
IR_VERSION = 10
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass
class QTensor:
    """An integer tensor in the graph with the parameters that dequantize it."""

    name: str
    scale: float
    zero_point: int
    dtype: str  # "uint8" or "int8"
    offset: float | None = None  # learned offset subtracted before quantizing (added back by the consumer)


@dataclass
class GraphTables:
    """What the builder recorded: quantized matmul layers and activation quantizers (for inspect and tests)."""

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    activations: dict[str, dict[str, Any]] = field(default_factory=dict)


def _np_dtype(name: str) -> Any:
    return {"uint8": np.uint8, "int8": np.int8}[name]


def _enabled(q: Quantizer | None) -> bool:
    return q is not None and q.enabled


def _step(q: Quantizer) -> np.ndarray:
    """The effective float32 scale(s) of a quantizer."""
    return q.scale_values().float().cpu().numpy().astype(np.float32)


class Builder:
    """Accumulates nodes and initializers; names are unique and readable (`blocks.0.attn.q_quant/q`)."""

    def __init__(self) -> None:
        from onnx import helper

        self.helper = helper
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.used: set[str] = set()
        self.tables = GraphTables()

    def fresh(self, base: str) -> str:
        """A new unique tensor name starting with `base`."""
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name

    def const(self, base: str, value: np.ndarray | float | int | list, dtype: Any = None) -> str:
        """An initializer (numpy value, dtype as given) and its name."""
        from onnx import numpy_helper

        arr = np.asarray(value, dtype=dtype)
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, outputs: int = 1, **attrs: Any) -> Any:
        """Append one node; returns its output name (or the list of names when `outputs` > 1)."""
        outs = [self.fresh(base if outputs == 1 else f"{base}_{i}") for i in range(outputs)]
        self.nodes.append(self.helper.make_node(op_type, inputs, outs, name=self.fresh(f"{base}/{op_type}"), **attrs))
        return outs[0] if outputs == 1 else outs

    # ------------------------------------------------------------------ quantizers

    def quantize(self, x: str, q: Quantizer, name: str, right_operand: bool = False) -> QTensor:
        """QuantizeLinear (+ Clip below 8 bits) of float `x` with quantizer `q` (enabled, per tensor).

        Signed codes are uint8 with zero point 2^(b-1), or int8 with zero point 0 when `right_operand`
        (the K and V of the attention matmuls); unsigned codes are uint8 with zero point 0. A learned
        offset is subtracted first and recorded in the result.
        """
        spec = q.spec
        if q.scale_values().numel() != 1:
            raise ExportFormatError(f"'{name}': per-channel activation steps are not supported by the ONNX export")
        scale = float(_step(q).reshape(-1)[0])
        offset = q.offset_value()
        if offset is not None:
            x = self.op("Sub", [x, self.const(f"{name}.offset", np.float32(offset))], f"{name}/shifted")
        if spec.signed and right_operand:
            dtype, zp, lo, hi = "int8", 0, spec.qn, spec.qp
        elif spec.signed:
            dtype, zp, lo, hi = "uint8", -spec.qn, 0, spec.qp - spec.qn
        else:
            dtype, zp, lo, hi = "uint8", 0, spec.qn, spec.qp
        npd = _np_dtype(dtype)
        scale_name = self.const(f"{name}.scale", np.float32(scale))
        zp_name = self.const(f"{name}.zero_point", zp, npd)
        out = self.op("QuantizeLinear", [x, scale_name, zp_name], f"{name}/q")
        if spec.bits < 8:
            out = self.op("Clip", [out, self.const(f"{name}.min", lo, npd), self.const(f"{name}.max", hi, npd)], f"{name}/clip")
        self.tables.activations[name] = {"bits": spec.bits, "signed": spec.signed, "offset": offset, "scale": scale,
                                         "dtype": dtype, "zero_point": zp}
        return QTensor(out, scale, zp, dtype, offset)

    def dequantize(self, t: QTensor, base: str, extra_scale: float = 1.0) -> str:
        """DequantizeLinear of `t` (its own node: one per consumer, as the QDQ fusion wants)."""
        scale = self.const(f"{base}.dq_scale", np.float32(t.scale * extra_scale) if extra_scale != 1.0 else np.float32(t.scale))
        zp = self.const(f"{base}.dq_zero_point", t.zero_point, _np_dtype(t.dtype))
        return self.op("DequantizeLinear", [t.name, scale, zp], f"{base}/dq")

    def shape_op(self, x: str | QTensor, op_type: str, inputs: list[str], base: str, **attrs: Any) -> str | QTensor:
        """Apply a data-movement op (Reshape, Transpose, Gather...) to a float or an integer tensor."""
        if isinstance(x, QTensor):
            return QTensor(self.op(op_type, [x.name, *inputs], base, **attrs), x.scale, x.zero_point, x.dtype, x.offset)
        return self.op(op_type, [x, *inputs], base, **attrs)

    # ------------------------------------------------------------------ weights and linear layers

    def weight(self, name: str, layers: list[QLinear | QConv2d]) -> tuple[str, dict[str, Any]]:
        """The `[in, out]` weight of one or more stacked layers: DequantizeLinear of integer codes, or a float initializer.

        All layers quantized: integer codes (packed below 5 bits) + per-tensor or per-column scale. Otherwise
        the effective float weights (fake-quantized where the quantizer is on).
        """
        mats = [layer.weight.detach().float().cpu().reshape(layer.weight.shape[0], -1) for layer in layers]
        if not all(_enabled(layer.w_quant) for layer in layers):
            with torch.no_grad():
                eff = torch.cat([layer.w_quant(layer.weight).detach().float().cpu().reshape(m.shape) for layer, m in zip(layers, mats)])
            return self.const(f"{name}.weight", eff.t().contiguous().numpy()), {"weight_bits": None}
        with torch.no_grad():
            codes = torch.cat([layer.w_quant.codes(layer.weight).cpu().reshape(m.shape) for layer, m in zip(layers, mats)])
        bits = max(layer.w_quant.spec.bits for layer in layers)
        steps = [_step(layer.w_quant).reshape(-1) for layer in layers]
        per_tensor = len(layers) == 1 and steps[0].size == 1
        scale = steps[0].reshape(()) if per_tensor else np.concatenate(
            [np.broadcast_to(s, (m.shape[0],)) for s, m in zip(steps, mats)]).astype(np.float32)
        codes_t = codes.t().contiguous().numpy()  # [in, out]
        w_int = self.int_weight(name, codes_t, bits)
        scale_name = self.const(f"{name}.weight_scale", scale)
        attrs = {} if per_tensor else {"axis": 1}
        wd = self.op("DequantizeLinear", [w_int, scale_name], f"{name}/weight_dq", **attrs)
        return wd, {"weight_bits": bits, "per_channel": not per_tensor}

    def int_weight(self, name: str, codes: np.ndarray, bits: int) -> str:
        """int8 codes `[in, out]` as an initializer; below 5 bits packed into uint8 and unpacked by a folded subgraph."""
        if bits > 4:
            return self.const(f"{name}.weight_codes", codes.astype(np.int8))
        width = 2 if bits <= 2 else 4
        per_byte = 8 // width
        offset = 1 << (bits - 1)
        flat = (codes.reshape(-1).astype(np.int16) + offset).astype(np.uint8)
        n = flat.size
        flat = np.pad(flat, (0, (-n) % per_byte)).reshape(-1, per_byte)
        packed = np.zeros(flat.shape[0], dtype=np.uint8)
        for j in range(per_byte):
            packed |= (flat[:, j] << (j * width)).astype(np.uint8)
        p = self.const(f"{name}.weight_packed{width}", packed)
        col = self.op("Reshape", [p, self.const(f"{name}.unpack_col", [-1, 1], np.int64)], f"{name}/unpack")
        shifted = self.op("BitShift", [col, self.const(f"{name}.unpack_shifts", [j * width for j in range(per_byte)], np.uint8)],
                          f"{name}/unpack", direction="RIGHT")
        masked = self.op("BitwiseAnd", [shifted, self.const(f"{name}.unpack_mask", (1 << width) - 1, np.uint8)], f"{name}/unpack")
        flat_u = self.op("Reshape", [masked, self.const(f"{name}.unpack_flat", [-1], np.int64)], f"{name}/unpack")
        if flat.size != n:
            flat_u = self.op("Slice", [flat_u, self.const(f"{name}.unpack_start", [0], np.int64),
                                       self.const(f"{name}.unpack_end", [n], np.int64)], f"{name}/unpack")
        narrow = self.op("Cast", [flat_u], f"{name}/unpack", to=3)  # INT8: every u < 16 fits
        signed = self.op("Sub", [narrow, self.const(f"{name}.unpack_offset", offset, np.int8)], f"{name}/unpack")
        return self.op("Reshape", [signed, self.const(f"{name}.weight_shape", list(codes.shape), np.int64)], f"{name}/weight_codes")

    def linear(self, x: str | QTensor, name: str, layers: list[QLinear | QConv2d], biases: list[torch.Tensor | None],
               act_bits: int | None = None) -> str:
        """`x @ W^T + b` for one or more stacked layers; `x` already quantized (QTensor, `act_bits` wide) or float."""
        wd, info = self.weight(name, layers)
        xd = self.dequantize(x, f"{name}.input") if isinstance(x, QTensor) else x
        y = self.op("MatMul", [xd, wd], f"{name}/matmul")
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach().double().cpu() if b is not None else torch.zeros(l.weight.shape[0], dtype=torch.float64)
                              for b, l in zip(biases, layers)])
        if isinstance(x, QTensor) and x.offset is not None:  # + beta after the DQ, folded: W_hat @ (beta * 1)
            with torch.no_grad():
                w_hat = torch.cat([layer.w_quant(layer.weight).detach().double().cpu().reshape(layer.weight.shape[0], -1) for layer in layers])
            fold = x.offset * w_hat.sum(dim=1)
            bias = fold if bias is None else bias + fold
        if bias is not None:
            y = self.op("Add", [y, self.const(f"{name}.bias", bias.float().numpy())], f"{name}/out")
        shape = [sum(layer.weight.shape[0] for layer in layers), math.prod(layers[0].weight.shape[1:])]
        self.tables.layers[name] = {**info, "type": type(layers[0]).__name__, "shape": shape,
                                    "act_bits": act_bits if isinstance(x, QTensor) else None, "parts": len(layers)}
        return y

    def qlinear(self, x: str | QTensor, name: str, layer: QLinear) -> str:
        """A QLinear: its own input quantizer (when enabled and `x` is float), then `linear`."""
        if not isinstance(x, QTensor) and _enabled(layer.a_quant):
            x = self.quantize(x, layer.a_quant, f"{name}.input")
        return self.linear(x, name, [layer], [layer.bias], layer.a_quant.spec.bits if layer.a_quant is not None else None)

    def layer_norm(self, x: str, norm: nn.Module, name: str) -> str:
        """LayerNormalization over the last axis (Identity passes through)."""
        if isinstance(norm, nn.Identity):
            return x
        if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1:
            raise ExportFormatError(f"'{name}': {type(norm).__name__} is not supported by the ONNX export (only LayerNorm over the last axis)")
        dim = norm.normalized_shape[0]
        w = norm.weight.detach().float().cpu().numpy() if norm.weight is not None else np.ones(dim, np.float32)
        b = norm.bias.detach().float().cpu().numpy() if norm.bias is not None else np.zeros(dim, np.float32)
        return self.op("LayerNormalization", [x, self.const(f"{name}.weight", w), self.const(f"{name}.bias", b)], name,
                       axis=-1, epsilon=float(norm.eps))


def build_vit_graph(model: nn.Module, input_size: tuple[int, int, int]):
    """The ONNX ModelProto of a (quantized or FP) vitqtool timm VisionTransformer, input `[batch, *input_size]`.

    Raises ExportFormatError naming the module for anything the graph does not implement.
    """
    import onnx
    from onnx import TensorProto, helper

    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ExportFormatError(f"the ONNX export supports timm VisionTransformer models (ViT, DeiT); got {type(model).__name__}")
    g = Builder()
    g.used.update({INPUT_NAME, OUTPUT_NAME})
    x = _patch_embed(g, model, INPUT_NAME, input_size)
    x = _prefix_and_pos(g, model, x)
    x = g.layer_norm(x, model.norm_pre, "norm_pre")
    for i, block in enumerate(model.blocks):
        x = _block(g, block, x, f"blocks.{i}")
    logits = _head(g, model, x)
    g.nodes.append(helper.make_node("Identity", [logits], [OUTPUT_NAME], name="output"))
    graph = helper.make_graph(
        g.nodes, "vitqtool", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", *input_size])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", int(model.num_classes)])], g.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="vitqtool")
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto)
    return proto, g.tables


def _patch_embed(g: Builder, model: nn.Module, x: str, input_size: tuple[int, int, int]) -> str:
    pe = model.patch_embed
    conv = pe.proj
    c, h, w = input_size
    if not isinstance(conv, nn.Conv2d):
        raise ExportFormatError(f"patch_embed.proj: {type(conv).__name__} is not supported by the ONNX export")
    kh, kw = conv.kernel_size
    unpadded = not isinstance(conv.padding, str) and not any(conv.padding)
    patches = unpadded and tuple(conv.stride) == (kh, kw) and conv.groups == 1 and tuple(conv.dilation) == (1, 1)
    if not patches or h % kh or w % kw or getattr(pe, "dynamic_img_pad", False) or not getattr(pe, "flatten", True):
        raise ExportFormatError("patch_embed: only a stride = kernel, unpadded patch convolution over an image divisible "
                                "into patches is supported by the ONNX export")
    gh, gw = h // kh, w // kw
    src: str | QTensor = x
    if isinstance(conv, QConv2d) and _enabled(conv.a_quant):
        src = g.quantize(x, conv.a_quant, "patch_embed.proj.input")
    src = g.shape_op(src, "Reshape", [g.const("patch_embed.grid", [0, c, gh, kh, gw, kw], np.int64)], "patch_embed/grid")
    src = g.shape_op(src, "Transpose", [], "patch_embed/patches", perm=[0, 2, 4, 1, 3, 5])
    src = g.shape_op(src, "Reshape", [g.const("patch_embed.rows", [0, gh * gw, c * kh * kw], np.int64)], "patch_embed/rows")
    if isinstance(conv, QConv2d):
        out = g.linear(src, "patch_embed.proj", [conv], [conv.bias], conv.a_quant.spec.bits if conv.a_quant is not None else None)
    else:
        out = g.op("MatMul", [src, g.const("patch_embed.proj.weight", conv.weight.detach().float().reshape(conv.out_channels, -1).t().contiguous().numpy())], "patch_embed/matmul")
        if conv.bias is not None:
            out = g.op("Add", [out, g.const("patch_embed.proj.bias", conv.bias.detach().float().numpy())], "patch_embed/out")
    return g.layer_norm(out, pe.norm, "patch_embed.norm")


def _prefix_and_pos(g: Builder, model: nn.Module, x: str) -> str:
    if getattr(model, "dynamic_img_size", False) or getattr(model, "reg_token", None) is not None:
        raise ExportFormatError("dynamic image size and register tokens are not supported by the ONNX export")
    prefix = [t for t in (getattr(model, "cls_token", None), getattr(model, "dist_token", None)) if t is not None]
    pos = model.pos_embed
    if model.no_embed_class and pos is not None:
        x = g.op("Add", [x, g.const("pos_embed", pos.detach().float().numpy())], "pos_embed")
    if prefix:
        batch = g.op("Shape", [INPUT_NAME], "batch", start=0, end=1)
        dim = prefix[0].shape[-1]
        shape = g.op("Concat", [batch, g.const("prefix.shape", [1, dim], np.int64)], "prefix_shape", axis=0)
        tokens = [g.op("Expand", [g.const(n, t.detach().float().numpy()), shape], f"{n}/expand")
                  for n, t in zip(("cls_token", "dist_token"), prefix)]
        x = g.op("Concat", [*tokens, x], "tokens", axis=1)
    if not model.no_embed_class and pos is not None:
        x = g.op("Add", [x, g.const("pos_embed", pos.detach().float().numpy())], "pos_embed")
    return x


def _layer_scale(g: Builder, x: str, ls: nn.Module, name: str) -> str:
    if isinstance(ls, nn.Identity):
        return x
    gamma = getattr(ls, "gamma", None)
    if gamma is None:
        raise ExportFormatError(f"'{name}': {type(ls).__name__} is not supported by the ONNX export")
    return g.op("Mul", [x, g.const(f"{name}.gamma", gamma.detach().float().numpy())], name)


def _block(g: Builder, block: nn.Module, x: str, name: str) -> str:
    attn = block.attn
    if not isinstance(attn, QuantAttention):
        raise ExportFormatError(f"'{name}.attn': {type(attn).__name__} is not supported by the ONNX export (prepare the model first)")
    h = g.layer_norm(x, block.norm1, f"{name}.norm1")
    h = _attention(g, attn, h, f"{name}.attn")
    x = g.op("Add", [x, _layer_scale(g, h, block.ls1, f"{name}.ls1")], f"{name}/residual1")
    mlp = block.mlp
    act = getattr(mlp, "act", None)
    if not isinstance(act, nn.GELU) or not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise ExportFormatError(f"'{name}.mlp': only fc1 -> GELU -> fc2 MLPs are supported by the ONNX export")
    h = g.layer_norm(x, block.norm2, f"{name}.norm2")
    h = g.qlinear(h, f"{name}.mlp.fc1", mlp.fc1)
    h = g.op("Gelu", [h], f"{name}.mlp.act", approximate=act.approximate)
    h = g.qlinear(h, f"{name}.mlp.fc2", mlp.fc2)
    return g.op("Add", [x, _layer_scale(g, h, block.ls2, f"{name}.ls2")], f"{name}/residual2")


def _attention(g: Builder, attn: QuantAttention, x: str, name: str) -> str:
    heads, hd = attn.num_heads, attn.head_dim
    dim = heads * hd
    src: str | QTensor = g.quantize(x, attn.input_quant, f"{name}.input") if _enabled(attn.input_quant) else x
    parts = [attn.q, attn.k, attn.v] if attn.split else [attn.qkv]
    qkv = g.linear(src, f"{name}.qkv", parts, [p.bias for p in parts], attn.input_quant.spec.bits)
    q, k, v = g.op("Split", [qkv, g.const(f"{name}.split", [dim, dim, dim], np.int64)], f"{name}/qkv", outputs=3, axis=-1)
    quantizers = [attn.q_quant, attn.k_quant, attn.v_quant] if attn.split else [attn.qkv_quant] * 3
    heads_shape = g.const(f"{name}.heads", [0, 0, heads, hd], np.int64)

    def operand(t: str, quantizer: Quantizer, role: str, right: bool, perm: list[int]) -> str:
        src_t: str | QTensor = g.quantize(t, quantizer, f"{name}.{role}_quant", right_operand=right) if _enabled(quantizer) else t
        src_t = g.shape_op(src_t, "Reshape", [heads_shape], f"{name}/{role}_heads")
        src_t = g.shape_op(src_t, "Transpose", [], f"{name}/{role}_t", perm=perm)
        if isinstance(src_t, QTensor):
            return g.dequantize(src_t, f"{name}.{role}", extra_scale=attn.scale if role == "q" else 1.0)
        if role == "q":
            return g.op("Mul", [src_t, g.const(f"{name}.scale", np.float32(attn.scale))], f"{name}/q_scaled")
        return src_t

    qd = operand(q, quantizers[0], "q", False, [0, 2, 1, 3])
    kd = operand(k, quantizers[1], "k", True, [0, 2, 3, 1])
    vd = operand(v, quantizers[2], "v", True, [0, 2, 1, 3])
    logits = g.op("MatMul", [qd, kd], f"{name}/logits")
    probs = g.op("Softmax", [logits], f"{name}/softmax", axis=-1)
    if _enabled(attn.softmax_quant):
        probs = g.dequantize(g.quantize(probs, attn.softmax_quant, f"{name}.softmax_quant"), f"{name}.softmax")
    out = g.op("MatMul", [probs, vd], f"{name}/context")
    proj = attn.proj
    ctx: str | QTensor = g.quantize(out, proj.a_quant, f"{name}.proj.input") if _enabled(proj.a_quant) else out
    ctx = g.shape_op(ctx, "Transpose", [], f"{name}/context_t", perm=[0, 2, 1, 3])
    ctx = g.shape_op(ctx, "Reshape", [g.const(f"{name}.merge", [0, 0, dim], np.int64)], f"{name}/context_merged")
    return g.qlinear(ctx, f"{name}.proj", proj)


def _head(g: Builder, model: nn.Module, x: str) -> str:
    pool = model.global_pool
    distilled = getattr(model, "head_dist", None) is not None
    if getattr(model, "attn_pool", None) is not None or pool not in ("token", "avg"):
        raise ExportFormatError(f"global_pool={pool!r} is not supported by the ONNX export (token or avg)")
    # tokens stay [B, 1, D] until the end: onnxruntime turns a 2-D MatMul + Add into a float Gemm before its QDQ fusion
    if pool == "token" or distilled:  # the final norm is per token: normalise only the tokens the head reads
        tokens = [g.op("Slice", [x, g.const(f"token{i}.start", [i], np.int64), g.const(f"token{i}.end", [i + 1], np.int64),
                                 g.const(f"token{i}.axis", [1], np.int64)], f"token{i}") for i in ((0, 1) if distilled else (0,))]
        tokens = [g.layer_norm(t, model.norm, "norm") for t in tokens]
    else:
        x = g.layer_norm(x, model.norm, "norm")
        start = model.num_prefix_tokens if not getattr(model, "pool_include_prefix", False) else 0
        x = g.op("Slice", [x, g.const("pool.start", [start], np.int64), g.const("pool.end", [2**62], np.int64),
                           g.const("pool.axis", [1], np.int64)], "pool/tokens")
        tokens = [g.op("ReduceMean", [x, g.const("pool.axes", [1], np.int64)], "pool", keepdims=1)]
    tokens = [g.layer_norm(t, model.fc_norm, "fc_norm") for t in tokens]
    out = _head_linear(g, model.head, tokens[0], "head")
    if distilled:
        out = g.op("Add", [out, _head_linear(g, model.head_dist, tokens[1], "head_dist")], "heads")
        out = g.op("Div", [out, g.const("two", np.float32(2.0))], "heads_mean")
    return g.op("Squeeze", [out, g.const("token_axis", [1], np.int64)], "head_out")


def _head_linear(g: Builder, head: nn.Module, x: str, name: str) -> str:
    if isinstance(head, QLinear):
        return g.qlinear(x, name, head)
    if isinstance(head, nn.Linear):
        y = g.op("MatMul", [x, g.const(f"{name}.weight", head.weight.detach().float().t().contiguous().numpy())], f"{name}/matmul")
        return g.op("Add", [y, g.const(f"{name}.bias", head.bias.detach().float().numpy())], name) if head.bias is not None else y
    raise ExportFormatError(f"'{name}': {type(head).__name__} is not supported by the ONNX export")
