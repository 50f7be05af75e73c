"""What a newcomer types: `quantize MODEL --bits 2 --recipe vaq` without --out, `analyze` without --data, and
output that survives a log (no terminal: full width, no cut paths or numbers)."""

import json

import pytest

from tests.conftest import TINY_DEIT, TINY_VIT
from vitqtool.cli import main

SMALL = ["--epochs", "1", "--batch-size", "8", "--limit-train", "16", "--limit-val", "16", "--calib-batches", "1"]


@pytest.fixture
def local_model(tmp_path, monkeypatch):
    """A tiny random-init DeiT (two blocks) saved as a local model folder `tiny-deit` in a fresh working directory."""
    import timm

    from vitqtool.core.models import save_model_folder

    monkeypatch.chdir(tmp_path)
    name, args = TINY_DEIT[0], {**TINY_DEIT[1], "depth": 2}
    save_model_folder(timm.create_model(name, **args), tmp_path / "tiny-deit", name, args)
    return "tiny-deit"


def _files(folder):
    """Every file of a run folder (but its lock file) with its contents and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file() and p.name != ".vitq-lock"}


def run_main(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_quantize_without_out_writes_runs_model_bits_recipe_and_never_overwrites(local_model, tmp_path, capsys):
    code, out, err = run_main(capsys, ["quantize", local_model, "--bits", "2", "--recipe", "vaq", *SMALL])
    run = tmp_path / "runs" / "tiny-deit-w2a2-vaq"
    assert code == 0, err
    assert "run folder: runs/tiny-deit-w2a2-vaq (no --out given)" in err and "runs/tiny-deit-w2a2-vaq" in out
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "done" and info["bits"] == 2 and info["recipe"] == "vaq"
    before = _files(run)

    code, out, err = run_main(capsys, ["quantize", local_model, "--bits", "2", "--recipe", "vaq", *SMALL])
    assert code == 1 and "already holds a run" in err and "runs/tiny-deit-w2a2-vaq" in err
    assert _files(run) == before  # refused, nothing rewritten

    from vitqtool.commands import default_run_folder, quantize
    from vitqtool.errors import RunError

    assert default_run_folder(local_model, bits=2, recipe="vaq") == run.relative_to(tmp_path)
    with pytest.raises(RunError, match="already holds a run"):
        quantize(local_model, bits=2, recipe="vaq", epochs=1, batch_size=8, limit_train=16, limit_val=16)


def test_default_run_folder_names_the_model_bits_and_recipe():
    from vitqtool.commands import default_run_folder

    assert str(default_run_folder("deit_tiny_patch16_224", bits=2)) == "runs/deit_tiny_patch16_224-w2a2-vaq"
    assert str(default_run_folder("hf-hub:timm/deit_small_patch16_224.fb_in1k@main", recipe="lsq", bits=3)) == \
        "runs/deit_small_patch16_224.fb_in1k-w3a3-lsq"
    assert str(default_run_folder("models/my vit/", recipe="ptq")) == "runs/my-vit-w4a4-ptq"  # the recipe's own bits


def test_analyze_without_data_says_the_report_is_on_digits(capsys, tmp_path):
    argv = ["analyze", TINY_VIT[0], "--random-init", "--model-args", json.dumps(TINY_VIT[1]), "--batches", "1",
            "--batch-size", "8", "--no-plots", "--what", "weights", "--json"]
    code, out, err = run_main(capsys, [*argv, "--out", str(tmp_path / "a")])
    assert code == 0, err
    notes = [ln for ln in err.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "builtin:mnist5k" in notes[0] and "--data" in notes[0], err
    json.loads(out)  # stdout is still one JSON document
    code, _, err = run_main(capsys, [*argv, "--out", str(tmp_path / "b"), "--data", "builtin:mnist5k"])
    assert code == 0 and "note:" not in err  # --data given: no note


def test_a_table_without_terminal_keeps_long_paths_and_numbers_whole(capsys, monkeypatch):
    from vitqtool.cli import render_table

    monkeypatch.delenv("COLUMNS", raising=False)
    path = "/a/very/long/folder/name/that/a/log/must/keep/whole/" * 4 + "w2.safetensors"
    render_table("exports", [{"model": "W2A2", "file": path, "bytes": 123456789012345, "top-1 %": 84.9}])
    out = capsys.readouterr().out
    assert path in out and "123456789012345" in out and "…" not in out
    render_table("bit allocation: average weight bits 2.000 -> 2.500", [{"module": "blocks.0.mlp.fc2", "bits": 4}])
    assert "average weight bits 2.000 -> 2.500" in capsys.readouterr().out  # a title wider than its table stays whole
    monkeypatch.setenv("COLUMNS", "60")  # COLUMNS is honoured: the table folds, it still cuts nothing
    render_table("exports", [{"model": "W2A2", "file": path, "bytes": 123456789012345}])
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 60 and "…" not in out
    assert "".join(line.strip("│ ") for line in out.splitlines()).count("w2.safetensors") == 1


def test_vitqtool_export_stays_the_function_when_the_export_subpackage_is_imported():
    import vitqtool
    import vitqtool.export  # binds the subpackage to its parent, which used to hide the function
    from vitqtool.commands import export

    assert vitqtool.export is export and callable(vitqtool.export)
    from vitqtool.export import FORMATS  # the subpackage itself still imports

    assert "safetensors" in FORMATS
