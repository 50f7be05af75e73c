"""Where a quantized weight's codes and step live in the file: format 2.x (compressed-tensors' layout) and 1.x.

Format 2.x is what compressed-tensors 0.20's `PackedQuantizationCompressor.decompress` reads bit for bit
(its `unpack_from_int32` and `dequantize`, read in its source):
- `weight_packed`: the signed codes, offset-binary, packed densely and least significant bit first into
  int32 words along the *last* dimension of the weight (`quant.packing`'s stream, which is also
  compressed-tensors' dense stream for every bit width 1..8): Linear `[out, ceil(in*b/32)]`, Conv
  `[out, in, kh, ceil(kw*b/32)]`. compressed-tensors unpacks a tensor of more than two dimensions
  slice by slice along its leading dimensions, so a convolution is packed row by row of `kw` codes;
- `weight_shape`: int32 `[ndim]`, the weight's real shape (the unpacker reads its last entry);
- `weight_scale`: `[1]` per tensor; per channel `[out, 1]` (Linear) or `[out, 1, 1, 1]` (Conv), the
  shape that broadcasts against the weight in compressed-tensors' `codes * scale`.

Format 1.x (still read): every weight flattened to `[out, in*kh*kw]` before packing and per-channel
scales `[out]` (a square Linear decompressed silently wrong in compressed-tensors, a Conv raised).
"""

from __future__ import annotations

import math

from torch import Tensor

from ..quant.packing import pack_codes, packed_length, unpack_codes


def format_major(version: str) -> int:
    """The major number of an export format version string ("1.0" -> 1); 0 when it has none."""
    head = str(version).partition(".")[0]
    return int(head) if head.isdigit() else 0


def pack_weight(codes: Tensor, bits: int, signed: bool = True) -> Tensor:
    """Integer codes shaped like the weight -> the 2.x `weight_packed` (packed along the last dimension)."""
    return pack_codes(codes, bits, signed=signed)


def packed_shape(shape: list[int], bits: int, major: int) -> list[int]:
    """Shape of `weight_packed` for a weight of `shape` in format `major` (1: flattened rows; 2: last dim)."""
    if major < 2:
        return [shape[0], packed_length(math.prod(shape[1:]), bits)]
    return [*shape[:-1], packed_length(shape[-1], bits)]


def scale_shape(shape: list[int], per_channel: bool, major: int) -> list[int]:
    """Shape of `weight_scale`: `[1]` per tensor; per channel `[out]` in 1.x, `[out, 1, ...]` (weight rank) in 2.x."""
    if not per_channel:
        return [1]
    return [shape[0]] if major < 2 else [shape[0], *([1] * (len(shape) - 1))]


def file_scale(step: Tensor, weight_dim: int) -> Tensor:
    """A weight quantizer's step (`[1]` or `[out]`) as the 2.x `weight_scale` of a weight with `weight_dim` dims."""
    if step.numel() == 1:
        return step.reshape(1).contiguous()
    return step.reshape(-1, *([1] * (weight_dim - 1))).contiguous()


def unpack_weight(packed: Tensor, bits: int, shape: tuple[int, ...], signed: bool = True) -> Tensor:
    """int32 codes shaped `shape` from either layout (told apart by rank: 1.x is always `[out, words]`).

    Raises ValueError when `packed` does not hold the codes of a weight of `shape`.
    """
    if packed.dim() == len(shape):  # 2.x (and 1.x Linear, which is the same)
        return unpack_codes(packed, bits, shape[-1], signed=signed)
    if packed.dim() == 2:  # 1.x convolution: flattened rows
        return unpack_codes(packed, bits, math.prod(shape[1:]), signed=signed).reshape(shape)
    raise ValueError(f"packed codes of rank {packed.dim()} cannot hold a weight of shape {list(shape)}")
