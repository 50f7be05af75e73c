"""Progress on stderr, shared by every long-running function: a rich bar on a terminal, plain lines otherwise.

With no terminal (CI logs, `nohup`, pipes) a rich bar would only print once at the end, so a plain
line (`description done/total, extra fields, elapsed, eta`) is printed every `VITQ_PROGRESS_SECONDS`
seconds (default 30) and when the work ends. Silent when disabled (`--json`, `--quiet`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from types import SimpleNamespace
from typing import Any, TypeVar

T = TypeVar("T")
DEFAULT_INTERVAL = 30.0
LOG_WIDTH = 10_000  # a console without a terminal and without COLUMNS: wide enough that no line wraps


def console(stderr: bool = False) -> Any:
    """The package's rich Console on stdout (or stderr); it never reads markup in what it prints (text from data).

    On a terminal it takes the terminal's width. Without one (CI logs, pipes) rich would assume 80
    columns, wrap long lines and cut table cells to `…`; there it takes `COLUMNS` when set, else a
    width no line reaches.
    """
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    isatty = getattr(stream, "isatty", None)
    terminal = bool(isatty and isatty())
    width = None if terminal or os.environ.get("COLUMNS", "").isdigit() else LOG_WIDTH
    return Console(stderr=stderr, markup=False, highlight=False, width=width)


class PlainProgress:
    """The part of rich's Progress API the package uses, printing plain lines at a steady interval."""

    def __init__(self, columns: tuple[str, ...], interval: float, stream: Any) -> None:
        self.columns, self.interval, self.stream = columns, interval, stream
        self.tasks: list[dict[str, Any]] = []

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        now = time.monotonic()
        self.tasks.append({"description": description, "total": total, "completed": completed, "fields": fields,
                           "start": now, "start_completed": completed, "printed": now})
        return len(self.tasks) - 1

    def update(self, task_id: int, completed: float | None = None, advance: float = 0, **fields: Any) -> None:
        task = self.tasks[task_id]
        task["completed"] = (task["completed"] if completed is None else completed) + advance
        task["fields"].update(fields)
        now = time.monotonic()
        if now - task["printed"] >= self.interval:
            self._print(task, now)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def finish(self) -> None:
        now = time.monotonic()
        for task in self.tasks:
            self._print(task, now)

    def _print(self, task: dict[str, Any], now: float) -> None:
        task["printed"] = now
        done, total = task["completed"], task["total"]
        elapsed = now - task["start"]
        parts = [f"{task['description']}: {done:g}" + (f"/{total:g}" if total else "")]
        view = SimpleNamespace(fields=task["fields"])
        for column in self.columns:
            with contextlib.suppress(KeyError, ValueError, TypeError):
                parts.append(column.format(task=view))
        parts.append(f"elapsed {_clock(elapsed)}")
        rate = (done - task["start_completed"]) / elapsed if elapsed > 0 else 0
        if total and rate > 0:
            parts.append(f"eta {_clock((total - done) / rate)}")
        self.stream.write(", ".join(parts) + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("VITQ_PROGRESS_SECONDS", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


@contextlib.contextmanager
def progress_bar(enabled: bool, *extra_columns: str) -> Iterator[Any | None]:
    """A rich Progress on stderr when it is a terminal, `PlainProgress` lines otherwise; None when disabled."""
    if not enabled:
        yield None
        return
    if not sys.stderr.isatty():
        plain = PlainProgress(extra_columns, _interval(), sys.stderr)
        try:
            yield plain
        finally:
            plain.finish()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
               *(TextColumn(c) for c in extra_columns), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        yield bar


def track(items: Iterable[T], description: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Iterate `items` with progress on stderr when `enabled`."""
    with progress_bar(enabled) as bar:
        if bar is None:
            yield from items
            return
        task = bar.add_task(description, total=total if total is not None else _len(items))
        for item in items:
            yield item
            bar.advance(task)


def _len(items: Iterable) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None
