"""The `vitqtool` command line: a thin Typer layer over the library functions.

Each command parses its flags, calls one library function and renders the result (a rich table, or
one JSON document on stdout with `--json`). Input errors (`VitqError`) print one line on stderr and
exit 1; bad flags exit 2. Set VITQ_DEBUG=1 for tracebacks. torch and timm are imported inside the
commands so that `vitqtool --help` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .errors import VitqError

app = typer.Typer(
    name="vitqtool",
    help="Variation-aware 2/3/4/8-bit quantization of Vision Transformers (timm / Hugging Face checkpoints).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
recipes_app = typer.Typer(help="List and show the built-in recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")

# Options shared by several commands (defined once).
DataOpt = Annotated[str, typer.Option("--data", help="Dataset: builtin:mnist5k, a Hugging Face datasets name or path, or an image folder (class per subfolder).")]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="Local weights file (.safetensors, or .pth/.bin loaded with weights_only) for a timm MODEL name.")]
RandomInitOpt = Annotated[bool, typer.Option("--random-init", help="Build the model with random weights (smoke tests; no download).")]
ModelArgsOpt = Annotated[Optional[str], typer.Option("--model-args", help='Extra timm.create_model arguments as JSON, e.g. \'{"img_size": 32, "patch_size": 4, "num_classes": 10}\'.')]
RecipeOpt = Annotated[Optional[str], typer.Option("--recipe", help="Recipe: vaq, lsq, ptq, or a .toml path (see `vitqtool recipes list`).")]
BitsOpt = Annotated[Optional[int], typer.Option("--bits", min=2, max=8, help="Weight and activation bits inside transformer blocks (2..8); overrides the recipe.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else there.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")]


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _stdout_console():
    from rich.console import Console

    return Console()


def parse_model_args(text: str | None) -> dict[str, Any] | None:
    """Parse `--model-args` JSON into a dict (BadParameter on anything else)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}", param_hint="--model-args") from None
    if not isinstance(value, dict):
        raise typer.BadParameter("must be a JSON object", param_hint="--model-args")
    return value


def emit_json(document: Any) -> None:
    """Write one JSON document to stdout."""
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


def render_table(title: str, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    """Render rows of dicts as a rich table on stdout."""
    from rich.table import Table

    columns = columns or (list(rows[0]) if rows else [])
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if rows and isinstance(rows[0].get(c), (int, float)) else "left")
    for row in rows:
        table.add_row(*(_fmt(row.get(c)) for c in columns))
    _stdout_console().print(table)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


@app.command()
def evaluate(
    model: Annotated[str, typer.Argument(help="MODEL spec (timm name, hf-hub:..., model folder), a quantize run folder, or an exported .safetensors.")],
    data: DataOpt = "builtin:mnist5k",
    split: Annotated[str, typer.Option("--split", help="Dataset split to evaluate.")] = "validation",
    weights: WeightsOpt = None,
    random_init: RandomInitOpt = False,
    model_args: ModelArgsOpt = None,
    bits: BitsOpt = None,
    recipe: RecipeOpt = None,
    batch_size: BatchOpt = 64,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Evaluate only the first N images.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Top-1/top-5 accuracy and loss of an FP, quantized (--bits: post-training) or exported model."""
    from .api import evaluate as run_evaluate

    result = run_evaluate(model, data, split, weights=weights, random_init=random_init, model_args=parse_model_args(model_args),
                          bits=bits, recipe=recipe, batch_size=batch_size, limit=limit, show_progress=not as_json)
    if as_json:
        emit_json(result)
        return
    q = result["quantized"]
    render_table(f"evaluate {result['model']} on {result['data']} [{result['split']}]", [{
        "model": result["kind"] + (f" W{q['bits']}A{q['bits']} ({q['recipe']})" if q else ""),
        "top-1 %": result["top1"], "top-5 %": result["top5"], "loss": result["loss"], "images": result["n"]}])


@recipes_app.command("list")
def recipes_list(as_json: JsonOpt = False) -> None:
    """List the built-in recipes."""
    from .recipe import builtin_recipes, load_recipe

    rows = [{"name": n, "description": load_recipe(n).description} for n in builtin_recipes()]
    if as_json:
        emit_json(rows)
    else:
        render_table("built-in recipes", rows)


@recipes_app.command("show")
def recipes_show(
    recipe: Annotated[str, typer.Argument(help="Recipe name or .toml path.")],
    bits: BitsOpt = None,
    overrides: Annotated[Optional[list[Path]], typer.Option("--overrides", help="Override TOML files merged on top, in order.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a recipe fully resolved (defaults, override files and flags applied) as TOML or JSON."""
    from .recipe import load_recipe

    resolved = load_recipe(recipe, override_files=overrides, set_fields={"quant.bits": bits})
    if as_json:
        emit_json(resolved.to_dict())
    else:
        sys.stdout.write(resolved.to_toml())


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, turning VitqError into one stderr line and exit code 1."""
    debug = os.environ.get("VITQ_DEBUG") == "1"
    try:
        app(args=argv, standalone_mode=False)
    except VitqError as exc:
        if debug:
            raise
        _stderr_console().print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        _stderr_console().print("interrupted")
        return 130
    except Exception as exc:  # click usage errors and typer.Exit carry their own exit codes
        code = _click_exit_code(exc)
        if code is None:
            if debug:
                raise
            _stderr_console().print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} (set VITQ_DEBUG=1 for the traceback)",
                                    highlight=False, soft_wrap=True)
            return 3
        return code
    return 0


def _click_exit_code(exc: Exception) -> int | None:
    """Exit code for click/typer control-flow exceptions (usage errors print themselves); None otherwise."""
    import click

    if isinstance(exc, click.exceptions.Exit):
        return exc.exit_code
    if isinstance(exc, click.ClickException):
        exc.show()
        return exc.exit_code
    if isinstance(exc, click.exceptions.Abort):
        return 130
    return None


if __name__ == "__main__":
    sys.exit(main())
