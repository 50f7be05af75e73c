"""A gated MLP (SwiGLU, GeGLU) with quantized operands: method.md §3's MLP rule carried over to a gate.

`fc2(norm(act(gate) * value))`, where the gate and value projections read the same (normalised) tokens.
What is quantized, and why:
- the input, once, signed (like fc1's input in the plain MLP): one quantizer shared by the gate and
  value projections, because both read the same tensor (one packed `fc1` owns it as its input
  quantizer; separate `fc1_g`/`fc1_x` share `input_quant`);
- the gate, `act(gate)`, with the spec the caller gives (`gate_spec`): it is the activation output the
  plain MLP quantizes before fc2 (for SiLU and GELU, whose outputs are bounded below by a small negative
  value and heavy-tailed above: unsigned with a learned offset, as the GELU output);
- fc2's input (the product, or the optional norm's output when there is one), signed with `aspec`:
  the product of a gate and a signed value is signed and centred on zero, and so is a norm's output.
The value branch, the product and the norm run in FP, as residual adds and norms do elsewhere.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import QuantSpec, make_quantizer
from .modules import QLinear


class QuantGLU(nn.Module):
    """A gated MLP whose gate, input and fc2 input are quantized; with every quantizer disabled it is the float MLP.

    `fc1` is either one packed Linear whose output halves are [gate | value] (`gate_last=False`) or
    [value | gate], or a pair `(fc1_g, fc1_x)` of gate and value projections. The Linears' Parameters are
    shared, not copied, and keep their names (`fc1` or `fc1_g`/`fc1_x`, `fc2`, `act`, `norm`).
    """

    def __init__(self, fc1: nn.Linear | tuple[nn.Linear, nn.Linear], fc2: nn.Linear, act: nn.Module, wspec: QuantSpec,
                 aspec: QuantSpec, gate_spec: QuantSpec, norm: nn.Module | None = None, gate_last: bool = False,
                 drop: tuple[float, float] = (0.0, 0.0)) -> None:
        super().__init__()
        self.packed = not isinstance(fc1, tuple)
        if not isinstance(fc1, tuple):
            if fc1.out_features % 2:
                raise ValueError(f"a packed gated fc1 needs an even width, found {fc1.out_features}")
            self.fc1 = QLinear.from_float(fc1, wspec, aspec)
        else:
            gate, value = fc1
            if gate.out_features != value.out_features:
                raise ValueError(f"gate and value projections differ in width ({gate.out_features} vs {value.out_features})")
            self.input_quant = make_quantizer(aspec, "act")
            self.fc1_g = QLinear.from_float(gate, wspec, None)
            self.fc1_x = QLinear.from_float(value, wspec, None)
        self.gate_last = gate_last
        self.act = act
        self.gate_quant = make_quantizer(gate_spec, "act")
        self.drop1 = nn.Dropout(drop[0])
        self.norm = norm
        self.fc2 = QLinear.from_float(fc2, wspec, aspec)  # fc2.a_quant: the product (or the norm's output)
        self.drop2 = nn.Dropout(drop[1])

    def forward(self, x: Tensor) -> Tensor:
        if self.packed:
            first, second = self.fc1(x).chunk(2, dim=-1)
            gate, value = (second, first) if self.gate_last else (first, second)
        else:
            x = self.input_quant(x)
            gate, value = self.fc1_g(x), self.fc1_x(x)
        x = self.drop1(self.gate_quant(self.act(gate)) * value)
        if self.norm is not None:
            x = self.norm(x)
        return self.drop2(self.fc2(x))
