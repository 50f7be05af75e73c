"""Every file vitqtool writes is created like `open()` would create it: 0644 under umask 022, not mkstemp's 0600."""

import os
import stat

import pytest
import timm
import torch

from tests.conftest import TINY_VIT, write_run_folder
from vitqtool import commands, core
from vitqtool.core.models import resolve_model, save_model_folder
from vitqtool.export import export_model
from vitqtool.recipe import load_recipe


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _modes(folder) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}


def test_models_runs_exports_reports_and_labels_are_0644(tmp_path, umask_022):
    name, args = TINY_VIT
    model = timm.create_model(name, pretrained=False, **args).eval()
    save_model_folder(model, tmp_path / "fp", name, args)
    loaded = resolve_model(str(tmp_path / "fp"))
    recipe = load_recipe("ptq", set_fields={"quant.bits": 4})
    qmodel = core.prepare(loaded.model, recipe)
    core.calibrate(qmodel, [torch.randn(4, 3, 32, 32)])
    export_model(qmodel, tmp_path / "export" / "m.safetensors", architecture=name, model_args=args,
                 data_config=loaded.data_config, recipe=recipe)
    write_run_folder(tmp_path / "run", qmodel, recipe, architecture=name, model_args=args, data_config=loaded.data_config)
    commands.analyze(str(tmp_path / "fp"), bits=4, batches=1, batch_size=8, out=tmp_path / "report", plots=False)
    commands.softlabels(str(tmp_path / "fp"), tmp_path / "labels", crops=2, topk=2, limit=4)
    modes = _modes(tmp_path)
    files = {k: v for k, v in modes.items() if (tmp_path / k).is_file()}
    folders = {k: v for k, v in modes.items() if (tmp_path / k).is_dir()}
    for expected in ("fp/config.json", "fp/model.safetensors", "export/m.safetensors", "run/run.json",
                     "run/recipe.resolved.toml", "run/checkpoints/index.json", "report/analysis.json", "labels/manifest.json"):
        assert expected in files
    assert {k: oct(v) for k, v in files.items() if v != 0o644} == {}
    assert {k: oct(v) for k, v in folders.items() if v != 0o755} == {}
    assert not [k for k in modes if ".vitq-tmp" in k or k.endswith(".tmp")]  # no temporary file left behind
