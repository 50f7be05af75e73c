"""Oscillation tracking on hand-made weight trajectories: counting, EMA by hand, freezing, state round trip."""

import pytest
import torch
from torch import nn

from vitqtool.quant import OscillationTracker, QLinear, QuantSpec


class _Net(nn.Module):
    def __init__(self, n: int = 4, per_channel: bool = False) -> None:
        super().__init__()
        self.fc = QLinear.from_float(nn.Linear(n, 1, bias=False), QuantSpec(4, granularity="channel" if per_channel else "tensor"), None)
        self.head = QLinear.from_float(nn.Linear(2, 1, bias=False), QuantSpec(4), None)
        with torch.no_grad():
            self.fc.w_quant.step.fill_(0.5)
            self.head.w_quant.step.fill_(0.5)
            self.head.weight.zero_()


def _set_codes(net: _Net, codes: list[float]) -> None:
    with torch.no_grad():  # latent weight = code * step, nudged inside the bin
        net.fc.weight.copy_(torch.tensor([codes]) * 0.5 + 0.1)


def _run(trajectories: list[list[int]], momentum: float) -> tuple[OscillationTracker, _Net, list[list[int]]]:
    """Drive fc's weights through per-weight code trajectories; returns tracker, net, oscillations per update."""
    net = _Net(len(trajectories))
    _set_codes(net, [t[0] for t in trajectories])
    tracker = OscillationTracker(net, momentum=momentum, threshold=0.3)
    flips = []
    for step in range(1, len(trajectories[0])):
        _set_codes(net, [t[step] for t in trajectories])
        tracker.update()
        flips.append(tracker.summary()["fc"]["flips_last_update"])
    return tracker, net, flips


def test_counts_direction_reversals_only():
    alternating = [0, 1, 0, 1]      # +1, -1 (osc), +1 (osc): 2 oscillations
    monotone = [0, 1, 2, 3]         # never reverses: 0
    jump_back = [0, 2, 2, -1]       # +, none, - (osc, jump of 3 is one change): 1
    still = [3, 3, 3, 3]            # 0
    tracker, _, flips = _run([alternating, monotone, jump_back, still], momentum=0.5)
    assert flips == [0, 1, 2]   # update 2: alternating; update 3: alternating and jump_back
    counts = tracker.state["fc"]
    assert counts["direction"].tolist() == [[1, 1, -1, 0]]
    assert counts["codes"].dtype == torch.int8


def test_ema_matches_hand_formula():
    m = 0.1
    alternating, monotone = [0, 1, 0, 1, 0], [0, 1, 2, 3, 4]
    tracker, _, _ = _run([alternating, monotone], momentum=m)
    osc_alt = [0, 1, 1, 1]  # oscillation indicator at each of the 4 updates
    f = 0.0
    for o in osc_alt:
        f = m * o + (1 - m) * f
    freq = tracker.state["fc"]["frequency"].flatten()
    assert freq[0].item() == pytest.approx(f, rel=1e-6)
    assert freq[1].item() == 0.0
    summary = tracker.summary()["fc"]
    assert summary["mean_frequency"] == pytest.approx(f / 2, rel=1e-6)
    assert summary["oscillating_fraction"] == pytest.approx(0.5 if f > 0.3 else 0.0)
    assert set(tracker.summary()) == {"fc", "head"}


def test_names_filter():
    tracker = OscillationTracker(_Net(), names=["head*"])
    assert list(tracker.summary()) == ["head"]


def test_freeze_keeps_quantized_value_fixed():
    net = _Net(2)
    _set_codes(net, [2, 0])
    tracker = OscillationTracker(net, momentum=0.5, threshold=0.3, freeze=True)
    for codes in ([3, 1], [2, 2]):  # weight 0 oscillates (EMA 0.5 > 0.3) and freezes at code 2
        _set_codes(net, codes)
        tracker.update()
    assert tracker.state["fc"]["frozen"].tolist() == [[True, False]]
    frozen_value = net.fc.w_quant(net.fc.weight)[0, 0].item()
    assert frozen_value == 2 * 0.5
    for codes in ([3, 3], [-4, 4], [5, 5]):  # the "optimiser" keeps moving both weights
        _set_codes(net, codes)
        tracker.apply_freeze()
        tracker.update()
        assert net.fc.w_quant.codes(net.fc.weight)[0, 0].item() == 2
        assert net.fc.w_quant(net.fc.weight)[0, 0].item() == frozen_value
        assert net.fc.w_quant.codes(net.fc.weight)[0, 1].item() == codes[1]
    assert tracker.summary()["fc"]["frozen_fraction"] == 0.5


def test_state_dict_round_trip_continues_exactly():
    trajectory = [[0, 1, 0, 1, 0, 2, 1], [0, 0, 1, 2, 1, 2, 1]]
    reference, _net_ref, _ = _run(trajectory, momentum=0.2)

    net = _Net(2)
    _set_codes(net, [t[0] for t in trajectory])
    first = OscillationTracker(net, momentum=0.2, threshold=0.3)
    for step in range(1, 4):
        _set_codes(net, [t[step] for t in trajectory])
        first.update()
    saved = first.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in saved.values())
    resumed = OscillationTracker(net, momentum=0.2, threshold=0.3)
    resumed.load_state_dict(saved)
    for step in range(4, len(trajectory[0])):
        _set_codes(net, [t[step] for t in trajectory])
        resumed.update()
    for key, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert resumed.summary() == reference.summary()


def test_load_state_dict_refuses_other_layers():
    tracker = OscillationTracker(_Net())
    state = tracker.state_dict()
    with pytest.raises(ValueError, match="missing"):
        OscillationTracker(_Net(), names=["fc"]).load_state_dict(state)
    state["fc.frequency"] = torch.zeros(3)
    with pytest.raises(ValueError, match="fc.frequency"):
        tracker.load_state_dict(state)


def test_fused_update_equals_eager_bitwise():
    """The compiled update (the default where the quantizers are fused) gives the eager tracker's state bit for bit."""
    gen = torch.Generator().manual_seed(0)
    nets = [_Net(64, per_channel=True), _Net(64, per_channel=True)]
    nets[1].load_state_dict(nets[0].state_dict())
    for net, fused in zip(nets, (False, True)):
        net.fc.w_quant.fused = fused
    trackers = [OscillationTracker(net, momentum=0.3, threshold=0.6, freeze=True, fused=fused)
                for net, fused in zip(nets, (False, True))]
    flips = [0, 0]
    for _ in range(8):
        codes = torch.randint(-8, 8, (64,), generator=gen).tolist()
        for i, (net, tracker) in enumerate(zip(nets, trackers)):
            _set_codes(net, codes)
            tracker.update()
            flips[i] += tracker.summary()["fc"]["flips_last_update"]
    eager, fused = (t.state_dict() for t in trackers)
    assert flips[0] == flips[1] > 0 and bool(eager["fc.frozen"].any()) and not bool(eager["fc.frozen"].all())
    assert all(torch.equal(eager[k], fused[k]) for k in eager)
    assert trackers[0].summary() == trackers[1].summary()
