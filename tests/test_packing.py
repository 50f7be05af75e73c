"""Dense int32 packing of integer codes: exact round trip, the documented bit layout, and on-grid re-quantization."""

import sys

import pytest
import torch

from vitqtool.quant import MIN_STEP, LSQQuantizer, QuantSpec
from vitqtool.quant.packing import code_range, pack_codes, packed_length, unpack_codes


def _stream_reference(row: list[int], bits: int, lo: int) -> list[int]:
    """Independent layout: one Python big integer as the row's little-endian bit stream, cut into int32 words."""
    stream = 0
    for j, code in enumerate(row):
        stream |= (code - lo) << (j * bits)
    words = -(-len(row) * bits // 32)
    out = []
    for k in range(words):
        w = (stream >> (32 * k)) & 0xFFFFFFFF
        out.append(w - (1 << 32) if w >= 1 << 31 else w)
    return out


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_and_layout_match_independent_bitstream(bits, signed):
    lo, hi = code_range(bits, signed)
    gen = torch.Generator().manual_seed(bits)
    for n in (1, 5, 31, 32, 33, 97):
        codes = torch.randint(lo, hi + 1, (3, 2, n), generator=gen)
        codes[0, 0, 0], codes[-1, -1, -1] = lo, hi  # both extremes present
        packed = pack_codes(codes, bits, signed)
        assert packed.dtype == torch.int32
        assert packed.shape == (3, 2, -(-n * bits // 32))
        assert torch.equal(unpack_codes(packed, bits, n, signed), codes.to(torch.int32))
        for row, words in zip(codes.reshape(-1, n).tolist(), packed.reshape(6, -1).tolist()):
            assert words == _stream_reference(row, bits, lo)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_power_of_two_widths_match_compressed_tensors_layout(bits):
    """compressed-tensors pack_to_int32: offset-binary, value j in word j // (32/b) at shift (j % (32/b)) * b."""
    per_word = 32 // bits
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (4, 3 * per_word), generator=torch.Generator().manual_seed(1))
    unsigned = codes + (1 << (bits - 1))
    expected = torch.zeros(4, 3, dtype=torch.int64)
    for i in range(per_word):
        expected |= unsigned[:, i::per_word] << (bits * i)
    expected = torch.where(expected >= 1 << 31, expected - (1 << 32), expected).to(torch.int32)
    assert torch.equal(pack_codes(codes, bits), expected)


def test_three_bit_codes_waste_nothing_and_two_bit_codes_are_four_per_byte():
    assert [packed_length(n, 3) for n in (32, 64, 192, 768)] == [3, 6, 18, 72]  # 32 codes = 96 bits = 3 words
    assert packed_length(33, 3) == 4
    assert sys.byteorder == "little"
    codes = torch.tensor([[-2, -1, 0, 1, 1, 0, -1, -2]])
    as_bytes = pack_codes(codes, 2).view(torch.uint8)[0, :2].tolist()
    unsigned = [c + 2 for c in codes[0].tolist()]
    assert as_bytes == [sum(u << (2 * i) for i, u in enumerate(unsigned[k:k + 4])) for k in (0, 4)]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="outside the 2-bit signed range"):
        pack_codes(torch.tensor([[2]]), 2)
    with pytest.raises(ValueError, match="outside the 3-bit unsigned range"):
        pack_codes(torch.tensor([[-1]]), 3, signed=False)
    with pytest.raises(ValueError, match="integer tensor"):
        pack_codes(torch.tensor([[0.5]]), 4)
    with pytest.raises(ValueError, match="bits must be between 2 and 8"):
        pack_codes(torch.tensor([[0]]), 9)
    with pytest.raises(ValueError, match="need 3 int32 words per row"):
        unpack_codes(torch.zeros(2, 4, dtype=torch.int32), 3, 32)
    with pytest.raises(ValueError, match="must be int32"):
        unpack_codes(torch.zeros(2, 3, dtype=torch.int64), 3, 32)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("per_channel", [False, True])
def test_on_grid_weights_are_fixed_points_of_the_weight_quantizer(bits, per_channel):
    """What the reader rebuilds (codes * stored step) quantizes to itself: same codes, bit-identical output."""
    out_features, in_features = 16, 40
    q = LSQQuantizer(QuantSpec(bits, granularity="channel" if per_channel else "tensor"), "weight", channels=out_features)
    gen = torch.Generator().manual_seed(bits)
    raw = torch.exp(torch.empty(q.step.shape).uniform_(-12, 2, generator=gen))  # includes steps below MIN_STEP
    raw[0] = MIN_STEP / 10
    stored = raw.clamp(min=MIN_STEP)  # the writer stores the effective (clamped) step
    with torch.no_grad():
        q.step.copy_(stored)
    codes = torch.randint(q.spec.qn, q.spec.qp + 1, (out_features, in_features), generator=gen)
    weight = codes.float() * (stored.view(-1, 1) if per_channel else stored)
    assert torch.equal(q(weight), weight)
    assert torch.equal(q.codes(weight), codes.to(torch.int32))
