"""Print a benchmark's markdown result and, when asked, save it (plus a JSON record) next to the others."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def publish(lines: list[str], path: Path | None, record: dict[str, Any] | None = None) -> None:
    """Print `lines` as one markdown document; write it to `path` (and `record` to `path` with .json) when given."""
    md = "\n".join(lines) + "\n"
    print("\n" + md, flush=True)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(md)
        if record is not None:
            path.with_suffix(".json").write_text(json.dumps(record, indent=1))
