"""Shared code names no model family: family knowledge lives in `vitqtool/families/` (docs/architecture.md)."""

import re
from pathlib import Path

from vitqtool.families.base import FAMILIES

PACKAGE = Path(__file__).resolve().parent.parent / "vitqtool"


def test_no_family_name_outside_the_family_plugins():
    names = {"vit", "deit", "swin", "resnet", "convnext"} | {f.name for f in FAMILIES.values()}
    pattern = re.compile(r"(?<![a-z])(" + "|".join(sorted(names)) + r")s?(?![a-z])", re.IGNORECASE)
    files = [PACKAGE / "commands.py", PACKAGE / "cli.py", *sorted((PACKAGE / "core").rglob("*.py")),
             *sorted((PACKAGE / "export").rglob("*.py"))]
    found = [f"{path.relative_to(PACKAGE)}:{i}: {line.strip()[:100]}" for path in files
             for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not found, "family names belong in vitqtool/families/:\n" + "\n".join(found)
