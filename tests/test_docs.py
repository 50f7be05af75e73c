"""The documentation the code points to exists: every `method.md §N` names a section of docs/method.md."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTION_REF = re.compile(r"method\.md §(\d+)(?:\s*[-–]\s*§?(\d+))?")


def _sources() -> list[Path]:
    files = [ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("recipes/*.toml")]
    for folder in ("vitqtool", "tests", "benchmarks"):
        files += (ROOT / folder).rglob("*.py")
    return sorted(p for p in files if p.is_file())


def test_every_method_md_reference_names_a_section_that_exists():
    text = (ROOT / "docs" / "method.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", text, flags=re.MULTILINE)}
    assert sections, "docs/method.md has no numbered sections"
    missing, seen = [], 0
    for path in _sources():
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for match in SECTION_REF.finditer(line):
                first, last = int(match.group(1)), int(match.group(2) or match.group(1))
                seen += 1
                missing += [f"{path.relative_to(ROOT)}:{i}: §{n}" for n in range(first, last + 1) if n not in sections]
    assert seen > 10, "the scan found almost no references; the pattern is wrong"
    assert not missing, "references to sections docs/method.md does not have:\n" + "\n".join(missing)
