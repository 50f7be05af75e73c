"""A model family and an export format are plugins: both are registered here, from this file alone.

The toy family is a small timm-style model (registered with timm like any timm model) that goes through
prepare -> calibrate -> export (safetensors) -> load with no package file changed; the toy format is a
fake-quant state file that `export`, `load`, `evaluate` and `inspect` handle through the registry.
"""

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import vitqtool
from vitqtool import commands, core
from vitqtool.export.formats import FORMATS, ExportFormat, ExportSource, ExportSummary, LoadedExport, get_format, register_format
from vitqtool.families import FAMILIES, QuantPolicy
from vitqtool.families.base import SegmentedFamily, class_name, quantize_conv, quantize_linear, register_family, require


class ToyBlock(nn.Module):
    """Pre-norm residual MLP block over tokens."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class ToyNet(nn.Module):
    """A timm-style classifier: patch-embedding conv, token MLP blocks, mean pool, linear head."""

    def __init__(self, num_classes: int = 10, dim: int = 16, depth: int = 2, patch: int = 8, img_size: int = 32, **_: object):
        super().__init__()
        self.num_classes, self.num_features = num_classes, dim
        self.pretrained_cfg = {"input_size": (3, img_size, img_size), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                               "crop_pct": 1.0, "interpolation": "bilinear", "num_classes": num_classes}
        self.stem = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.Sequential(*[ToyBlock(dim) for _ in range(depth)])
        self.head = nn.Linear(dim, num_classes)

    def tokens(self, images: Tensor) -> Tensor:
        return self.stem(images).flatten(2).transpose(1, 2)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.blocks(self.tokens(images)).mean(1))


def _toy_net(pretrained: bool = False, **kwargs: object) -> ToyNet:
    """timm entry point of the toy model."""
    return ToyNet(**kwargs)


class ToyFamily(SegmentedFamily):
    """Stem and head at the edge bits; per block fc1 reads a norm's output (signed), fc2 the GELU's (unsigned + offset)."""

    name = "toy"
    patterns = ("toy_*",)

    def check(self, model: nn.Module) -> None:
        for i, block in enumerate(model.blocks):
            require(type(block.act) is nn.GELU, f"blocks.{i}.act", f"activation {type(block.act).__name__}")

    def quantize_(self, model: nn.Module, policy: QuantPolicy) -> nn.Module:
        quantize_conv(model, "stem", policy.weight(edge=True), policy.act(edge=True))
        for block in model.blocks:
            quantize_linear(block, "fc1", policy.weight(), policy.act())
            quantize_linear(block, "fc2", policy.weight(), policy.gelu_out())
        quantize_linear(model, "head", policy.weight(edge=True), policy.act(edge=True))
        return model

    def segments(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]

    def stem(self, model: nn.Module, images: Tensor) -> Tensor:
        return model.tokens(images)

    def tail(self, model: nn.Module, hidden: Tensor) -> Tensor:
        return model.head(hidden.mean(1))


@pytest.fixture
def toy_family():
    """The toy family and its timm entry point, registered for the test and removed afterwards."""
    import timm.models
    from timm.models._registry import _model_entrypoints

    name = "toy_mlp_tiny"
    if name not in _model_entrypoints:
        _toy_net.__name__ = name
        timm.models.register_model(_toy_net)
    key = class_name(ToyNet())
    register_family(key)(ToyFamily)
    yield name
    FAMILIES.pop(key)


def test_a_family_registered_from_a_test_file_goes_through_prepare_calibrate_export_load(tmp_path, toy_family):
    loaded = core.resolve_model(toy_family, random_init=True)
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    recipe = vitqtool.load_recipe("vaq", set_fields={"quant.bits": 4})
    qmodel = core.prepare(loaded.model, recipe)
    with torch.no_grad(), vitqtool.quantizers_disabled(qmodel):
        assert (qmodel(images) - loaded.model(images)).abs().max() <= 1e-5  # FP-exact with quantizers off
    core.calibrate(qmodel, [images])
    kinds = {name: (m.w_quant.spec.bits, m.a_quant.spec.signed, m.a_quant.spec.learned_offset)
             for name, m in qmodel.named_modules() if hasattr(m, "w_quant")}
    assert kinds == {"stem": (8, True, False), "head": (8, True, False), **{
        f"blocks.{i}.{fc}": (4, fc == "fc1", fc == "fc2") for i in range(2) for fc in ("fc1", "fc2")}}
    out = tmp_path / "toy.safetensors"
    written = get_format("safetensors").write(ExportSource(qmodel.eval(), loaded.data_config, recipe, toy_family, {}), out,
                                              verify=True)
    assert written.verify["max_abs_diff"] <= 1e-5 and written.quantized_layers == 6
    with torch.no_grad():
        assert torch.equal(commands.load(out)(images), qmodel(images))


class ToyStateFormat(ExportFormat):
    """A fake-quant state file: the quantized model's own state dict plus what rebuilds it (a `.toyq` file)."""

    name = "toy-state"

    def write(self, source: ExportSource, out: Path, *, dtype: str = "float32", verify: bool = False) -> ExportSummary:
        from vitqtool.fileio import atomic_write, save_safetensors, state_dict_for_safetensors

        meta = {"architecture": source.architecture, "model_args": source.model_args, "recipe": source.recipe.to_dict(),
                "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in source.data_config.items()}}
        atomic_write(out, lambda tmp: save_safetensors(tmp, state_dict_for_safetensors(source.model), {"toy": json.dumps(meta)}))
        checked = None
        if verify:
            images = source.verify_images(8, 8)
            with torch.no_grad():
                checked = {"max_abs_diff": max(float((self.load(out).model(x) - source.model(x)).abs().max()) for x in images)}
        return self.inspect(out).with_verify(checked)

    def recognise(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".toyq"

    def load(self, path: Path) -> LoadedExport:
        from safetensors import safe_open
        from safetensors.torch import load_file

        from vitqtool.recipe import recipe_from_dict

        with safe_open(str(path), "pt") as fh:
            meta = json.loads(fh.metadata()["toy"])
        recipe = recipe_from_dict(meta["recipe"], "toy file")
        model = core.prepare(core.resolve_model(meta["architecture"], random_init=True, model_args=meta["model_args"]).model,
                             recipe, inplace=True)
        core.load_strict(model, load_file(str(path)), str(path))
        for _, q in vitqtool.quant.iter_quantizers(model):
            q.mark_initialized()
        data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["data_config"].items()}
        return LoadedExport(model.eval(), data_config, "quantized", recipe)

    def inspect(self, path: Path, check_digest: bool = True) -> ExportSummary:
        model = self.load(path).model
        n = sum(p.numel() for p in model.parameters())
        return ExportSummary(str(path), self.name, "0.1", "toy", path.stat().st_size, 4 * n,
                             sum(1 for m in model.modules() if hasattr(m, "w_quant")))


@pytest.fixture
def toy_format():
    register_format("toy-state", "a fake-quant state file (test plugin)", ToyStateFormat)
    yield "toy-state"
    FORMATS.pop("toy-state")


def test_a_format_registered_from_a_test_file_is_written_loaded_evaluated_and_inspected(tmp_path, toy_format):
    from conftest import TINY_VIT, write_run_folder

    name, args = TINY_VIT
    loaded = core.resolve_model(name, random_init=True, model_args=args)
    qmodel = core.prepare(loaded.model, "vaq", bits=3)
    core.calibrate(qmodel, [torch.randn(4, 3, 32, 32)])
    run = tmp_path / "run"
    write_run_folder(run, qmodel, vitqtool.load_recipe("vaq", set_fields={"quant.bits": 3}), architecture=name,
                     model_args=args, data_config=loaded.data_config)
    out = tmp_path / "m.toyq"
    summary = commands.export(run, out, format=toy_format, verify=True)
    assert summary.format == toy_format and summary.verify["max_abs_diff"] == 0.0 and summary.quantized_layers > 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(commands.load(out)(x), qmodel.eval()(x))
    assert commands.resolve_any(str(out)).kind == "quantized"
    assert commands.inspect(out).to_dict()["compression_ratio"] == pytest.approx(summary.compression_ratio)
    result = commands.evaluate(str(out), limit=20, batch_size=10)
    assert result["n"] == 20 and result["kind"] == "quantized"
    with pytest.raises(vitqtool.errors.ExportFormatError, match="--dtype float16 is not available for --format toy-state"):
        commands.export(run, tmp_path / "x.toyq", format=toy_format, dtype="float16")
