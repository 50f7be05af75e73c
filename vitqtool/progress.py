"""Progress bars on stderr (rich), shared by every long-running function; silent when disabled."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


@contextlib.contextmanager
def progress_bar(enabled: bool, *extra_columns: str) -> Iterator[object | None]:
    """A rich Progress on stderr (or None when disabled); columns show rate-independent ETA."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               *(TextColumn(c) for c in extra_columns), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        yield bar


def track(items: Iterable[T], description: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Iterate `items` with a progress bar on stderr when `enabled`."""
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
