"""Dense bit packing of integer quantization codes into int32 words (the export's `weight_packed`).

Layout (one row = one output channel; the packed dimension is the input dimension, flattened for
convolutions):
- a signed `b`-bit code `c` in `[-2^(b-1), 2^(b-1) - 1]` is stored offset-binary as `u = c + 2^(b-1)`
  (unsigned codes in `[0, 2^b - 1]` are stored as they are);
- the codes of a row form one little-endian bit stream: code `j` occupies bits `[j*b, (j+1)*b)`,
  word `k` holds stream bits `[32k, 32k + 32)` with the least significant bit first, and a code may
  straddle two words (3/5/6/7-bit codes waste nothing);
- each row starts at a fresh word, so a row of `n` codes takes `ceil(n*b/32)` int32 words (the only
  waste is the tail of the last word, under 32 bits per row).
For `b` in {2, 4, 8} no code straddles a word, so the layout equals compressed-tensors'
`pack-quantized` int32 layout (`32/b` values per word, value `j` at shift `(j mod 32/b)*b`,
offset-binary). Stored as little-endian int32, the same stream read as bytes packs 2-bit codes four
per byte.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

WORD_BITS = 32
_WORD_MASK = (1 << WORD_BITS) - 1


def code_range(bits: int, signed: bool = True) -> tuple[int, int]:
    """The lowest and highest integer code of a `bits`-wide signed or unsigned quantizer."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be between 2 and 8, got {bits}")
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def packed_length(n: int, bits: int) -> int:
    """Number of int32 words that hold a row of `n` codes of `bits` bits."""
    code_range(bits)
    return -(-n * bits // WORD_BITS)


def _group(bits: int) -> tuple[int, int]:
    """Codes per group and words per group: the shortest run of codes that fills whole words."""
    codes = WORD_BITS // math.gcd(bits, WORD_BITS)
    return codes, codes * bits // WORD_BITS


def pack_codes(codes: Tensor, bits: int, signed: bool = True) -> Tensor:
    """Pack integer codes `[..., n]` into int32 words `[..., packed_length(n, bits)]` (layout above).

    Raises ValueError for a code outside the `bits`-bit range.
    """
    lo, hi = code_range(bits, signed)
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < lo or int(c.max()) > hi):
        raise ValueError(f"codes outside the {bits}-bit {'signed' if signed else 'unsigned'} range [{lo}, {hi}]")
    n = c.shape[-1]
    per_group, group_words = _group(bits)
    groups = -(-n // per_group)
    # [rows, code-in-group, group]: each code position is one contiguous slice
    rows = F.pad(c.reshape(-1, n) - lo, (0, groups * per_group - n)).view(-1, groups, per_group).transpose(1, 2).contiguous()
    out = rows.new_zeros(rows.shape[0], group_words, groups)
    for j in range(per_group):  # bit fields never overlap, so OR-ing builds the stream
        word, shift = divmod(j * bits, WORD_BITS)
        out[:, word] |= (rows[:, j] << shift) & _WORD_MASK
        if shift + bits > WORD_BITS:  # the code straddles into the next word
            out[:, word + 1] |= rows[:, j] >> (WORD_BITS - shift)
    out = out.transpose(1, 2).reshape(rows.shape[0], -1)[:, :packed_length(n, bits)]
    out = torch.where(out >= 1 << (WORD_BITS - 1), out - (1 << WORD_BITS), out).to(torch.int32)
    return out.reshape(*c.shape[:-1], out.shape[-1])


def unpack_codes(packed: Tensor, bits: int, n: int, signed: bool = True) -> Tensor:
    """Inverse of `pack_codes`: int32 words `[..., packed_length(n, bits)]` -> int32 codes `[..., n]`.

    Raises ValueError when `packed` is not int32 or its last dimension is not `packed_length(n, bits)`.
    """
    lo, _ = code_range(bits, signed)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed codes must be int32, got {packed.dtype}")
    words = packed_length(n, bits)
    if packed.dim() == 0 or packed.shape[-1] != words:
        raise ValueError(f"{n} codes of {bits} bits need {words} int32 words per row, found {tuple(packed.shape)}")
    per_group, group_words = _group(bits)
    groups = -(-n // per_group)
    rows = F.pad(packed.reshape(-1, words).to(torch.int64) & _WORD_MASK, (0, groups * group_words - words))
    rows = rows.view(-1, groups, group_words).transpose(1, 2).contiguous()
    out = rows.new_empty(rows.shape[0], per_group, groups)
    mask = (1 << bits) - 1
    for j in range(per_group):
        word, shift = divmod(j * bits, WORD_BITS)
        value = rows[:, word] >> shift
        if shift + bits > WORD_BITS:
            value = value | (rows[:, word + 1] << (WORD_BITS - shift))
        out[:, j] = value & mask
    codes = out.transpose(1, 2).reshape(rows.shape[0], -1)[:, :n] + lo
    return codes.to(torch.int32).reshape(*packed.shape[:-1], n)
