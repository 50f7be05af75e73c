"""Progress on stderr, shared by every long-running function: a rich bar on a terminal, plain lines otherwise.

With no terminal (CI logs, `nohup`, pipes) a rich bar would only print once at the end, so a plain
line (`description done/total, extra fields, elapsed, eta`) is printed every `VITQ_PROGRESS_SECONDS`
seconds (default 30) for every unfinished task, even one stuck in a single long step (a heartbeat
thread), and once when a task completes. Lines of a command's first interval are held back until it ends
or the command succeeds (`held_lines`), so a command that fails early on bad input prints its one error line.
Silent when disabled (`--json`, `--quiet`).

A command made of several phases opens one `progress_bar` and runs each phase inside `phase(bar, ...)`,
so every phase shows on a terminal and leaves at least one line in a log.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
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


class LineGate:
    """Where plain progress lines go: held back for the first `interval` seconds, then written to `stream`.

    `release()` writes what is held (the command succeeded), `discard()` drops it (the command failed early:
    its one error line says enough). Thread-safe: the heartbeat thread writes too.
    """

    def __init__(self, interval: float, stream: Any) -> None:
        self.interval, self.stream = interval, stream
        self._started = time.monotonic()
        self._held: list[str] | None = []  # None once released or discarded
        self._lock = threading.Lock()

    def write(self, line: str) -> None:
        with self._lock:
            if self._held is not None and time.monotonic() - self._started < self.interval:
                self._held.append(line)
                return
            self._release()
            self.stream.write(line)
            self.stream.flush()

    def poll(self) -> None:
        """Release the held lines once the first interval is over."""
        with self._lock:
            if time.monotonic() - self._started >= self.interval:
                self._release()

    def release(self) -> None:
        with self._lock:
            self._release()

    def discard(self) -> None:
        with self._lock:
            self._held = None

    def _release(self) -> None:
        if self._held:
            self.stream.write("".join(self._held))
            self.stream.flush()
        self._held = None


# the gate of the running CLI command (`held_lines`), shared by every progress bar the command opens
_COMMAND_GATE: contextvars.ContextVar[LineGate | None] = contextvars.ContextVar("vitqtool_progress_gate", default=None)


@contextlib.contextmanager
def held_lines() -> Iterator[None]:
    """Hold the plain progress lines of the block's first interval; drop them if the block raises.

    The CLI runs each command inside it, so a command that fails early on bad input prints its one error
    line, whatever phases it went through before failing.
    """
    gate = LineGate(_interval(), sys.stderr)
    token = _COMMAND_GATE.set(gate)
    try:
        yield
    except SystemExit as exc:  # how a Typer command ends, successful or not
        if exc.code in (0, None):
            gate.release()
        else:
            gate.discard()
        raise
    except BaseException:
        gate.discard()
        raise
    else:
        gate.release()
    finally:
        _COMMAND_GATE.reset(token)


class PlainProgress:
    """The part of rich's Progress API the package uses, printing plain lines at a steady interval."""

    def __init__(self, columns: tuple[str, ...], interval: float, stream: Any, gate: LineGate | None = None) -> None:
        self.columns, self.interval = columns, interval
        self.gate = gate or LineGate(interval, stream)  # the lines go through it to `stream`
        self._own_gate = gate is None  # else a command's gate (`held_lines`) decides when its lines go out
        self.tasks: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # the heartbeat thread prints too

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        now = time.monotonic()
        with self._lock:
            self.tasks.append({"description": description, "total": total, "completed": completed, "fields": fields,
                               "start": now, "start_completed": completed, "printed": now, "final": False})
            return len(self.tasks) - 1

    def update(self, task_id: int, completed: float | None = None, advance: float = 0, total: float | None = None,
               **fields: Any) -> None:
        with self._lock:
            task = self.tasks[task_id]
            task["completed"] = (task["completed"] if completed is None else completed) + advance
            if total is not None:
                task["total"] = total
            task["fields"].update(fields)
            now = time.monotonic()
            if task["total"] and task["completed"] >= task["total"] and not task["final"]:
                task["final"] = True  # a completed task prints its last line at once
                self._print(task, now)
            elif now - task["printed"] >= self.interval:
                self._print(task, now)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def tick(self) -> None:
        """A line for every unfinished task not printed for an interval (called by the heartbeat thread)."""
        with self._lock:
            now = time.monotonic()
            self.gate.poll()
            for task in self.tasks:
                if not task["final"] and now - task["printed"] >= self.interval:
                    self._print(task, now)

    def finish(self) -> None:
        """A line for every unfinished task (the bar is closed); the held lines go out unless a command holds them."""
        with self._lock:
            now = time.monotonic()
            for task in self.tasks:
                if not task["final"]:
                    self._print(task, now)
        if self._own_gate:
            self.gate.release()

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
        if total and rate > 0 and done < total:
            parts.append(f"eta {_clock((total - done) / rate)}")
        self.gate.write(", ".join(parts) + "\n")


def _heartbeat(plain: PlainProgress, stop: threading.Event) -> None:
    """Every interval, a line for each unfinished task (a phase in one long step still shows in the log)."""
    while not stop.wait(plain.interval):
        plain.tick()


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
        command_gate = _COMMAND_GATE.get()
        plain = PlainProgress(extra_columns, _interval(), sys.stderr, command_gate)
        stop = threading.Event()
        beat = threading.Thread(target=_heartbeat, args=(plain, stop), name="vitqtool-progress", daemon=True)
        if plain.interval > 0:  # with 0 every update prints already
            beat.start()
        try:
            yield plain
        except BaseException:  # the error is the last word: no closing lines, none held from the first interval
            if command_gate is None:
                plain.gate.discard()
            raise
        else:
            plain.finish()
        finally:
            stop.set()
            if beat.is_alive():
                beat.join()
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


@contextlib.contextmanager
def phase(bar: Any | None, description: str, total: float | None = None) -> Iterator[Callable[..., None]]:
    """One phase of a longer command as a task of `bar` (a `progress_bar`, or None when disabled).

    Yields `advance(n=1)`; when the phase ends without an error its task is marked complete (total = steps
    done, at least 1), which prints its final line in a log and fills its bar on a terminal.
    """
    if bar is None:
        yield lambda n=1: None
        return
    task = bar.add_task(description, total=total)
    done = 0.0

    def advance(n: float = 1) -> None:
        nonlocal done
        done += n
        bar.advance(task, n)

    yield advance
    final = max(done, 1.0)
    bar.update(task, total=final, completed=final)
