"""OBR loss (method.md §6) against a per-level loop written from the formula, its gradients, and the lambda schedule."""

import math

import pytest
import torch
from torch import nn

from vitqtool.quant import QConv2d, QLinear, QuantSpec, obr_lambda, obr_loss


def _layer(bits: int, per_channel: bool, seed: int = 0, conv: bool = False) -> QLinear | QConv2d:
    torch.manual_seed(seed)
    spec = QuantSpec(bits, signed=True, granularity="channel" if per_channel else "tensor")
    if conv:
        layer = QConv2d.from_float(nn.Conv2d(3, 6, 3), spec, None)
    else:
        layer = QLinear.from_float(nn.Linear(24, 8), spec, None)
    layer.double()  # float64 so loop and vectorised sums agree to rounding
    layer.w_quant.init_from_weight(layer.weight)
    with torch.no_grad():  # shrink the steps a little so some weights clip at Qn/Qp too
        layer.w_quant.step.mul_(0.8)
    return layer


def _reference(weight: torch.Tensor, step: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    """L_OBR written level by level, one channel grid at a time when per-channel (plain loops, no vectorisation)."""
    qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    s = step.clamp(min=1e-4)
    rows = weight.reshape(weight.shape[0], -1)
    if per_channel:
        grids = [(rows[c], s[c]) for c in range(rows.shape[0])]
    else:
        grids = [(rows.reshape(-1), s[0])]
    bin_sq, n_total, var = 0.0, 0, 0.0
    for w, sc in grids:
        w_c = torch.clamp(w / sc, qn, qp) * sc
        codes = torch.round(torch.clamp(w / sc, qn, qp)).detach()
        bin_sq = bin_sq + (((codes * sc).detach() - w_c) ** 2).sum()
        n_total += w.numel()
        for k in range(qn, qp + 1):
            members = w_c[codes == k]
            if members.numel() > 1:
                var = var + members.var(unbiased=True)
    return bin_sq / n_total + var


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("per_channel", [False, True])
def test_loss_and_gradients_match_per_level_formula(bits, per_channel):
    layer = _layer(bits, per_channel, seed=bits)
    loss = obr_loss([layer])
    gw, gs = torch.autograd.grad(loss, [layer.weight, layer.w_quant.step])

    w = layer.weight.detach().clone().requires_grad_(True)
    s = layer.w_quant.step.detach().clone().requires_grad_(True)
    ref = _reference(w, s, bits, per_channel)
    rw, rs = torch.autograd.grad(ref, [w, s])

    assert loss.item() > 0
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gw, rw, rtol=1e-8, atol=1e-14)
    torch.testing.assert_close(gs, rs, rtol=1e-8, atol=1e-14)
    assert gs.abs().sum() > 0  # clipped weights give the step a gradient


def test_sum_over_layers_and_conv():
    lin, conv = _layer(3, False, seed=1), _layer(4, True, seed=2, conv=True)
    total = obr_loss([lin, conv])
    expected = _reference(lin.weight, lin.w_quant.step, 3, False) + _reference(conv.weight, conv.w_quant.step, 4, True)
    torch.testing.assert_close(total, expected, rtol=1e-10, atol=1e-14)


def test_single_member_levels_add_no_variance():
    # 2-bit, step 1: codes -2..1. Level 1 holds one weight, level -2 two, level 0 three.
    layer = QLinear.from_float(nn.Linear(6, 1, bias=False), QuantSpec(2), None).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.2, -2.0, -1.6, 0.1, -0.2, 0.3]]))
        layer.w_quant.step.fill_(1.0)
    w_c = torch.tensor([1.0, -2.0, -1.6, 0.1, -0.2, 0.3], dtype=torch.float64)  # 1.2 clips to Qp = 1
    codes = torch.tensor([1.0, -2.0, -2.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    expected = ((codes - w_c) ** 2).mean() + w_c[1:3].var() + w_c[3:].var()
    torch.testing.assert_close(obr_loss([layer]), expected)

    with torch.no_grad():  # every weight exactly on a level: the loss is zero
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 0.0, 5.0, -7.0, -1.0]]))  # 5 and -7 clip to levels 1 and -2
    # levels 1 and -2 each hold two members clipped to the same value: zero variance, zero bin distance
    assert obr_loss([layer]).item() == pytest.approx(0.0, abs=1e-12)


def test_no_layers_is_zero():
    assert obr_loss([]).item() == 0.0


@pytest.mark.parametrize("progress", [0.0, 0.1, 0.25, 0.4, 0.625, 0.9, 1.0])
def test_lambda_schedule(progress):
    start, top = 0.25, 0.01
    expected = 0.0 if progress < start else 0.005 * (1 - math.cos(math.pi * (progress - 0.25 * 1) / 0.75))
    assert obr_lambda(progress) == pytest.approx(expected, abs=1e-15)
    assert obr_lambda(progress, start, top) == pytest.approx(expected, abs=1e-15)


def test_lambda_landmarks_and_bad_start():
    assert obr_lambda(0.0) == 0.0
    assert obr_lambda(0.25) == 0.0
    assert obr_lambda(0.625) == pytest.approx(0.005)
    assert obr_lambda(1.0) == pytest.approx(0.01)
    assert obr_lambda(0.5, start_fraction=0.0, max_lambda=2.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="start_fraction"):
        obr_lambda(0.5, start_fraction=1.0)
