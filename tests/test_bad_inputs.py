"""A table of bad inputs through the CLI: each ends in exit 1 (2 for usage) and one true line, and changes nothing.

Every row builds its input in its own folder (damaged exports and run folders, tampered metadata, bad
recipes, bad config.json, paths in the way, read-only and full file systems), runs `vitqtool` in-process
and checks: the exit code, exactly one line on stderr naming the problem, no "internal error", no
traceback, and not a byte changed or created in the case folder or in the good inputs it copied from.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests.conftest import TINY_VIT, interrupt_at_step, write_run_folder
from vitqtool import core
from vitqtool.cli import main
from vitqtool.core.models import save_model_folder
from vitqtool.export import export_model
from vitqtool.recipe import load_recipe

NAME, ARGS = TINY_VIT
MODEL_ARGS = ["--model-args", json.dumps(ARGS)]


@dataclass
class Good:
    """Valid inputs every row starts from (never changed by a row)."""

    root: Path
    export: Path
    fp: Path
    run: Path


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Good:
    root = tmp_path_factory.mktemp("good")
    model = timm.create_model(NAME, pretrained=False, **ARGS).eval()
    save_model_folder(model, root / "fp", NAME, ARGS)
    loaded = core.resolve_model(str(root / "fp"))
    recipe = load_recipe("vaq", set_fields={"quant.bits": 4})
    qmodel = core.prepare(loaded.model, recipe)
    core.calibrate(qmodel, [torch.randn(4, 3, 32, 32)])
    export_model(qmodel.eval(), root / "m.safetensors", architecture=NAME, model_args=ARGS, data_config=loaded.data_config,
                 recipe=recipe)
    write_run_folder(root / "run", qmodel, recipe, architecture=NAME, model_args=ARGS, data_config=loaded.data_config)
    return Good(root, root / "m.safetensors", root / "fp", root / "run")


# ------------------------------------------------------------------------------------------ file surgery


def _read(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def tampered(src: Path, dst: Path, *, tensors=None, vitq=None, qconfig=None) -> Path:
    """A copy of export `src` with its tensors, vitqtool metadata or quantization_config changed by the given functions."""
    t, meta = _read(src)
    if tensors:
        t = tensors(t)
    if vitq:
        meta["vitqtool"] = json.dumps(vitq(json.loads(meta["vitqtool"])))
    if qconfig:
        meta["quantization_config"] = json.dumps(qconfig(json.loads(meta["quantization_config"])))
    save_file(t, str(dst), metadata=meta)
    return dst


def raw_header(src: Path, dst: Path, edit) -> Path:
    """A copy of `src` whose safetensors JSON header is rewritten by `edit` (the tensor bytes are kept)."""
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = edit(json.loads(data[8:8 + n]))
    text = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])
    return dst


def _set(d: dict, path: str, value) -> dict:
    keys = path.split(".")
    inner = d
    for k in keys[:-1]:
        inner = inner[k]
    inner[keys[-1]] = value
    return d


def _first_layer(vq: dict) -> str:
    return next(iter(vq["layers"]))


def _scale_key(t: dict) -> str:
    return next(k for k in t if k.endswith(".weight_scale"))


def _edit_json(path: Path, edit) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# ------------------------------------------------------------------------------------------ the rows

# Each row: id -> function(case folder, good inputs) returning (argv, exit code, text the one stderr line contains).
ROWS = {}


def row(name: str):
    def add(fn):
        ROWS[name] = fn
        return fn
    return add


def _export_rows(name: str, make, needle: str) -> None:
    """A damaged export through `inspect` and through `evaluate`."""
    for verb in ("inspect", "evaluate"):
        def fn(case, good, verb=verb):
            path = make(case, good)
            return [verb, str(path)], 1, needle
        ROWS[f"export-{name}-{verb}"] = fn


_export_rows("truncated", lambda c, g: _write(c / "m.safetensors", g.export.read_bytes()[: g.export.stat().st_size // 2]), "truncated")
_export_rows("empty", lambda c, g: _write(c / "m.safetensors", b""), "too short")
_export_rows("garbage", lambda c, g: _write(c / "m.safetensors", os.urandom(4096)), "safetensors")
_export_rows("header-not-json", lambda c, g: _write(c / "m.safetensors", struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 64), "corrupt")
_export_rows("metadata-not-json", lambda c, g: raw_header(g.export, c / "m.safetensors",
             lambda h: _set(h, "__metadata__.vitqtool", "{broken")), "corrupt vitqtool metadata")
_export_rows("newer-version", lambda c, g: tampered(g.export, c / "m.safetensors", vitq=lambda v: _set(v, "format_version", "9.0")),
             "newer than this vitqtool")
_export_rows("version-not-a-number", lambda c, g: tampered(g.export, c / "m.safetensors",
             vitq=lambda v: _set(v, "format_version", "one")), "format_version")
_export_rows("bits-as-string", lambda c, g: tampered(g.export, c / "m.safetensors",
             vitq=lambda v: {**v, "layers": {**v["layers"], _first_layer(v): {**v["layers"][_first_layer(v)], "weight_bits": "2"}}}),
             "weight_bits")
_export_rows("model-args-string", lambda c, g: tampered(g.export, c / "m.safetensors",
             vitq=lambda v: _set(v, "model_args", "img_size=32")), "model_args")
_export_rows("input-size-big", lambda c, g: tampered(g.export, c / "m.safetensors",
             vitq=lambda v: _set(v, "data_config.input_size", "big")), "input_size")
_export_rows("input-size-mismatch", lambda c, g: tampered(g.export, c / "m.safetensors",
             vitq=lambda v: _set(v, "data_config.input_size", [3, 64, 64])), "input_size")
_export_rows("path-in-tensor-name", lambda c, g: tampered(g.export, c / "m.safetensors",
             tensors=lambda t: {**t, "../../../tmp/PWNED_NAME": torch.zeros(1)}), "PWNED_NAME")
_export_rows("code-as-architecture", lambda c, g: tampered(g.export, c / "m.safetensors",
             vitq=lambda v: _set(v, "architecture", "__import__('os').system('touch /tmp/pwned')")), "architecture")
_export_rows("recipe-bits-1", lambda c, g: tampered(g.export, c / "m.safetensors", vitq=lambda v: _set(v, "recipe.quant.bits", 1)), "quant.bits")
def _overlap(header: dict) -> dict:
    """Point the second tensor's data at the first tensor's bytes."""
    second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[1]
    begin, end = header[second]["data_offsets"]
    header[second]["data_offsets"] = [0, end - begin]
    return header


_export_rows("overlapping-offsets", lambda c, g: raw_header(g.export, c / "m.safetensors", _overlap), "overlapping")
_export_rows("nan-scale", lambda c, g: tampered(g.export, c / "m.safetensors",
             tensors=lambda t: {**t, _scale_key(t): torch.full_like(t[_scale_key(t)], float("nan"))}), "weight scale")
_export_rows("negative-scale", lambda c, g: tampered(g.export, c / "m.safetensors",
             tensors=lambda t: {**t, _scale_key(t): -t[_scale_key(t)]}), "weight scale")
_export_rows("nan-pos-embed", lambda c, g: tampered(g.export, c / "m.safetensors",
             tensors=lambda t: {**t, "pos_embed": torch.full_like(t["pos_embed"], float("nan"))}), "pos_embed")
_export_rows("missing-tensor", lambda c, g: tampered(g.export, c / "m.safetensors",
             tensors=lambda t: {k: v for k, v in t.items() if k != "head.weight_packed"}), "head.weight_packed")
_export_rows("quant-method", lambda c, g: tampered(g.export, c / "m.safetensors",
             qconfig=lambda q: _set(q, "quant_method", "gptq")), "quant_method")


def _folder_row(name: str, which: str, damage, verb: str, needle: str) -> None:
    """A copy of the good run (`which="run"`) or FP model folder (`"fp"`), damaged, through `verb`."""
    def fn(case, good):
        folder = Path(shutil.copytree(getattr(good, which), case / which))
        damage(folder)
        out = ["--out", str(case / "x.safetensors")] if verb == "export" else []
        return [verb, str(folder), *out], 1, needle
    ROWS[f"{which}-{name}"] = fn


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _checkpoint(run: Path) -> Path:
    return next(d for d in (run / "checkpoints").iterdir() if d.is_dir())


def _infinite_weight(file: Path, key: str) -> None:
    t, meta = _read(file)
    t[key] = torch.full_like(t[key], float("inf"))
    save_file(t, str(file), metadata=meta)


_folder_row("index-truncated", "run", lambda r: _truncate(r / "checkpoints" / "index.json", 5), "evaluate", "is damaged")
_folder_row("version-one", "run", lambda r: _edit_json(r / "run.json", lambda d: _set(d, "format_version", "one")), "evaluate", "is damaged")
_folder_row("no-architecture", "run", lambda r: _edit_json(r / "run.json", lambda d: {k: v for k, v in d.items() if k != "architecture"}),
            "export", "architecture")
_folder_row("json-garbage", "run", lambda r: (r / "run.json").write_text('{"format": '), "evaluate", "is damaged")
_folder_row("newer-version", "run", lambda r: _edit_json(r / "run.json", lambda d: _set(d, "format_version", 7)), "evaluate",
            "newer than this vitqtool")
_folder_row("checkpoint-missing", "run", lambda r: shutil.rmtree(_checkpoint(r)), "export", "unreadable")
_folder_row("inf-weights", "run", lambda r: _infinite_weight(_checkpoint(r) / "model.safetensors", "blocks.0.mlp.fc1.weight"),
            "evaluate", "blocks.0.mlp.fc1.weight")
_folder_row("model-args-string", "fp", lambda f: _edit_json(f / "config.json", lambda d: _set(d, "model_args", "img_size=32")),
            "evaluate", "model_args")
_folder_row("num-classes-ten", "fp", lambda f: _edit_json(f / "config.json", lambda d: _set(d, "num_classes", "ten")),
            "evaluate", "num_classes")
_folder_row("pretrained-cfg-list", "fp", lambda f: _edit_json(f / "config.json", lambda d: _set(d, "pretrained_cfg", [1])),
            "evaluate", "pretrained_cfg")
_folder_row("config-not-json", "fp", lambda f: (f / "config.json").write_text("{{{"), "evaluate", "not valid JSON")
_folder_row("architecture-not-a-name", "fp", lambda f: _edit_json(f / "config.json", lambda d: _set(d, "architecture", {"eval": "1"})),
            "evaluate", "architecture")
_folder_row("weights-inf", "fp", lambda f: _infinite_weight(f / "model.safetensors", "pos_embed"), "evaluate", "pos_embed")


def _quantize(case: Path, *extra: str) -> list[str]:
    return ["quantize", NAME, "--random-init", *MODEL_ARGS, "--out", str(case / "run"), "--batch-size", "8",
            "--limit-train", "16", "--limit-val", "16", *extra]


def _recipe_row(name: str, toml: str, needle: str) -> None:
    def fn(case, good):
        over = _write(case / "over.toml", toml)
        return _quantize(case, "--overrides", str(over)), 1, needle
    ROWS[f"recipe-{name}"] = fn


_recipe_row("lr-nan", "[train]\nlr = nan\n", "train.lr")
_recipe_row("lr-inf", "[train]\nlr = inf\n", "train.lr")
_recipe_row("num-workers-negative", "[train]\nnum_workers = -3\n", "train.num_workers")
_recipe_row("obr-modules-ints", "[obr]\nmodules = [1, 2]\n", "obr.modules")
_recipe_row("momentum-negative", "[oscillation]\nmomentum = -5.0\n", "oscillation.momentum")
_recipe_row("momentum-zero", "[oscillation]\nmomentum = 0.0\n", "oscillation.momentum")
_recipe_row("weight-decay-negative", "[train]\nweight_decay = -1.0\n", "train.weight_decay")
_recipe_row("scale-three", "[augment]\nscale = [0.1, 0.5, 0.9]\n", "augment.scale")
_recipe_row("scale-one", "[augment]\nscale = [0.5]\n", "augment.scale")
_recipe_row("unknown-key-in-table", "[quant]\nbitz = 2\n", "[quant]")  # the table name survives printing
_recipe_row("not-toml", "[train\nlr = 1\n", "not valid TOML")


@row("recipe-seed-negative")
def _(case, good):
    return _quantize(case, "--seed", "-1"), 1, "train.seed"


@row("recipes-show-binary")
def _(case, good):
    return ["recipes", "show", str(_write(case / "bin.toml", b"\x00\xff\xfe\x01"))], 1, "not a text file"


@row("recipes-show-folder")
def _(case, good):
    (case / "dir.toml").mkdir()
    return ["recipes", "show", str(case / "dir.toml")], 1, "is a folder"


@row("recipes-show-bad-scale")
def _(case, good):
    return ["recipes", "show", str(_write(case / "r.toml", "[augment]\nscale = [0.5]\n"))], 1, "augment.scale"


@row("quantize-out-is-a-file")
def _(case, good):
    _write(case / "precious.txt", "keep me")
    return ["quantize", NAME, "--random-init", *MODEL_ARGS, "--recipe", "ptq", "--out", str(case / "precious.txt")], 1, "precious.txt"


@row("quantize-out-parent-is-a-file")
def _(case, good):
    _write(case / "config.json", "{}")
    return ["quantize", NAME, "--random-init", *MODEL_ARGS, "--recipe", "ptq", "--out", str(case / "config.json" / "run")], 1, "is a file"


@row("export-out-is-a-folder")
def _(case, good):
    (case / "adir").mkdir()
    return ["export", str(good.run), "--out", str(case / "adir")], 1, "is a folder"


@row("export-out-parent-is-a-file")
def _(case, good):
    _write(case / "config.json", "{}")
    return ["export", str(good.run), "--out", str(case / "config.json" / "m.safetensors")], 1, "is a file"


@row("analyze-out-is-a-file")
def _(case, good):
    _write(case / "report", "not a folder")
    return ["analyze", str(good.fp), "--batches", "1", "--batch-size", "4", "--out", str(case / "report")], 1, "is a file"


@row("softlabels-out-is-a-file")
def _(case, good):
    _write(case / "labels", "not a folder")
    return ["softlabels", str(good.fp), "--out", str(case / "labels"), "--crops", "1", "--limit", "2"], 1, "is a file"


@row("resume-nothing")
def _(case, good):
    return _quantize(case, "--resume"), 1, "nothing to resume"


@row("resume-nothing-ptq")
def _(case, good):
    return _quantize(case, "--resume", "--recipe", "ptq"), 1, "nothing to resume"


@row("resume-and-overwrite")
def _(case, good):
    return _quantize(case, "--resume", "--overwrite"), 1, "exclude each other"


@row("evaluate-unknown-model")
def _(case, good):
    return ["evaluate", "vit_tiny_patch16_244", "--random-init"], 1, "unknown model"


@row("evaluate-missing-data-folder")
def _(case, good):
    return ["evaluate", str(good.fp), "--data", str(case / "no[/such]dir")], 1, "no[/such]dir"


@row("export-not-a-run")
def _(case, good):
    return ["export", str(good.fp), "--out", str(case / "x.safetensors")], 1, "neither"


USAGE = {
    "usage-bits-9": ["evaluate", NAME, "--bits", "9"],
    "usage-bad-format": ["export", "run", "--out", "x", "--format", "tar"],
    "usage-bad-dtype": ["export", "run", "--out", "x", "--dtype", "int3"],
    "usage-unknown-flag": ["evaluate", NAME, "--frobnicate"],
    "usage-model-args-not-json": ["evaluate", NAME, "--model-args", "{img_size: 32}"],
}
for _name, _argv in USAGE.items():
    ROWS[_name] = lambda case, good, argv=_argv: (argv, 2, "")


# ------------------------------------------------------------------------------------------ file systems


def _mount_tmpfs(where: Path, size: str, read_only: bool = False) -> None:
    """A small tmpfs at `where` (root only); skips the test with the reason when it cannot be mounted."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("read-only and full-disk rows need a tmpfs, which only root can mount; this test does not run as root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()[:200]})")
    if read_only:
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)


@pytest.fixture
def mounts():
    mounted = []

    def mount(where: Path, size: str, read_only: bool = False) -> Path:
        _mount_tmpfs(where, size, read_only)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


FS_ROWS = {  # id -> (read_only, tmpfs size, argv builder, needle)
    "readonly-export": (True, "1m", lambda fs, good: ["export", str(good.run), "--out", str(fs / "m.safetensors")], "read-only"),
    "readonly-quantize": (True, "1m", lambda fs, good: ["quantize", NAME, "--random-init", *MODEL_ARGS, "--recipe", "ptq",
                                                       "--out", str(fs / "run")], "read-only"),
    "readonly-analyze": (True, "1m", lambda fs, good: ["analyze", str(good.fp), "--batches", "1", "--batch-size", "4",
                                                      "--no-plots", "--out", str(fs / "report")], "read-only"),
    "readonly-softlabels": (True, "1m", lambda fs, good: ["softlabels", str(good.fp), "--out", str(fs / "labels"), "--crops", "1",
                                                         "--limit", "2"], "read-only"),
    "full-export": (False, "64k", lambda fs, good: ["export", str(good.run), "--out", str(fs / "m.safetensors")], "disk full"),
    # --json: no progress bars, so the error is the only line (the disk fills only after the analysis ran)
    "full-analyze": (False, "16k", lambda fs, good: ["analyze", str(good.fp), "--batches", "1", "--batch-size", "4",
                                                    "--no-plots", "--json", "--out", str(fs / "report")], "disk full"),
    "full-fp-folder-export": (False, "64k", lambda fs, good: ["export", str(good.run), "--out", str(fs / "deep" / "m.safetensors")],
                              "disk full"),
}


# ------------------------------------------------------------------------------------------ the checks


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for root in roots:
        for p in root.rglob("*"):
            st = p.lstat()
            out[str(p)] = (st.st_size, st.st_mtime_ns) if p.is_file() else (0, 0)
    return out


def _check(code: int, err: str, expected_code: int, needle: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == expected_code, err
    assert "internal error" not in err and "Traceback" not in err, err
    if expected_code == 2:
        return  # usage errors: click's own usage block
    assert len(lines) == 1, err
    assert needle.lower() in lines[0].lower(), lines[0]


def test_the_table_has_at_least_sixty_rows():
    assert len(ROWS) + len(FS_ROWS) >= 60


@pytest.mark.parametrize("name", sorted(ROWS))
def test_bad_input_is_one_true_line_and_changes_nothing(name, good, tmp_path, capsys):
    case = tmp_path / "case"
    case.mkdir()
    argv, expected_code, needle = ROWS[name](case, good)
    before = _snapshot(case, good.root)
    code = main(argv)
    _check(code, capsys.readouterr().err, expected_code, needle)
    assert _snapshot(case, good.root) == before
    assert not Path("/tmp/pwned").exists()


@pytest.mark.parametrize("name", sorted(FS_ROWS))
def test_read_only_and_full_file_systems(name, good, tmp_path, capsys, mounts):
    read_only, size, build, needle = FS_ROWS[name]
    fs = mounts(tmp_path / "fs", size, read_only)
    before = _snapshot(fs, good.root)
    code = main(build(fs, good))
    _check(code, capsys.readouterr().err, 1, needle)
    assert _snapshot(fs, good.root) == before  # nothing half-written left behind


def test_a_full_disk_during_quantize_keeps_the_run_folder_true(tmp_path, capsys, mounts):
    fs = mounts(tmp_path / "fs", "64k")
    code = main(["quantize", NAME, "--random-init", *MODEL_ARGS, "--recipe", "ptq", "--batch-size", "8", "--limit-train", "16",
                 "--limit-val", "16", "--out", str(fs / "run")])
    _check(code, capsys.readouterr().err, 1, "disk full")
    left = sorted(p.name for p in fs.rglob("*"))
    assert not [n for n in left if "vitq-tmp" in n or n.endswith(".tmp")], left
    assert json.loads((fs / "run" / "run.json").read_text())["status"] == "failed"


def test_sigterm_checkpoints_and_resume_hint(tmp_path, capsys, monkeypatch):
    """SIGTERM (what CI, timeout and docker send) stops quantize like Ctrl-C: checkpoint, status, resume hint, exit 143.

    In-process (a process start and its kernel compile cost ~10 s); a SIGTERM quantize left unhandled fails the test
    instead of ending pytest."""
    def unhandled(signum, frame):
        raise AssertionError("SIGTERM reached the default handler: quantize did not catch it")

    interrupt_at_step(monkeypatch, 2, lambda: signal.raise_signal(signal.SIGTERM))
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        code = main(_quantize(tmp_path, "--recipe", "lsq", "--epochs", "1"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert code == 143, err[-2000:]
    assert "interrupted at step 2 (SIGTERM)" in err and "--resume" in err
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "interrupted"
    assert json.loads((tmp_path / "run" / "checkpoints" / "index.json").read_text())["last"].startswith("step-00000002")


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom vitqtool.fileio import folder_lock\n"
        f"with folder_lock({str(tmp_path / 'run')!r}):\n    print('locked', flush=True)\n    time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = main(_quantize(tmp_path, "--recipe", "ptq"))
        _check(code, capsys.readouterr().err, 1, f"PID {holder.pid}")
        assert not (tmp_path / "run" / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_failed_run_does_not_block_the_same_command(tmp_path, capsys):
    argv = _quantize(tmp_path, "--recipe", "lsq", "--epochs", "1", "--lr", "1e30")
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1 and "not finite" in err and "no checkpoint was written yet" in err and "is kept" not in err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"
    assert main(_quantize(tmp_path, "--recipe", "ptq")) == 0  # nothing to resume: the same --out starts over
    capsys.readouterr()


def test_stale_temp_files_of_a_killed_writer_are_cleaned(good, tmp_path, capsys):
    stale = _write(tmp_path / ".m.safetensors.vitq-tmp-999999-abc.tmp", b"x" * 1000)  # no process 999999
    live = _write(tmp_path / f".m.safetensors.vitq-tmp-{os.getpid()}-abc.tmp", b"x")  # a writer still running
    assert main(["export", str(good.run), "--out", str(tmp_path / "m.safetensors")]) == 0
    capsys.readouterr()
    assert not stale.exists() and live.exists()


def test_a_partial_last_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    argv = _quantize(tmp_path, "--recipe", "lsq", "--epochs", "1", "--json")
    assert main(argv) == 0
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 99, "lo')  # a killed writer's half line
    assert main([*argv, "--resume"]) == 0
    assert all(json.loads(line) for line in metrics.read_text().splitlines())
    metrics.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    code = main([*argv, "--resume"])
    _check(code, capsys.readouterr().err, 1, "metrics.jsonl line 2")
