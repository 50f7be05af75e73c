"""Recipes: built-ins parse, overrides merge, unknown keys and bad values are named, TOML round trip."""

import tomllib

import pytest

from vitqtool.errors import RecipeError
from vitqtool.recipe import builtin_recipes, load_recipe, recipe_from_dict


def test_builtins_parse_with_method_hyperparameters():
    assert {"vaq", "lsq", "ptq"} <= set(builtin_recipes())
    vaq = load_recipe("vaq")
    assert vaq.quant.split_qkv and vaq.obr.enabled and vaq.kd.mode == "auto" and vaq.kd.crops_per_image == 4
    assert (vaq.train.lr, vaq.train.weight_decay, vaq.train.epochs) == (5e-4, 1e-4, 150)
    assert (vaq.obr.start_fraction, vaq.obr.max_lambda) == (0.25, 0.01)
    lsq = load_recipe("lsq")
    assert not lsq.quant.split_qkv and not lsq.obr.enabled and lsq.kd.mode == "none"
    assert not load_recipe("ptq").train.enabled


def test_flags_and_override_files_merge_in_order(tmp_path):
    extra = tmp_path / "o.toml"
    extra.write_text('[quant]\nbits = 3\n[quant.overrides]\n"blocks.*.attn.v" = { weight_bits = 8 }\n[train]\nepochs = 2\n')
    r = load_recipe("vaq", override_files=[extra], set_fields={"train.epochs": 5, "train.lr": None})
    assert r.quant.bits == 3 and r.train.epochs == 5 and r.train.lr == 5e-4
    assert r.quant.overrides == {"blocks.*.attn.v": {"weight_bits": 8}}
    assert r.quant.split_qkv  # untouched fields keep the base recipe's value


def test_resolved_recipe_round_trips_through_toml():
    r = load_recipe("vaq", set_fields={"quant.bits": 2, "quant.overrides": {"head": {"weight_bits": 8, "act_bits": 8}}})
    assert recipe_from_dict(tomllib.loads(r.to_toml())) == r


@pytest.mark.parametrize("text,match", [
    ("[quant]\nbitz = 2\n", r"unknown key\(s\) in \[quant\]: bitz"),
    ("[trainer]\nepochs = 2\n", r"unknown section \[trainer\]"),
    ("[quant]\nbits = 9\n", "quant.bits must be between 2 and 8"),
    ("[quant]\nbits = 'two'\n", "quant.bits must be an integer"),
    ("[kd]\nmode = 'offline'\n", "kd.mode must be one of"),
    ('[quant.overrides]\n"x" = { weight_bits = 1 }\n', "from 2 to 8"),
    ("[quant\n", "not valid TOML"),
])
def test_bad_recipe_files_name_the_problem(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=match):
        load_recipe(path)


def test_unknown_recipe_name_lists_builtins():
    with pytest.raises(RecipeError, match="built-in recipes: lsq, ptq, ptq-recon, vaq"):
        load_recipe("vqa")
