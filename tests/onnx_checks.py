"""ONNX checks shared by the export tests: the integer kernels a graph must run, read from the torch model, and what
onnxruntime's optimized graph keeps (onnx and onnxruntime are imported by the callers' tests, which skip without them)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from vitqtool.export.onnx_export import onnx_session
from vitqtool.quant import QUANT_LAYERS, QConv2d, iter_quantizers


@torch.no_grad()
def expected_integer_kernels(model, images) -> int:
    """Integer kernels the graph must run, counted on the torch model as it runs `images` (no family named; a module
    applied several times, as a weight-shared recursive block, counts once per application):

    - every call of a quantized Linear/Conv whose input is quantized: by its own input quantizer (`a_quant`), or because the
      tensor it reads is (a view of) an enabled activation quantizer's output (q, k, v reading the attention's
      shared input quantizer; a talking-heads mix reading the quantized softmax);
    - QK^T and attn @ V of every attention whose softmax output is quantized (`softmax_quant`).
    Grouped convs whose output is float are float convs over dequantized codes by design (STAYS_FLOAT), and a
    layer whose input is float (a patch merging's reduction, a talking-heads mix of the logits) multiplies floats.
    """
    outputs, storages, hooks = [], set(), []
    calls = {"layers": 0, "attentions": 0}

    def quantized(mod, args, out):
        outputs.append(out)  # kept alive: no storage is reused during the forward
        storages.add(out.untyped_storage().data_ptr())

    def attends(mod, args, out):
        calls["attentions"] += 2

    def reads(mod, args):
        own = mod.a_quant is not None and mod.a_quant.enabled
        if own or args[0].untyped_storage().data_ptr() in storages:
            calls["layers"] += 1

    for _, q in iter_quantizers(model):
        if q.enabled and q.kind == "act":
            hooks.append(q.register_forward_hook(quantized))
    for m in model.modules():
        if getattr(m, "softmax_quant", None) is not None and m.softmax_quant.enabled:
            hooks.append(m.softmax_quant.register_forward_hook(attends))
    for m in model.modules():
        if isinstance(m, QUANT_LAYERS) and m.w_quant.enabled and not (isinstance(m, QConv2d) and m.groups > 1):
            hooks.append(m.register_forward_pre_hook(reads))
    was_training = model.training
    try:
        model.eval()(images[:2])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return calls["layers"] + calls["attentions"]


def optimized_graph(path):
    """onnxruntime's optimized graph of the ONNX file at `path` (one thread), as an onnx GraphProto."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "opt.onnx"
        onnx_session(path, 1, optimized_path=opt)
        return onnx.load(str(opt)).graph


def dequantize_only_accumulators(path) -> bool:
    """Whether every DequantizeLinear left in onnxruntime's optimized graph rescales an integer conv's int32 accumulator."""
    graph = optimized_graph(path)
    producers = {o: n.op_type for n in graph.node for o in n.output}
    return all(producers.get(n.input[0]) == "ConvInteger" for n in graph.node if n.op_type == "DequantizeLinear")


def transposed_outputs(path, op_type: str) -> list[str]:
    """Names of the `op_type` nodes whose output a Transpose reads in onnxruntime's optimized graph."""
    graph = optimized_graph(path)
    producers = {o: n for n in graph.node for o in n.output}
    return [producers[n.input[0]].name for n in graph.node
            if n.op_type == "Transpose" and n.input[0] in producers and producers[n.input[0]].op_type == op_type]
