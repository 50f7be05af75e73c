"""MODEL spec resolution, strict weight loading, weight files and the timm hub folder round trip."""

import json
import time

import pytest
import torch

from vitqtool.core.models import (
    LoadedModel,
    load_model,
    load_state_dict_file,
    load_strict,
    resolve_model,
    resolve_timm_name,
    save_model_folder,
)
from vitqtool.errors import ModelError, WeightsError

ARCH = "deit_tiny_patch16_224"
TINY_ARGS = {"img_size": 32, "patch_size": 4, "depth": 2}  # depth 2 keeps each build well under a second
TINY_SWIN_ARGS = {"img_size": 32, "patch_size": 2, "window_size": 4, "depths": (1, 1, 1, 1), "embed_dim": 32,
                  "num_heads": (1, 1, 1, 1)}


class NotATensor:
    """A pickled Python object that weights_only loading must refuse."""

    def __init__(self) -> None:
        self.payload = 1


def _tiny(num_classes: int = 10) -> LoadedModel:
    return resolve_model(ARCH, random_init=True, num_classes=num_classes, model_args=TINY_ARGS)


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return _tiny()


@pytest.fixture(scope="module")
def target() -> torch.nn.Module:
    """A second tiny model; failed strict loads leave it untouched, so tests can share it."""
    return _tiny().model


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """Offline hub with an empty cache, whatever this machine has cached."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def _logits(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x)


# --------------------------------------------------------------------------- spec resolution


def test_random_init_tiny_model_and_data_config(tiny):
    assert not tiny.model.training
    assert tiny.architecture == ARCH
    assert tiny.model_args == {**TINY_ARGS, "num_classes": 10}
    assert tiny.source == ARCH
    cfg = tiny.data_config
    assert tuple(cfg["input_size"]) == (3, 32, 32)
    assert cfg["num_classes"] == 10
    for key in ("mean", "std", "crop_pct", "interpolation", "crop_mode"):
        assert key in cfg
    assert _logits(tiny.model).shape == (2, 10)


def test_alias_resolves_when_unambiguous():
    assert resolve_timm_name("swin_tiny") == "swin_tiny_patch4_window7_224"
    loaded = resolve_model("swin_tiny", random_init=True, num_classes=10, model_args=TINY_SWIN_ARGS)
    assert loaded.architecture == "swin_tiny_patch4_window7_224"
    assert tuple(loaded.data_config["input_size"]) == (3, 32, 32)


def test_exact_name_and_tag_pass_through():
    assert resolve_timm_name(ARCH) == ARCH
    assert resolve_timm_name(f"{ARCH}.fb_in1k") == f"{ARCH}.fb_in1k"


@pytest.mark.parametrize("spec,expected", [
    ("deit_tiny", ["ambiguous", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"]),  # alias: lists candidates
    ("deit_tiny_patch16_22", ["unknown model 'deit_tiny_patch16_22'", "did you mean", "deit_tiny_patch16_224"]),
])
def test_ambiguous_alias_and_unknown_name_are_one_line_with_candidates(spec, expected):
    with pytest.raises(ModelError) as err:
        resolve_model(spec, random_init=True)
    msg = str(err.value)
    assert all(part in msg for part in expected)
    assert "\n" not in msg


def test_missing_path_is_model_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))


def test_offline_pretrained_is_one_line_and_fast(empty_hub_cache):
    start = time.perf_counter()
    with pytest.raises(WeightsError) as err:
        resolve_model(ARCH)
    elapsed = time.perf_counter() - start
    msg = str(err.value)
    assert elapsed < 5.0
    assert "\n" not in msg
    assert "not in the local Hugging Face cache" in msg and "offline" in msg
    assert "--weights" in msg and "--random-init" in msg


def test_offline_hf_hub_spec_is_one_line(empty_hub_cache):
    with pytest.raises(WeightsError) as err:
        resolve_model("hf-hub:timm/deit_tiny_patch16_224.fb_in1k")
    assert "\n" not in str(err.value)
    assert "offline" in str(err.value)


def test_pretrained_with_other_num_classes_is_refused(empty_hub_cache):
    # timm would drop the head and load non-strictly; we refuse before touching the hub.
    with pytest.raises(ModelError, match="1000 classes"):
        resolve_model(ARCH, num_classes=10)


def test_weights_and_random_init_exclude_each_other(tmp_path):
    with pytest.raises(ModelError, match="exclude"):
        resolve_model(ARCH, weights=tmp_path / "w.safetensors", random_init=True)


def test_bad_model_args_is_model_error():
    with pytest.raises(ModelError, match="cannot build"):
        resolve_model(ARCH, random_init=True, model_args={"img_size": 32, "no_such_arg": 3})


# --------------------------------------------------------------------------- weights files


def test_safetensors_weights_round_trip(tiny, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    model, cfg = load_model(ARCH, weights=path, num_classes=10, model_args=TINY_ARGS)
    assert torch.equal(_logits(model), _logits(tiny.model))
    assert tuple(cfg["input_size"]) == (3, 32, 32)


@pytest.mark.parametrize("wrapper", ["plain", "model", "state_dict", "ddp"])
def test_pth_weights_and_wrappers(tiny, tmp_path, wrapper):
    sd = tiny.model.state_dict()
    obj = {
        "plain": sd,
        "model": {"model": sd, "epoch": 3},
        "state_dict": {"state_dict": sd},
        "ddp": {f"module.{k}": v for k, v in sd.items()},
    }[wrapper]
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    loaded = load_state_dict_file(path)
    assert set(loaded) == set(sd)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    if wrapper == "model":  # one full load through the MODEL + --weights path
        model, _ = load_model(ARCH, weights=path, num_classes=10, model_args=TINY_ARGS)
        assert torch.equal(_logits(model), _logits(tiny.model))


def test_pth_with_pickled_object_is_refused(tiny, tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny.model.state_dict(), "args": NotATensor()}, path)
    with pytest.raises(WeightsError) as err:
        load_state_dict_file(path)
    assert str(path) in str(err.value)
    assert "weights_only" in str(err.value)


def test_non_tensor_entries_are_refused(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(1), "b": 3}, path)
    with pytest.raises(WeightsError, match="non-tensor"):
        load_state_dict_file(path)


def test_corrupt_safetensors_names_the_file(tiny, tmp_path):
    from safetensors.torch import save_file

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all")
    truncated = tmp_path / "truncated.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    for path in (garbage, truncated):
        with pytest.raises(WeightsError) as err:
            load_state_dict_file(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_state_dict_file(tmp_path / "missing.safetensors")
    odd = tmp_path / "w.npz"
    odd.write_bytes(b"x")
    with pytest.raises(WeightsError, match="unsupported extension"):
        load_state_dict_file(odd)


# --------------------------------------------------------------------------- strict loading


def test_strict_load_names_missing_and_unexpected_keys(tiny, target):
    model = target
    sd = dict(tiny.model.state_dict())
    sd.pop("blocks.0.norm1.weight")
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(WeightsError) as err:
        load_strict(model, sd, "weights file 'w.pth'")
    msg = str(err.value)
    assert "weights file 'w.pth'" in msg
    assert "missing keys [blocks.0.norm1.weight]" in msg
    assert "unexpected keys [blocks.0.extra.weight]" in msg


def test_strict_load_truncates_long_key_lists(tiny, target):
    model = target
    sd = {k: v for k, v in tiny.model.state_dict().items() if not k.startswith("blocks.")}
    with pytest.raises(WeightsError) as err:
        load_strict(model, sd, "w")
    msg = str(err.value)
    n_missing = sum(k.startswith("blocks.") for k in tiny.model.state_dict())
    assert f"{n_missing} in all" in msg
    assert "\n" not in msg


def test_shape_mismatch_names_key_and_hints_num_classes(tiny, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "ten.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    with pytest.raises(WeightsError) as err:
        resolve_model(ARCH, weights=path, num_classes=100, model_args=TINY_ARGS)
    msg = str(err.value)
    assert "head.weight (10, 192) vs model (100, 192)" in msg
    assert "--num-classes 10" in msg


def test_load_strict_success_copies_values(tiny):
    model = _tiny().model
    load_strict(model, tiny.model.state_dict(), "w")
    assert torch.equal(_logits(model), _logits(tiny.model))


# --------------------------------------------------------------------------- timm hub folders


def test_save_model_folder_round_trip(tiny, tmp_path):
    folder = save_model_folder(tiny.model, tmp_path / "fp", tiny.architecture, tiny.model_args)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == ARCH
    assert config["num_classes"] == 10
    assert config["model_args"] == TINY_ARGS
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert "hf_hub_id" not in config["pretrained_cfg"]

    loaded = resolve_model(str(folder))
    assert loaded.architecture == ARCH
    assert loaded.model_args == {**TINY_ARGS, "num_classes": 10}
    assert loaded.data_config == tiny.data_config
    assert torch.equal(_logits(loaded.model), _logits(tiny.model))

    # the weights file inside a folder is a spec too; so is an explicit --weights override
    by_file = resolve_model(str(folder / "model.safetensors"))
    assert torch.equal(_logits(by_file.model), _logits(tiny.model))


def test_folder_without_weights_or_config(tiny, tmp_path):
    folder = save_model_folder(tiny.model, tmp_path / "fp", tiny.architecture, tiny.model_args)
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no weights"):
        resolve_model(str(folder))
    assert resolve_model(str(folder), random_init=True).data_config["num_classes"] == 10
    (folder / "config.json").unlink()
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(str(folder))


def test_lone_weights_file_as_model_is_model_error(tiny, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(tiny.model.state_dict(), path)
    with pytest.raises(ModelError, match="--weights"):
        resolve_model(str(path))


def test_folder_with_wrong_num_classes_override_fails_strictly(tiny, tmp_path):
    folder = save_model_folder(tiny.model, tmp_path / "fp", tiny.architecture, tiny.model_args)
    with pytest.raises(WeightsError, match="head.weight"):
        resolve_model(str(folder), num_classes=5)
