"""mkdocs hooks: the reference pages are generated from the code at build time, so they cannot drift from it.

A page asks for a generated part with an HTML comment on its own line, `<!-- generate: NAME -->`:
`cli` (every command, argument and option of the Typer app), `recipe-fields` (every recipe section and field from
the dataclasses in vitqtool/recipe.py, with the value each built-in recipe sets), `export-formats` (the format
registry), `errors` (the VitqError classes and their exit codes) and `api` (mkdocstrings blocks for the public API
of `vitqtool/__init__.py`). The result images under benchmarks/results/ join the site as img/results/...,
without a copy in docs/. tests/test_docs.py calls these functions too.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- generate: ([a-z-]+) -->$", flags=re.MULTILINE)
RESULTS = ROOT / "benchmarks" / "results"
RESULT_IMAGES = "img/results"


def _cell(text: Any) -> str:
    """Text for one markdown table cell: pipes escaped, line breaks folded, `<` outside code spans not read as HTML."""
    parts = " ".join(str(text).split()).replace("|", "\\|").split("`")
    return "`".join(part if i % 2 else part.replace("<", "&lt;") for i, part in enumerate(parts))


# ---------------------------------------------------------------------------------------------------- CLI


def _type_name(annotation: Any) -> str:
    """INTEGER, FLOAT, TEXT, PATH, FLOAT FLOAT, ... for an option's Python annotation (Optional and list unwrapped)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return _type_name(next(a for a in args if a is not type(None)))
    if origin is list:
        return _type_name(args[0])
    if origin is tuple:
        return " ".join(_type_name(a) for a in args)
    names = {str: "TEXT", int: "INTEGER", float: "FLOAT", Path: "PATH", bool: ""}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)).upper())


def _option_row(param: Any) -> str:
    """One table row for a click/typer parameter: names, type, default, help."""
    names = " / ".join(f"`{n}`" for n in [*param.opts, *param.secondary_opts])
    if param.param_type_name == "argument":
        names = f"`{(param.metavar or param.name).upper()}`" + (" ..." if param.nargs == -1 else "")
    if getattr(param, "count", False):
        kind = "counter"
    elif getattr(param, "is_flag", False):
        kind = "flag"
    else:
        kind = _type_name(param.type_descriptor.annotation)
        if param.min is not None or param.max is not None:
            kind += f" ({'' if param.min is None else param.min}..{'' if param.max is None else param.max})"
    if getattr(param, "multiple", False) or (param.param_type_name == "option" and param.nargs == -1):
        kind += ", repeatable"
    default = param.default
    if param.required:
        shown = "required"
    elif default is None or callable(default) or (getattr(param, "is_flag", False) and default is False) or default == [] \
            or (getattr(param, "count", False) and default == 0):
        shown = ""
    elif isinstance(default, (tuple, list)):
        shown = "`" + " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default) + "`"
    elif isinstance(default, bool):
        shown = f"`{param.opts[0] if default else param.secondary_opts[0]}`" if param.secondary_opts else str(default)
    else:
        shown = f"`{default}`"
    return f"| {names} | {_cell(kind)} | {shown} | {_cell(param.help or '')} |"


def _usage(command: Any, path: str) -> str:
    pieces = [path]
    if any(p.param_type_name == "option" for p in command.params if not p.hidden):
        pieces.append("[OPTIONS]")
    if hasattr(command, "commands"):
        pieces.append("COMMAND [ARGS]...")
    for p in command.params:
        if p.param_type_name == "argument":
            name = (p.metavar or p.name).upper()
            pieces.append(f"{name}..." if p.nargs == -1 else name if p.required else f"[{name}]")
    return " ".join(pieces)


def _command_markdown(command: Any, path: str, level: int) -> list[str]:
    lines = [f"{'#' * level} `{path}`", "", inspect.cleandoc(command.help or ""), "", "```text", _usage(command, path), "```", ""]
    params = [p for p in command.params if not p.hidden]
    if params:
        lines += ["| argument / option | type | default | meaning |", "|---|---|---|---|"]
        lines += [_option_row(p) for p in params] + ["| `--help` |  |  | Show the help and exit. |", ""]
    for name, sub in getattr(command, "commands", {}).items():
        lines += _command_markdown(sub, f"{path} {name}", level + (0 if level == 2 and path == "vitqtool" else 1))
    return lines


def cli_markdown() -> str:
    """The reference of every `vitqtool` command, generated from the Typer app (what `--help` shows)."""
    import typer.main

    from vitqtool.cli import app

    return "\n".join(_command_markdown(typer.main.get_command(app), "vitqtool", 2))


def cli_commands() -> dict[str, set[str]]:
    """Command path (`vitqtool quantize`, `vitqtool recipes show`) -> the option names it takes (tests use it)."""
    import typer.main

    from vitqtool.cli import app

    found: dict[str, set[str]] = {}

    def walk(command: Any, path: str) -> None:
        options = {name for p in command.params for name in (*p.opts, *p.secondary_opts) if p.param_type_name == "option"}
        found[path] = options | {"--help"}
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}")

    walk(typer.main.get_command(app), "vitqtool")
    return found


# ---------------------------------------------------------------------------------------------------- recipes


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment that ends its line in the dataclass source (`bits: int = 4  # ...`)."""
    comments: dict[str, str] = {}
    source = inspect.getsource(cls)
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            match = re.match(r"\s+(\w+)\s*:", lines[token.start[0] - 1])
            if match:
                comments[match.group(1)] = token.string.lstrip("#").strip()
    return comments


def recipe_sections() -> list[tuple[str, type]]:
    """(TOML section name, dataclass) of every section of `Recipe`, in file order."""
    from vitqtool.recipe import Recipe

    return [(f.name, f.default_factory) for f in dataclasses.fields(Recipe)  # type: ignore[misc]
            if dataclasses.is_dataclass(f.default_factory)]


def _toml(value: Any) -> str:
    from vitqtool.recipe import _toml_value

    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, float) and value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4):
        return f"{value:g}"
    text = _toml_value(value)
    return "[0.75, 1.33]" if text == "[0.75, 1.3333333333333333]" else text


def recipe_fields_markdown() -> str:
    """One table per recipe section: every key with its type, default, the value in each built-in recipe, meaning.

    Raises ValueError for a field without a comment in recipe.py, so an undocumented field fails the docs build.
    """
    from vitqtool.recipe import builtin_recipes, load_recipe

    recipes = {name: load_recipe(name) for name in builtin_recipes()}
    lines: list[str] = []
    for section, cls in recipe_sections():
        comments = field_comments(cls)
        lines += [f"### `[{section}]`", "", inspect.cleandoc(cls.__doc__ or ""), "",
                  "| key | type | default | " + " | ".join(f"`{n}`" for n in recipes) + " | meaning |",
                  "|---|---|---|" + "---|" * len(recipes) + "---|"]
        for f in dataclasses.fields(cls):
            if f.name not in comments:
                raise ValueError(f"recipe field {section}.{f.name} has no comment in vitqtool/recipe.py; the docs need one")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            values = [getattr(getattr(r, section), f.name) for r in recipes.values()]
            cells = [f"`{_toml(v)}`" if v != default else "" for v in values]
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            lines.append(f"| `{f.name}` | `{_cell(kind)}` | `{_cell(_toml(default))}` | " + " | ".join(cells)
                         + f" | {_cell(comments[f.name])} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- formats, errors, API


def export_formats_markdown() -> str:
    """The registered export formats (`export --format NAME`) and their one-line summaries."""
    from vitqtool.export.formats import FORMATS

    lines = ["| `--format` | what it writes |", "|---|---|"]
    lines += [f"| [`{entry.name}`](#{entry.name}) | {_cell(entry.summary)} |" for entry in FORMATS.values()]
    return "\n".join(lines)


def error_classes() -> list[type]:
    """Every VitqError subclass of vitqtool.errors, in definition order."""
    from vitqtool import errors

    return [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
            if issubclass(cls, errors.VitqError) and cls.__module__ == errors.__name__]


def errors_markdown() -> str:
    """The error classes the CLI turns into one line on stderr, with their exit codes."""
    lines = ["| error class | exit code | raised when |", "|---|---|---|"]
    classes = sorted(error_classes(), key=lambda c: inspect.getsourcelines(c)[1])
    lines += [f"| `{cls.__name__}` | {cls.exit_code} | {_cell(inspect.getdoc(cls) or '')} |" for cls in classes]
    return "\n".join(lines)


def api_markdown() -> str:
    """mkdocstrings blocks for every name of the public API (`vitqtool.NAME`, imported lazily from its module)."""
    import vitqtool

    lines = []
    for name, module in vitqtool._API.items():
        lines += [f"## `vitqtool.{name}`", "", f"::: {module}.{name}", "    options:", "      show_root_heading: false", ""]
    return "\n".join(lines)


GENERATORS = {"cli": cli_markdown, "recipe-fields": recipe_fields_markdown, "export-formats": export_formats_markdown,
              "errors": errors_markdown, "api": api_markdown}


# ---------------------------------------------------------------------------------------------------- mkdocs events


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace every `<!-- generate: NAME -->` line with the generated markdown (an unknown NAME fails the build)."""
    def generate(match: re.Match) -> str:
        name = match.group(1)
        from mkdocs.exceptions import PluginError

        if name not in GENERATORS:
            raise PluginError(f"{page.file.src_uri}: unknown generated part {name!r} (known: {', '.join(GENERATORS)})")
        try:
            return GENERATORS[name]()
        except ValueError as exc:
            raise PluginError(f"{page.file.src_uri}: {exc}") from None

    return MARKER.sub(generate, markdown)


def on_files(files: Any, config: Any) -> Any:
    """Serve the PNGs of benchmarks/results/ as img/results/<their path under results/>."""
    from mkdocs.structure.files import File

    for path in sorted(RESULTS.rglob("*.png")):
        files.append(File.generated(config, f"{RESULT_IMAGES}/{path.relative_to(RESULTS).as_posix()}", abs_src_path=str(path)))
    return files
