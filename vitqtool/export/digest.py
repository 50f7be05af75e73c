"""Content digests: a sha256 over an export's tensor data and quantization metadata, checked on every read.

A flipped bit in the packed weights or an edited but still valid metadata field (`act_bits` 8 -> 7) passes
every structural check, so each export records `sha256:<hex>` of what it holds, and
`load`, `inspect` and `evaluate` recompute it. The digest covers every metadata entry but its own (keys
sorted) and every tensor (names sorted: name, dtype, shape and raw bytes, each length-prefixed), so it does
not depend on the file's byte layout. Files written before their format recorded digests carry none: they
load with a one-line notice.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ExportFormatError

log = logging.getLogger(__name__)

DIGEST_KEY = "content_digest"  # the metadata entry that holds the digest
PREFIX = "sha256:"


def _field(h: Any, data: bytes) -> None:
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)


def _tensor_bytes(value: Tensor | np.ndarray) -> tuple[str, list[int], bytes]:
    """(dtype name, shape, raw little-endian bytes) of a torch tensor or numpy array."""
    if isinstance(value, np.ndarray):
        return str(value.dtype), list(value.shape), np.ascontiguousarray(value).tobytes()
    flat = value.detach().cpu().contiguous().reshape(-1)
    raw = flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)
    return str(value.dtype).removeprefix("torch."), list(value.shape), raw.numpy().tobytes()


def content_digest(tensors: Mapping[str, Tensor | np.ndarray], metadata: Mapping[str, str]) -> str:
    """`sha256:<hex>` over every metadata entry except the digest itself and every tensor, in sorted order."""
    h = hashlib.sha256()
    for key in sorted(k for k in metadata if k != DIGEST_KEY):
        _field(h, key.encode())
        _field(h, metadata[key].encode())
    for name in sorted(tensors):
        dtype, shape, raw = _tensor_bytes(tensors[name])
        _field(h, name.encode())
        _field(h, f"{dtype}{shape}".encode())
        _field(h, raw)
    return PREFIX + h.hexdigest()


def check_digest(path: str | Path, recorded: str | None, tensors: Mapping[str, Tensor | np.ndarray],
                 metadata: Mapping[str, str], format_version: str, since: str, check: bool = True) -> str | None:
    """Compare the recorded digest with the content; returns it (None for files written before digests).

    `since` is the first version of the file's format that records a digest. Raises ExportFormatError, naming
    both digests, when they differ or when a file of such a version lacks it. `check=False` (forensic
    inspection) returns the recorded digest without checking.
    """
    if recorded is None:
        if _version(format_version) >= _version(since):
            raise ExportFormatError(f"'{path}': format {format_version} records a content digest and this file has none; "
                                    "the metadata was edited")
        log.warning("'%s' has no content digest (format %s, written before %s): its integrity is not checked; "
                    "re-export it to add one", path, format_version, since)
        return None
    if not check:
        return recorded
    computed = content_digest(tensors, metadata)
    if computed != recorded:
        raise ExportFormatError(f"'{path}': content digest mismatch (recorded {recorded[:19]}..., computed {computed[:19]}...): "
                                "tensor data or metadata changed after export; re-export it "
                                "(`vitqtool inspect --no-digest-check` shows it anyway)")
    return recorded


def _version(text: str) -> tuple[int, int]:
    """(major, minor) of a "M.m" version; (0, 0) for anything unreadable (treated as old)."""
    major, _, minor = str(text).partition(".")
    try:
        return int(major), int(minor.partition(".")[0] or 0)
    except ValueError:
        return 0, 0
