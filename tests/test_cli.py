"""The command line in-process: evaluate end to end, --json shape, one-line errors and exit codes."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tests.conftest import TINY_VIT
from vitqtool.cli import app, main

runner = CliRunner()
NAME = TINY_VIT[0]  # two blocks of width 64: what is checked here is the command line, not the model
ARGS = ["--random-init", "--model-args", json.dumps(TINY_VIT[1])]


def test_evaluate_json_document_on_stdout():
    result = runner.invoke(app, ["evaluate", NAME, *ARGS, "--limit", "64", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc) >= {"top1", "top5", "loss", "n", "model", "data", "split"}
    assert doc["n"] == 64 and 0 <= doc["top1"] <= doc["top5"] <= 100 and doc["loss"] > 0


def test_evaluate_post_training_quantized_table():
    result = runner.invoke(app, ["evaluate", NAME, *ARGS, "--limit", "32", "--bits", "4", "--recipe", "ptq"])
    assert result.exit_code == 0, result.output
    assert "W4A4 (ptq)" in result.stdout and "top-1 %" in result.stdout


def run_main(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv,message", [
    (["evaluate", "deit_tiny_patch16_244", "--random-init"], "deit_tiny_patch16_224"),  # close-match suggestion
    (["evaluate", NAME, "--weights", "/nonexistent/w.safetensors"], "/nonexistent/w.safetensors"),
    (["evaluate", NAME, *ARGS, "--data", "/nonexistent/folder"], "/nonexistent/folder"),
    (["evaluate", NAME, "--random-init", "--model-args", json.dumps({**TINY_VIT[1], "num_classes": 7}), "--limit", "8"], "7"),
    (["recipes", "show", "nope"], "unknown recipe"),
])
def test_bad_input_gives_one_line_and_exit_1(capsys, argv, message):
    code, out, err = run_main(capsys, argv)
    assert code == 1
    assert out == ""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert "Traceback" not in err


def test_bad_flag_values_exit_2(capsys):
    code, _, err = run_main(capsys, ["evaluate", NAME, "--bits", "1"])
    assert code == 2 and "--bits" in err
    code, _, err = run_main(capsys, ["evaluate", NAME, "--model-args", "{not json"])
    assert code == 2 and "--model-args" in err


def test_recipes_show_json_and_toml():
    result = runner.invoke(app, ["recipes", "show", "vaq", "--bits", "2", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["quant"]["bits"] == 2
    result = runner.invoke(app, ["recipes", "list"])
    assert "vaq" in result.stdout and "lsq" in result.stdout and "ptq" in result.stdout


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys, vitqtool.cli; assert 'torch' not in sys.modules and 'timm' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "vitqtool", "--help"], check=True, capture_output=True, text=True).stdout
    assert "evaluate" in out


def test_text_from_data_is_never_read_as_markup(capsys, tmp_path):
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    state = timm.create_model(NAME, **TINY_VIT[1]).state_dict()
    save_file({k: v for k, v in state.items() if k != "blocks.0.attn.qkv.weight"}, str(weights))
    code, _, err = run_main(capsys, ["evaluate", NAME, "--model-args", json.dumps(TINY_VIT[1]), "--weights", str(weights)])
    assert code == 1 and "[blocks.0.attn.qkv.weight]" in err  # strict loading's key list survives printing
    odd = tmp_path / "no[/such]dir"
    code, _, err = run_main(capsys, ["evaluate", NAME, *ARGS, "--data", str(odd)])
    assert code == 1 and "no[/such]dir" in err and "MarkupError" not in err and "Traceback" not in err


def test_version_quiet_verbose_and_completion(capsys):
    from vitqtool import __version__

    code, out, _ = run_main(capsys, ["--version"])
    assert code == 0 and out.strip() == f"vitqtool {__version__}"
    code, out, err = run_main(capsys, ["-q", "evaluate", NAME, *ARGS, "--limit", "16"])
    assert code == 0 and "top-1" in out and err == ""
    code, _, err = run_main(capsys, ["-v", "evaluate", NAME, *ARGS, "--limit", "16", "--bits", "4", "--json"])
    assert code == 0 and "INFO vitqtool.core.prepare: quantized" in err  # INFO logs were never shown before -v
    code, out, _ = run_main(capsys, ["--help"])
    assert code == 0 and "--install-completion" in out


def test_without_a_terminal_progress_is_plain_lines_at_an_interval(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("VITQ_PROGRESS_SECONDS", "0")  # a line on every update (default: every 30 s)
    code, _, err = run_main(capsys, ["quantize", NAME, *ARGS, "--recipe", "lsq", "--epochs", "1", "--batch-size", "8",
                                     "--limit-train", "24", "--limit-val", "16", "--out", str(tmp_path / "run")])
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("quantize: ")]
    assert len(lines) >= 3 and lines[-1].startswith("quantize: 3/3")  # step, loss, img/s, elapsed and eta
    assert all(" img/s" in ln and "elapsed" in ln for ln in lines) and any("eta" in ln for ln in lines)
    assert "\r" not in err and "━" not in err
