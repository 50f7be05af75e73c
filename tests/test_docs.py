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


# ------------------------------------------------------------------------------------------------------------------
# The pages: runnable command blocks run, commands use options that exist, repository paths exist, links resolve.

import os  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

MARKER = re.compile(r"^<!-- test: (run|skip)\b(.*?)-->$")
CHECKED_SECTIONS = ("Getting started", "How-to guides")  # every bash/python block of these pages (and the README) is marked
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "&"}


@dataclass
class Block:
    """One fenced code block of a page: its language, code, first line number and the test marker before it."""

    path: Path
    line: int
    lang: str
    code: str
    marker: str | None  # "run", "run exit=1", "skip REASON", or None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file, each with the `<!-- test: ... -->` comment on the line before it."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        if lines[i].startswith("```"):
            lang = (lines[i][3:].strip().split() or [""])[0]
            before = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
            match = MARKER.match(before)
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            marker = f"{match.group(1)} {match.group(2).strip()}".strip() if match else None
            blocks.append(Block(path, i + 1, lang, "\n".join(lines[i + 1:end]) + "\n", marker))
            i = end
        i += 1
    return blocks


def _nav_pages(nav: list, sections: tuple[str, ...], inside: bool = False) -> list[str]:
    pages = []
    for entry in nav:
        for title, value in (entry.items() if isinstance(entry, dict) else [(None, entry)]):
            if isinstance(value, list):
                pages += _nav_pages(value, sections, inside or title in sections)
            elif inside:
                pages.append(value)
    return pages


def checked_pages() -> list[Path]:
    """The README and the pages of the site's Getting started and How-to sections (from mkdocs.yml's nav)."""
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    return [ROOT / "README.md", *(ROOT / "docs" / page for page in _nav_pages(nav, CHECKED_SECTIONS))]


def all_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_every_command_block_of_the_readme_and_the_how_to_pages_is_marked_run_or_skip():
    pages = checked_pages()
    assert len(pages) >= 8, pages
    unmarked = [b.where for p in pages for b in code_blocks(p) if b.lang in ("bash", "sh", "python") and b.marker is None]
    assert not unmarked, "blocks without <!-- test: run --> or <!-- test: skip REASON -->:\n" + "\n".join(unmarked)
    bad = [b.where for p in all_pages() for b in code_blocks(p) if b.marker in ("skip", "run exit")]
    assert not bad, "a skip needs its reason, an exit its code: " + ", ".join(bad)


def _commands(code: str) -> list[str]:
    """Logical shell commands: continuation lines joined, a heredoc kept whole with its command."""
    commands, lines, i = [], code.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        heredoc = re.search(r"<<-?\s*'?(\w+)'?", line)
        if heredoc:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == heredoc.group(1))
            line = "\n".join([line, *lines[i + 1:end + 1]])
            i = end
        if line.strip() and not line.strip().startswith("#"):
            commands.append(line)
        i += 1
    return commands


def _run_bash_block(block: Block, capsys, monkeypatch) -> None:
    from vitqtool.cli import main

    expected = int(re.search(r"exit=(\d+)", block.marker).group(1)) if "exit=" in block.marker else 0
    commands = _commands(block.code)
    for n, command in enumerate(commands):
        want = expected if n == len(commands) - 1 else 0
        tokens = shlex.split(command, comments=True) if "\n" not in command else []
        if tokens[:1] == ["export"]:
            for assignment in tokens[1:]:
                monkeypatch.setenv(*assignment.split("=", 1))
            continue
        if tokens[:1] == ["vitqtool"] and not SHELL_OPERATORS & set(tokens):
            code = main(tokens[1:])  # in-process: no interpreter start per command
            out, err = capsys.readouterr()
        else:
            bin_dir = str(Path(sys.executable).parent)
            env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
            done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=300)
            code, out, err = done.returncode, done.stdout, done.stderr
        assert code == want, f"{block.where}: `{command}` exited {code}, expected {want}\n{out[-3000:]}\n{err[-3000:]}"


def runnable_pages() -> list[Path]:
    return [p for p in all_pages() if any(b.marker and b.marker.startswith("run") for b in code_blocks(p))]


@pytest.mark.parametrize("page", runnable_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_runnable_blocks_of_a_page_run(page, tmp_path, monkeypatch, capsys):
    """Every `<!-- test: run -->` block of the page, in order, in one temporary folder, offline."""
    monkeypatch.chdir(tmp_path)
    for name, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "VITQ_PROGRESS_SECONDS": "3600"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("COLUMNS", raising=False)
    namespace: dict = {"__name__": "__docs__"}
    for block in code_blocks(page):
        if not (block.marker or "").startswith("run"):
            continue
        if block.lang == "python":
            exec(compile(block.code, block.where, "exec"), namespace)  # noqa: S102 - the page's own code
        elif block.lang in ("bash", "sh"):
            _run_bash_block(block, capsys, monkeypatch)
        else:
            raise AssertionError(f"{block.where}: cannot run a {block.lang!r} block")


def _tools():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import docs_hooks
    finally:
        sys.path.pop(0)
    return docs_hooks


def test_every_vitqtool_command_shown_uses_options_that_exist():
    commands = _tools().cli_commands()
    root = commands["vitqtool"]
    wrong, seen = [], 0
    for page in all_pages():
        for block in code_blocks(page):
            if block.lang not in ("bash", "sh", "text"):  # an unlabelled block is a diagram or output
                continue
            for command in _commands(block.code):
                for part in re.split(r"&&|\|\||;|\|", command.split(" #")[0]):
                    words = part.replace("[", " ").replace("]", " ").split()
                    at = [i for i, w in enumerate(words) if w == "vitqtool" and (i == 0 or words[i - 1] == "-m")]
                    if not at:
                        continue  # prose in a text block, not a command line
                    rest = words[at[0] + 1:]
                    options = [w for w in rest if w.startswith("-")]
                    names = [w for w in rest if not w.startswith("-")]
                    path = "vitqtool"
                    for name in names[:2]:
                        if f"{path} {name}" in commands:
                            path = f"{path} {name}"
                    if path == "vitqtool" and not names:
                        continue
                    if path == "vitqtool":
                        wrong.append(f"{block.where}: unknown command in `{part.strip()}`")
                        continue
                    seen += 1
                    for option in options:
                        flag = re.match(r"-{1,2}[A-Za-z][\w-]*", option)
                        if flag and flag.group(0) not in commands[path] | root:
                            wrong.append(f"{block.where}: `{path}` has no option {flag.group(0)}")
    assert seen > 40, seen
    assert not wrong, "\n".join(wrong)


REPO_PATH = re.compile(r"`((?:benchmarks|vitqtool|tests|recipes|tools|docs)/[A-Za-z0-9_./-]+)`")


def test_repository_paths_named_in_the_docs_exist():
    missing, seen = [], 0
    for page in all_pages():
        for i, line in enumerate(page.read_text().splitlines(), 1):
            for match in REPO_PATH.finditer(line):
                seen += 1
                if not (ROOT / match.group(1).rstrip("/")).exists():
                    missing.append(f"{page.relative_to(ROOT)}:{i}: {match.group(1)}")
    assert seen > 30, seen
    assert not missing, "paths that do not exist in the repository:\n" + "\n".join(missing)


def test_the_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert len(targets) > 15
    assert not [t for t in targets if not t.startswith("http") and not (ROOT / t).exists()]


def test_generated_reference_covers_every_command_recipe_field_format_and_error():
    tools = _tools()
    cli = tools.cli_markdown()
    for path in tools.cli_commands():
        assert f"`{path}`" in cli
    fields = tools.recipe_fields_markdown()
    import dataclasses

    for section, cls in tools.recipe_sections():
        assert f"`[{section}]`" in fields
        assert all(f"| `{f.name}` |" in fields for f in dataclasses.fields(cls))
    from vitqtool.export.formats import FORMATS

    formats_page = (ROOT / "docs" / "reference" / "formats.md").read_text()
    assert all(f"{{ #{name} }}" in formats_page for name in FORMATS), "every registered format needs its section"
    errors = tools.errors_markdown()
    assert all(f"`{cls.__name__}`" in errors for cls in tools.error_classes())
    assert len(tools.error_classes()) >= 8
