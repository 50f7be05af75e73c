"""`vitqtool demo --quick`: the whole pipeline runs offline, reports sane numbers, exports reload, FP is cached."""

import json
from dataclasses import FrozenInstanceError, replace

import pytest
import torch
from typer.testing import CliRunner

import vitqtool
from vitqtool.cli import app
from vitqtool.demo import DEMO, QUICK, DemoConfig, demo

runner = CliRunner()


def run_demo(out):
    result = runner.invoke(app, ["demo", "--quick", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_demo_config_is_one_frozen_constant():
    assert isinstance(DEMO, DemoConfig) and DEMO.data == "builtin:mnist5k" and not DEMO.hflip
    assert DEMO.model_args["num_classes"] == 10 and len(DEMO.qat_bits) == len(DEMO.qat_epochs)
    with pytest.raises(FrozenInstanceError):
        DEMO.fp_epochs = 1  # type: ignore[misc]
    assert QUICK.architecture == DEMO.architecture and QUICK.fp_settings() != DEMO.fp_settings()
    assert "hflip = false" in DEMO.overrides_toml()


def test_demo_quick_end_to_end_then_reuses_the_fp_model(tmp_path):
    out = tmp_path / "demo"
    doc = run_demo(out)
    assert doc["quick"] is True and doc["fp_cached"] is False
    models = {m["model"]: m for m in doc["models"]}
    assert list(models) == ["FP", "W4A4", "W2A2"]
    for m in models.values():
        assert 0 <= m["top1"] <= 100 and m["n"] == 1000
    assert models["FP"]["top1"] > 30  # every class is trained on even in --quick (measured 46.8; chance: 10%)
    for name, bits in (("W4A4", 4), ("W2A2", 2)):
        path = out / f"w{bits}.safetensors"
        assert models[name]["file"] == str(path) and path.is_file()
        assert models[name]["bytes"] == path.stat().st_size < models["FP"]["bytes"]
        assert models[name]["verify_max_abs_diff"] <= 1e-5
        net = vitqtool.load(path)
        with torch.no_grad():
            assert net(torch.zeros(2, 3, 28, 28)).shape == (2, 10)
    steps = {s["step"]: s for s in doc["steps"]}
    assert {"train FP model", "analyze", "soft labels", "quantize W4A4", "quantize W2A2", "evaluate", "export --verify"} == set(steps)
    assert all(s["seconds"] >= 0 for s in doc["steps"])
    assert (out / "report" / "index.html").is_file() and (out / "labels" / "manifest.json").is_file()

    # Same FP settings: the FP model is reused, not retrained. Only the FP model matters here, so the rest of the
    # second run is cut to the bone (no QAT, one crop); the first run above checked the full --quick pipeline.
    fp_only = replace(QUICK, qat_bits=(), qat_epochs=(), label_crops=1)
    assert fp_only.fp_settings() == QUICK.fp_settings()
    again = demo(out, config=fp_only)
    assert again["fp_cached"] is True and again["steps"][0]["cached"] is True
    assert again["models"][0]["top1"] == models["FP"]["top1"]
