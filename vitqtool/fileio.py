"""File writing shared by every artifact: one atomic writer, safetensors state dicts, versions, JSON, locks.

Every file vitqtool creates goes through `atomic_write` (or `atomic_dir` for a folder): written under a
hidden temporary name in the target's folder, fsynced, given the mode a plain `open` would give (0644
under umask 022, not mkstemp's 0600), then renamed into place. A crash leaves the old file or none, and
the temporary files of a killed writer are removed by the next write to the same folder. Failures of
the OS or of torch/safetensors writers (full disk, read-only, a path in the way) become one `WriteError`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__
from .errors import BusyError, VitqError, WriteError

TEMP_MARK = ".vitq-tmp"  # every temporary name we create contains this (then "-PID-"), so stale ones can be recognised
STALE_SECONDS = 86400.0  # a temporary file of ours whose PID cannot be read is stale after a day
LOCK_FILE = ".vitq-lock"
_IO_FAILURE = re.compile(r"No space left|StorageFull|file write failed|Read-only|PermissionDenied|Permission denied|"
                         r"IoError|Input/output error|os error|Disk quota", re.IGNORECASE)
_REASONS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EISDIR: "it is a folder",
            errno.ENOTDIR: "a parent in the path is a file", errno.EEXIST: "something else is in the way",
            errno.ENAMETOOLONG: "the name is too long"}


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _temp_prefix(name: str) -> str:
    return f".{name}{TEMP_MARK}-{os.getpid()}-"


def clean_stale_temps(folder: Path, max_age: float = STALE_SECONDS) -> int:
    """Remove our temporary files/folders in `folder` whose writer process is gone; returns how many."""
    removed = 0
    now = time.time()
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            head, mark, tail = entry.name.partition(TEMP_MARK + "-")
            if not mark or not head.startswith("."):
                continue
            pid = tail.partition("-")[0]
            with contextlib.suppress(OSError):
                stale = not _pid_alive(int(pid)) if pid.isdigit() else now - entry.lstat().st_mtime > max_age
                if not stale:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed += 1
    return removed


def write_failure(path: Path, exc: BaseException) -> WriteError | None:
    """The one-line WriteError for an OS/torch/safetensors failure to write `path`; None for anything else."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if not isinstance(exc, OSError) and not _IO_FAILURE.search(text):
        return None
    reason = _REASONS.get(code) if code is not None else None
    strerror = getattr(exc, "strerror", None)
    if reason is not None and strerror:
        reason = f"{reason} ({strerror})"
    if reason is None:
        with contextlib.suppress(OSError):
            if shutil.disk_usage(_existing_parent(path)).free < 1 << 20:
                reason = "disk full"
    if reason is None:
        reason = "disk full" if re.search(r"No space left|StorageFull|file write failed", text, re.IGNORECASE) else \
            (getattr(exc, "strerror", None) or text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__)
    return WriteError(f"cannot write '{path}': {reason}")


def _existing_parent(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


@contextlib.contextmanager
def translate_write_errors(path: str | Path) -> Iterator[None]:
    """Turn an OS, torch or safetensors write failure inside the block into one WriteError naming `path`."""
    try:
        yield
    except VitqError:
        raise
    except Exception as exc:
        failure = write_failure(Path(path), exc)
        if failure is None:
            raise
        raise failure from exc


def check_folder_target(folder: str | Path) -> Path:
    """Refuse, before any work, a folder path that is a file or lies below a file (one WriteError)."""
    folder = Path(folder)
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            if not candidate.is_dir():
                where = "it is" if candidate == folder else f"'{candidate}' is"
                raise WriteError(f"cannot write into '{folder}': {where} a file, not a folder")
            if os.statvfs(candidate).f_flag & os.ST_RDONLY:
                raise WriteError(f"cannot write into '{folder}': read-only file system")
            if not os.access(candidate, os.W_OK | os.X_OK):
                raise WriteError(f"cannot write into '{folder}': permission denied")
            break
    return folder


def check_file_target(path: str | Path) -> Path:
    """Refuse, before any work, a file path that is a folder or lies below a file (one WriteError)."""
    path = Path(path)
    if path.is_dir():
        raise WriteError(f"cannot write '{path}': it is a folder; pass a file path")
    check_folder_target(path.parent)
    return path


def make_dirs(folder: str | Path) -> Path:
    """`mkdir -p` with failures (read-only, a file in the way) as one WriteError."""
    folder = check_folder_target(folder)
    with translate_write_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def new_dirs_removed_on_failure(folder: Path) -> Iterator[None]:
    """Create `folder` (and missing parents) for the block; on failure remove the ones it created if left empty."""
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    make_dirs(folder)
    try:
        yield
    except BaseException:
        for path in created:  # deepest first
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def atomic_write(path: str | Path, data: bytes | str | Callable[[Path], None], shared: bool = False) -> Path:
    """Write `data` (bytes, text, or a function that writes the given temporary path) to `path` atomically.

    `shared`: processes on other machines may write into the same folder, so their temporary files (whose
    PIDs mean nothing here) are left alone; the folder's owner removes leftovers when it is done.
    """
    path = check_file_target(path)
    with new_dirs_removed_on_failure(path.parent), translate_write_errors(path):
        if not shared:
            clean_stale_temps(path.parent)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix=".tmp")
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
    with new_dirs_removed_on_failure(path.parent), translate_write_errors(path):
        clean_stale_temps(path.parent)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_temp_prefix(path.name)))
        try:
            os.chmod(tmp, dir_mode())
            yield tmp
            os.rename(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def staging_dir(target: str | Path) -> Iterator[Path]:
    """A temporary folder beside `target` to stage files in, always removed afterwards (move what you keep out)."""
    target = Path(target)
    with new_dirs_removed_on_failure(target.parent):
        clean_stale_temps(target.parent)
        with translate_write_errors(target):
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=_temp_prefix(target.name)))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (created if needed) for the block; BusyError naming the holder's PID."""
    folder = make_dirs(folder)
    lock = folder / LOCK_FILE
    with translate_write_errors(lock):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, file_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise BusyError(f"'{folder}' is in use by another vitqtool process (PID {holder}); "
                            "wait for it to finish or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield folder
    finally:
        os.close(fd)  # closing releases the lock


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
