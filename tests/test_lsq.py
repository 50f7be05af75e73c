"""LSQ quantizer math against method.md §2: forward formula, LSQ/LSQ+ gradients, inits."""

import math

import pytest
import torch

from vitqtool.quant import MIN_STEP, FusedMismatch, LSQQuantizer, QConv2d, QLinear, QuantSpec, check_fused_kernels
from vitqtool.quant.lsq import ulps_apart


def closed_form(x, s, qn, qp, beta=None, g=1.0):
    """The LSQ fake-quant written with autograd primitives (round via straight-through, grad scale trick)."""
    s_scaled = s * g + (s - s * g).detach()  # value s, gradient scaled by g
    beta_scaled = beta * g + (beta - beta * g).detach() if beta is not None else 0.0
    v = torch.clamp((x - beta_scaled) / s_scaled, qn, qp)
    v = v + (v.round() - v).detach()  # round with straight-through
    return v * s_scaled + beta_scaled


FUSED = pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])


@FUSED
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_activation_forward_and_gradients_match_closed_form(bits, signed, fused):
    spec = QuantSpec(bits, signed=signed)
    q = LSQQuantizer(spec, "act")
    q.fused = fused
    with torch.no_grad():
        q.step.fill_(0.37)
    x = (torch.randn(4, 6, 5) * 2).requires_grad_()
    out = q(x)
    qn, qp = spec.qn, spec.qp
    assert (qn, qp) == ((-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1))
    expected = torch.clamp(torch.round(x.detach() / 0.37), qn, qp) * 0.37
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=1e-6)

    upstream = torch.randn_like(out)
    out.backward(upstream)
    g = 1.0 / (qp * math.sqrt(x.numel()))  # method.md: 1 / (Qp * sqrt(N_x))
    x2 = x.detach().clone().requires_grad_()
    s2 = torch.tensor([0.37], requires_grad=True)
    closed_form(x2, s2, qn, qp, g=g).backward(upstream)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(q.step.grad, s2.grad, rtol=1e-5, atol=1e-7)


@FUSED
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_weight_step_gradient_scale_uses_l1_norm(bits, fused):
    spec = QuantSpec(bits)
    q = LSQQuantizer(spec, "weight")
    q.fused = fused
    w = torch.randn(8, 16, requires_grad=True)
    q.init_from_weight(w.detach())
    s = q.step.detach().clone()
    upstream = torch.randn(8, 16)
    q(w).backward(upstream)
    g = 1.0 / math.sqrt(spec.qp * w.detach().abs().sum().item())
    s2 = s.clone().requires_grad_()
    w2 = w.detach().clone().requires_grad_()
    closed_form(w2, s2, spec.qn, spec.qp, g=g).backward(upstream)
    torch.testing.assert_close(q.step.grad, s2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, w2.grad)


@FUSED
def test_per_channel_weight_forward_and_gradient(fused):
    spec = QuantSpec(3, granularity="channel")
    q = LSQQuantizer(spec, "weight", channels=5)
    q.fused = fused
    w = torch.randn(5, 7, requires_grad=True)
    q.init_from_weight(w.detach())
    assert q.step.shape == (5,)
    steps = q.step.detach().clone()
    out = q(w)
    expected = torch.clamp(torch.round(w.detach() / steps[:, None]), spec.qn, spec.qp) * steps[:, None]
    torch.testing.assert_close(out.detach(), expected)
    upstream = torch.randn(5, 7)
    out.backward(upstream)
    for c in range(5):  # each channel's step: its own LSQ derivative and its own L1 gradient scale
        g = 1.0 / math.sqrt(spec.qp * w.detach()[c].abs().sum().item())
        s2 = steps[c:c + 1].clone().requires_grad_()
        closed_form(w.detach()[c], s2, spec.qn, spec.qp, g=g).backward(upstream[c])
        torch.testing.assert_close(q.step.grad[c:c + 1], s2.grad, rtol=1e-5, atol=1e-7)


@FUSED
def test_learned_offset_forward_and_gradient(fused):
    spec = QuantSpec(2, signed=False, learned_offset=True)
    q = LSQQuantizer(spec, "act")
    q.fused = fused
    with torch.no_grad():
        q.step.fill_(0.5)
        q.offset.fill_(-0.2)
    x = torch.randn(3, 10, requires_grad=True)
    out = q(x)
    expected = torch.clamp(torch.round((x.detach() + 0.2) / 0.5), 0, 3) * 0.5 - 0.2
    torch.testing.assert_close(out.detach(), expected)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    g = 1.0 / (spec.qp * math.sqrt(x.numel()))
    x2 = x.detach().clone().requires_grad_()
    s2 = torch.tensor([0.5], requires_grad=True)
    b2 = torch.tensor([-0.2], requires_grad=True)
    closed_form(x2, s2, 0, 3, beta=b2, g=g).backward(upstream)
    torch.testing.assert_close(q.step.grad, s2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(q.offset.grad, b2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad, x2.grad)


def test_mse_weight_init_is_a_fixed_point():
    w = torch.randn(32, 64)
    spec = QuantSpec(4)
    q = LSQQuantizer(spec, "weight")
    q.init_from_weight(w)
    s = q.step.item()
    codes = torch.clamp(torch.round(w / s), spec.qn, spec.qp)
    assert abs((w * codes).sum().item() / (codes * codes).sum().item() - s) <= 1e-4 * s
    # the fixed point beats the max-abs start on MSE
    s0 = w.abs().max().item() / spec.qp
    mse = lambda step: ((torch.clamp(torch.round(w / step), spec.qn, spec.qp) * step - w) ** 2).mean()
    assert mse(s) < mse(s0)
    assert bool(q.initialized)


def test_activation_init_formula_and_step_floor():
    q = LSQQuantizer(QuantSpec(4), "act")
    x = torch.randn(100, 10)
    q.init_from_statistic(q.activation_statistic(x))
    assert q.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(7), rel=1e-5)
    q.init_from_statistic(0.0)
    assert q.step.item() == pytest.approx(MIN_STEP)


def test_codes_are_integers_in_range_and_disabled_is_identity():
    q = LSQQuantizer(QuantSpec(3), "weight")
    w = torch.randn(4, 4) * 5
    q.init_from_weight(w)
    codes = q.codes(w)
    assert codes.dtype == torch.int32 and codes.min() >= -4 and codes.max() <= 3
    torch.testing.assert_close(q(w), codes.float() * q.step)
    q.enabled = False
    assert q(w) is w


def test_bits_out_of_range_rejected():
    with pytest.raises(ValueError, match="between 2 and 8"):
        QuantSpec(1)
    with pytest.raises(ValueError, match="between 2 and 8"):
        QuantSpec(9)


def test_qlinear_and_qconv_share_parameters_and_match_float_when_disabled():
    lin = torch.nn.Linear(6, 4)
    ql = QLinear.from_float(lin, QuantSpec(4), QuantSpec(4))
    assert ql.weight is lin.weight and ql.bias is lin.bias
    x = torch.randn(2, 6)
    ql.w_quant.enabled = ql.a_quant.enabled = False
    torch.testing.assert_close(ql(x), lin(x))
    conv = torch.nn.Conv2d(3, 5, 2, stride=2)
    qc = QConv2d.from_float(conv, QuantSpec(8), QuantSpec(8))
    qc.w_quant.enabled = qc.a_quant.enabled = False
    img = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(qc(img), conv(img))
    assert set(qc.state_dict()) == {"weight", "bias", "w_quant.step", "w_quant.initialized", "a_quant.step", "a_quant.initialized"}


@pytest.mark.parametrize(("size", "kernel", "bias"), [(32, 4, True), (30, 4, False), (18, 3, True)])
def test_a_patchify_conv_trains_as_the_stock_conv(size, kernel, bias):
    """A non-overlapping QConv2d (a patch embedding) computes its input gradient as a matmul: the output and every
    gradient (input step, weight, bias) match the stock conv over the same fake-quantized operands, also when the
    image has rows past the last whole patch."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, kernel, stride=kernel, bias=bias)
    qc = QConv2d.from_float(conv, QuantSpec(4), QuantSpec(8))
    img = torch.randn(4, 3, size, size)
    qc.w_quant.init_from_weight(qc.weight)
    qc.a_quant.init_from_statistic(qc.a_quant.activation_statistic(img))
    assert qc._is_patchify() and not QConv2d.from_float(torch.nn.Conv2d(3, 8, kernel, stride=1), QuantSpec(4), None)._is_patchify()
    out = qc(img)
    params = [qc.a_quant.step, qc.weight] + ([qc.bias] if bias else [])
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, params, grad)
    ref_out = torch.nn.functional.conv2d(qc.a_quant(img), qc.w_quant(qc.weight), qc.bias, stride=kernel)
    want = torch.autograd.grad(ref_out, params, grad)
    assert torch.equal(out, ref_out)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_a_step_at_the_floor_still_learns():
    """A step init puts at (or below) the 1e-4 floor keeps LSQ's gradient: the floor is a projection of the stored
    value, not a clamp in the forward (which gave zero gradient there, so the step never moved)."""
    from vitqtool.quant import project_quantizers_

    torch.manual_seed(0)
    w = torch.randn(64, 64) * 0.05
    q = LSQQuantizer(QuantSpec(2), "weight")
    with torch.no_grad():
        q.step.fill_(9.5e-5)
    project_quantizers_(q)
    assert q.step.item() == pytest.approx(1e-4)
    opt = torch.optim.Adam(q.parameters(), lr=1e-5)
    for _ in range(100):
        loss = (q(w) - w).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert q.step.grad is not None and q.step.grad.abs().item() > 0
        opt.step()
        project_quantizers_(q)
    assert q.step.item() > 5e-4  # measured 1.09e-3; the clamp-in-forward version stayed at 1e-4


def test_ulps_apart_counts_representable_floats_between():
    one = torch.tensor([1.0, -2.0, 0.0])
    up = torch.nextafter(one, torch.full_like(one, 10.0))
    assert ulps_apart(one, one) == 0 and ulps_apart(one, up) == 1
    assert ulps_apart(torch.tensor([0.0]), torch.tensor([-0.0])) == 0
    assert ulps_apart(torch.tensor([torch.finfo(torch.float32).tiny]), torch.tensor([-torch.finfo(torch.float32).tiny])) == 2 * 2**23


def test_the_fused_probe_fails_when_the_kernels_compute_something_else(monkeypatch):
    """`quantize` picks the fused kernels by default only when this probe passes; a kernel that is off must fail it."""
    from vitqtool.quant import lsq

    check_fused_kernels("cpu")  # the real kernels pass
    forward, backward, codes = lsq._compiled_kernels()

    def step_sum_off(*args):
        grad_x, step_sum, offset_sum, l1 = backward(*args)
        return grad_x, step_sum * (1 + 1e-6), offset_sum, l1  # a few ulps: more than the 1 the probe allows

    monkeypatch.setattr(lsq, "_compiled_kernels", lambda: (forward, step_sum_off, codes))
    with pytest.raises(FusedMismatch, match="step/offset gradients .* more than 1 ulp"):
        check_fused_kernels("cpu")
    monkeypatch.setattr(lsq, "_compiled_kernels", lambda: (lambda *a: forward(*a) + 1e-7, backward, codes))
    with pytest.raises(FusedMismatch, match="not bitwise equal"):
        check_fused_kernels("cpu")
    monkeypatch.setattr(lsq, "_compiled_kernels", lambda: (forward, backward, lambda *a: codes(*a) + 1))
    with pytest.raises(FusedMismatch, match="not bitwise equal"):
        check_fused_kernels("cpu")


def test_a_quantizer_applied_twice_per_forward_calibrates_on_the_mean_over_its_calls():
    from vitqtool.quant import calibrate

    class Twice(torch.nn.Module):  # one layer applied twice, as a weight-shared recursive block is
        def __init__(self) -> None:
            super().__init__()
            self.layer = QLinear.from_float(torch.nn.Linear(6, 6), QuantSpec(4), QuantSpec(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(3 * self.layer(x))

    model = Twice()
    batches = [torch.randn(5, 6), torch.randn(5, 6)]
    with torch.no_grad():
        seen = [t.abs().mean() for x in batches for t in (x, 3 * torch.nn.functional.linear(x, model.layer.weight, model.layer.bias))]
    stats = calibrate(model, batches)
    assert stats["layer.a_quant"] == pytest.approx(float(sum(seen)) / 4, rel=1e-6)
    assert model.layer.a_quant.step.item() == pytest.approx(2 * float(sum(seen)) / 4 / math.sqrt(7), rel=1e-5)
