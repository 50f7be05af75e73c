"""File writing shared by every artifact: one atomic writer, safetensors state dicts, versions, JSON.

Every file vitqtool creates goes through `atomic_write` (or `atomic_dir` for a folder): written under a
hidden temporary name in the target's folder, fsynced, given the mode a plain `open` would give (0644
under umask 022, not mkstemp's 0600), then renamed into place. A crash leaves the old file or none.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from importlib import metadata
from typing import Any

from . import __version__

TEMP_MARK = ".vitq-tmp"  # every temporary name we create contains this, so stale ones can be recognised
STALE_SECONDS = 3600.0  # a temporary file of ours older than this is left over from a killed process


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def file_mode() -> int:
    """The mode `open()` gives a new file under the current umask (0644 under 022)."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """The mode `mkdir()` gives a new folder under the current umask (0755 under 022)."""
    return 0o777 & ~_umask()


def clean_stale_temps(folder: Path, stem: str, max_age: float = STALE_SECONDS) -> int:
    """Remove our own temporary files/folders for `stem` in `folder` left by a killed writer; returns how many."""
    removed = 0
    now = time.time()
    prefix = f".{stem}{TEMP_MARK}"
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            if not entry.name.startswith(prefix):
                continue
            with contextlib.suppress(OSError):
                if now - entry.lstat().st_mtime < max_age:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed += 1
    return removed


def atomic_write(path: str | Path, data: bytes | str | Callable[[Path], None]) -> Path:
    """Write `data` (bytes, text, or a function that writes the given temporary path) to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent, path.name)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMP_MARK}-", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data.encode() if isinstance(data, str) else data)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a folder under a temporary name and rename it to `path` on success (`path` must not exist)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{TEMP_MARK}-"))
    try:
        os.chmod(tmp, dir_mode())
        yield tmp
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, document: Any) -> Path:
    """Write `document` as indented JSON (see `json_default`) atomically."""
    return atomic_write(path, json.dumps(document, indent=2, default=json_default) + "\n")


def save_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` into `path` with the umask's mode (safetensors itself creates 0600 files).

    Not atomic on its own: call it inside `atomic_write`/`atomic_dir`.
    """
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, file_mode())


def state_dict_for_safetensors(module: Any) -> dict:
    """Every parameter and buffer as an independent contiguous CPU tensor (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def library_versions(*extra: str) -> dict[str, str]:
    """Versions of vitqtool, torch, timm, python and of the `extra` distributions that are installed."""
    versions = {"vitqtool": __version__, "python": platform.python_version()}
    for dist in ("torch", "timm", *extra):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return versions


def json_default(value: Any) -> Any:
    """`json.dumps(default=...)` for the types our documents hold: tuples, sets, paths, numpy/torch scalars."""
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def finite_or_none(value: Any) -> Any:
    """`value` with every non-finite float (nan, inf) inside dicts and lists replaced by None (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value
