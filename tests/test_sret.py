"""SReT-T: our implementation against the released code's checkpoint layout and an independent forward, its quantized layout.

The reference here is written from the paper's equations and the released code's module structure (its state-dict
names and shapes), independently of `vitqtool.families.sret_model`: it reads a released-layout state dict by key,
loops over groups and heads explicitly and knows nothing of our block/projection modules.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor

import vitqtool
from vitqtool import commands, core, quant
from vitqtool.errors import ExportFormatError, WeightsError
from vitqtool.families import get_family
from vitqtool.families.sret_model import SReT, token_permutation

NAME = "sret_tiny_patch16_224"
# the released code's constructor arguments (SReT(...)) for a small model that keeps every feature: two shared blocks
# in stage 0 (recursion over 4 applications), shuffled 2-group attention on odd applications, 8/4-group slicing
REF = {"image_size": 64, "base_dims": (8, 8, 8), "heads": (2, 4, 8), "depth": (4, 2, 2), "recursive_num": (2, 1, 1),
       "groups1": (8, 4, 1), "groups2": (2, 1, 1), "mlp_ratio": 3.6, "np_mlp_ratio": 1.0, "num_classes": 10}
# the same model in our arguments
ARGS = {"img_size": 64, "dims": (16, 32, 64), "depths": (4, 2, 2), "num_blocks": (2, 1, 1), "num_heads": (2, 4, 8),
        "groups": (8, 4, 1), "recursive_groups": (2, 1, 1), "mlp_ratio": 3.6, "proj_mlp_ratio": 1.0, "num_classes": 10}
TINY = {"img_size": 32, "dims": (16, 32, 64), "depths": (2, 2, 2), "num_blocks": (1, 1, 1), "num_heads": (1, 2, 4),
        "num_classes": 10}  # groups (8, 4, 1) / (2, 1, 1) of SReT-T: 16, 4 and 1 tokens per stage at 32 px


def reference_state_dict(cfg: dict, seed: int = 0, split_qkv: bool = False) -> dict[str, Tensor]:
    """A random state dict with the released code's names and shapes (`SReT.state_dict()` of `cfg`).

    `split_qkv`: the Quantization-Variation FP variant (`attn.proj_q/k/v` instead of `attn.qkv`). A weight-shared
    block appears once per application, as the same tensors (what `state_dict()` of the released model holds).
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*shape, generator=gen) * scale

    def linear(prefix: str, n_in: int, n_out: int) -> dict[str, Tensor]:
        return {f"{prefix}.weight": rand(n_out, n_in, scale=n_in ** -0.5), f"{prefix}.bias": rand(n_out, scale=0.1)}

    def norm(prefix: str, n: int) -> dict[str, Tensor]:
        return {f"{prefix}.weight": 1 + rand(n, scale=0.2), f"{prefix}.bias": rand(n, scale=0.1)}

    def coefficients(n: int) -> dict[str, Tensor]:
        return {f"coefficient{i}.bias": 0.5 + torch.rand(1, generator=gen) for i in range(1, n + 1)}

    def mlp(prefix: str, dim: int, ratio: float) -> dict[str, Tensor]:
        return {**linear(f"{prefix}.fc1", dim, int(dim * ratio)), **linear(f"{prefix}.fc2", int(dim * ratio), dim)}

    dims = [b * h for b, h in zip(cfg["base_dims"], cfg["heads"])]
    width = cfg["image_size"] // 8
    sd = {"pos_embed": rand(1, dims[0], width, width, scale=0.5)}
    for i, (cin, cout) in enumerate([(3, dims[0] // 2), (dims[0] // 2, dims[0]), (dims[0], dims[0])], 1):
        sd.update({f"patch_embed.conv{i}.weight": rand(cout, cin, 3, 3, scale=(9 * cin) ** -0.5),
                   f"patch_embed.conv{i}.bias": rand(cout, scale=0.1), **norm(f"patch_embed.bn{i}", cout),
                   f"patch_embed.bn{i}.running_mean": rand(cout, scale=0.1),
                   f"patch_embed.bn{i}.running_var": 0.5 + torch.rand(cout, generator=gen),
                   f"patch_embed.bn{i}.num_batches_tracked": torch.tensor(7)})
    for s, dim in enumerate(dims):
        loops = cfg["depth"][s] // cfg["recursive_num"][s]
        shared = []
        for _ in range(cfg["recursive_num"][s]):
            qkv = ({k: v for p in "qkv" for k, v in linear(f"attn.proj_{p}", dim, dim).items()} if split_qkv
                   else linear("attn.qkv", dim, 3 * dim))
            shared.append({**norm("norm1", dim), **qkv, **linear("attn.proj", dim, dim), **norm("norm2", dim),
                           **mlp("mlp", dim, cfg["mlp_ratio"]), **coefficients(4)})
        for k in range(cfg["depth"][s]):  # Transformer.blocks = [block r, projection k] for r, then its loops
            for key, value in shared[k // loops].items():
                sd[f"transformers.{s}.blocks.{2 * k}.{key}"] = value
            proj = {**norm("norm1", dim), **mlp("mlp", dim, cfg["np_mlp_ratio"]), **coefficients(2)}
            sd.update({f"transformers.{s}.blocks.{2 * k + 1}.{key}": v for key, v in proj.items()})
        if s:
            sd.update({f"pools.{s - 1}.conv.weight": rand(dim, 1, 3, 3, scale=1 / 3), f"pools.{s - 1}.conv.bias": rand(dim, scale=0.1)})
    sd.update({**norm("norm", dims[-1]), **linear("head", dims[-1], cfg["num_classes"])})
    return sd


def reference_forward(sd: dict[str, Tensor], cfg: dict, x: Tensor, permutation, training: bool = False) -> Tensor:
    """The released architecture from the paper's equations, on a released-layout state dict.

    Stage s runs its `transformers.s.blocks.i` in order: even i is a transformer block (odd i//2: the recursive
    application, `groups2` groups of shuffled tokens), odd i a non-linear projection layer; every residual is
    `c_a * x + c_b * f(x)`. `permutation(n)` gives the token permutation of a shuffled application.
    """
    def lin(t: Tensor, p: str) -> Tensor:
        if f"{p}.weight" not in sd:  # split projections
            return torch.cat([lin(t, p.replace("qkv", f"proj_{c}")) for c in "qkv"], dim=-1)
        return t @ sd[f"{p}.weight"].T + sd[f"{p}.bias"]

    def ln(t: Tensor, p: str) -> Tensor:
        mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-6) * sd[f"{p}.weight"] + sd[f"{p}.bias"]

    def mlp(t: Tensor, p: str) -> Tensor:
        h = lin(t, f"{p}.fc1")
        return lin(0.5 * h * (1 + torch.erf(h / math.sqrt(2))), f"{p}.fc2")

    def attention(t: Tensor, p: str, heads: int, groups: int) -> Tensor:
        b, n, c = t.shape
        d, size = c // heads, n // groups
        qkv = lin(t, f"{p}.qkv")
        out = torch.zeros(b, n, c)
        for g in range(groups):
            rows = slice(g * size, (g + 1) * size)
            for h in range(heads):
                q, k, v = (qkv[:, rows, j * c + h * d: j * c + (h + 1) * d] for j in range(3))
                out[:, rows, h * d:(h + 1) * d] = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), -1) @ v
        return out

    for i in (1, 2, 3):
        p = f"patch_embed.bn{i}"
        x = F.conv2d(x, sd[f"patch_embed.conv{i}.weight"], sd[f"patch_embed.conv{i}.bias"], stride=2, padding=1)
        x = F.relu(F.batch_norm(x, sd[f"{p}.running_mean"].clone(), sd[f"{p}.running_var"].clone(), sd[f"{p}.weight"],
                                sd[f"{p}.bias"], training=training, eps=1e-5))
    x = x + sd["pos_embed"]
    for s in range(len(cfg["depth"])):
        if s:
            x = F.conv2d(x, sd[f"pools.{s - 1}.conv.weight"], sd[f"pools.{s - 1}.conv.bias"], stride=2, padding=1, groups=x.shape[1])
        b, c, hh, ww = x.shape
        t = x.flatten(2).transpose(1, 2)
        for i in range(2 * cfg["depth"][s]):
            p = f"transformers.{s}.blocks.{i}"
            coef = [sd[f"{p}.coefficient{j}.bias"] for j in range(1, 5 if i % 2 == 0 else 3)]
            if i % 2:
                t = coef[0] * t + coef[1] * mlp(ln(t, f"{p}.norm1"), f"{p}.mlp")
                continue
            recursive = (i + 2) % 4 == 0  # the released code's mark of a recursive application
            groups = cfg["groups2"][s] if recursive else cfg["groups1"][s]
            h = ln(t, f"{p}.norm1")
            perm = permutation(h.shape[1]) if recursive and groups != 1 else None
            a = attention(h if perm is None else h[:, perm], f"{p}.attn", cfg["heads"][s], groups)
            a = lin(a if perm is None else a[:, torch.argsort(perm)], f"{p}.attn.proj")
            t = coef[0] * t + coef[1] * a
            t = coef[2] * t + coef[3] * mlp(ln(t, f"{p}.norm2"), f"{p}.mlp")
        x = t.transpose(1, 2).reshape(b, c, hh, ww)
    return lin(ln(x.mean((2, 3)), "norm"), "head")


def _images(n: int, size: int, seed: int = 1) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _save(sd: dict[str, Tensor], path) -> None:
    torch.save({"model": sd, "epoch": torch.tensor(299)}, path)  # the released checkpoints wrap the state dict in "model"


def test_sret_t_builds_from_timm_with_the_published_size() -> None:
    assert NAME in timm.list_models("sret*")
    model = timm.create_model(NAME)
    assert isinstance(model, SReT) and get_family(model).name == "sret"
    # the published SReT-T has 4.8M parameters; ours counts each shared block once, as the released layout's unique tensors
    reference = reference_state_dict({"image_size": 224, "base_dims": (32, 32, 32), "heads": (2, 4, 8), "depth": (4, 10, 6),
                                      "recursive_num": (2, 5, 3), "groups1": (8, 4, 1), "groups2": (2, 1, 1),
                                      "mlp_ratio": 3.6, "np_mlp_ratio": 1.0, "num_classes": 1000})
    unique = {id(v): v for k, v in reference.items() if "running" not in k and "num_batches" not in k}
    params = sum(p.numel() for p in model.parameters())
    assert params == sum(v.numel() for v in unique.values()) and round(params / 1e6, 1) == 4.8
    assert model.pretrained_cfg["crop_pct"] == 0.875 and model.pretrained_cfg["input_size"] == (3, 224, 224)
    with pytest.raises(vitqtool.errors.ModelError, match="cannot be sliced into 8 and 2 groups"):
        core.resolve_model(NAME, random_init=True, model_args={**TINY, "img_size": 24})


@pytest.mark.parametrize("split_qkv", [False, True], ids=["released", "quantization-variation-fp"])
def test_released_checkpoint_layout_loads_and_computes_the_reference_forward(tmp_path, split_qkv: bool) -> None:
    sd = reference_state_dict(REF, split_qkv=split_qkv)
    _save(sd, tmp_path / "SReT_T.pth")
    model = core.resolve_model(NAME, weights=tmp_path / "SReT_T.pth", model_args=ARGS).model
    x = _images(3, 64)
    with torch.no_grad():
        ours = model.eval()(x)
        expected = reference_forward(sd, REF, x, lambda n: token_permutation(n, False, x.device))
        assert (ours - expected).abs().max() <= 1e-5 and expected.std() > 0.1
        assert torch.equal(model(x), ours)  # eval is deterministic
        # training: the permutations come from torch's global RNG exactly where the released code draws them
        model.train()
        torch.manual_seed(5)
        ours = model(x)
        torch.manual_seed(5)
        expected = reference_forward(sd, REF, x, lambda n: torch.randperm(n), training=True)
        assert (ours - expected).abs().max() <= 1e-5
        torch.manual_seed(6)
        assert (model(x) - ours).abs().max() > 1e-3  # the shuffle is real: another draw, other logits


def test_timm_pretrained_file_hook_converts_the_released_layout(tmp_path) -> None:
    sd = reference_state_dict(REF)
    _save(sd, tmp_path / "SReT_T.pth")
    model = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay={"file": str(tmp_path / "SReT_T.pth"), "num_classes": 10}, **ARGS)
    x = _images(2, 64)
    with torch.no_grad():
        expected = reference_forward(sd, REF, x, lambda n: token_permutation(n, False, x.device))
        assert (model.eval()(x) - expected).abs().max() <= 1e-5


def test_damaged_released_checkpoints_are_refused_by_name(tmp_path) -> None:
    sd = reference_state_dict(REF)
    bad = dict(sd, **{"transformers.0.blocks.2.attn.qkv.weight": sd["transformers.0.blocks.0.attn.qkv.weight"] + 1})
    _save(bad, tmp_path / "differ.pth")
    with pytest.raises(WeightsError, match=r"'transformers\.0\.blocks\.0\.attn\.qkv\.weight' and 'transformers\.0\.blocks\.2\."
                                           r"attn\.qkv\.weight' hold different weights"):
        core.resolve_model(NAME, weights=tmp_path / "differ.pth", model_args=ARGS)
    _save({k: v for k, v in sd.items() if not k.startswith("transformers.1.blocks.3.")}, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match=r"missing keys \[stages\.1\.blocks\.0\.projs\.1\.alpha, "):
        core.resolve_model(NAME, weights=tmp_path / "missing.pth", model_args=ARGS)
    _save({**sd, "transformers.1.blocks.4.norm1.weight": sd["norm.weight"][:32]}, tmp_path / "deeper.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys \[stages\.1\.blocks\.1\.norm1\.weight\]"):
        core.resolve_model(NAME, weights=tmp_path / "deeper.pth", model_args=ARGS)
    split = reference_state_dict(REF, split_qkv=True)
    _save({k: v for k, v in split.items() if "proj_k" not in k}, tmp_path / "nok.pth")
    with pytest.raises(WeightsError, match=r"split attention projections of 'stages\.0\.blocks\.0\.attn\.qkv\.weight' lack \['k'\]"):
        core.resolve_model(NAME, weights=tmp_path / "nok.pth", model_args=ARGS)


@pytest.mark.parametrize("recipe,per_channel", [("vaq", False), ("vaq", True), ("lsq", False)])
def test_prepare_is_fp_exact_and_follows_the_placement(recipe: str, per_channel: bool) -> None:
    model = core.resolve_model(NAME, random_init=True, model_args=ARGS).model
    x = _images(4, 64)
    q = core.prepare(model, vitqtool.load_recipe(recipe, set_fields={"quant.bits": 4, "quant.per_channel": per_channel}))
    with torch.no_grad(), quant.quantizers_disabled(q):
        assert (q(x) - model(x)).abs().max() <= 1e-5
    layers = {n: m for n, m in q.named_modules() if isinstance(m, quant.QUANT_LAYERS)}
    edge = {n for n, m in layers.items() if m.w_quant.spec.bits == 8}
    assert edge == {"stem.conv1", "stem.conv2", "stem.conv3", "stages.1.downsample.conv", "stages.2.downsample.conv", "head"}
    assert [layers[f"stem.conv{i}"].a_quant.spec.signed for i in (1, 2, 3)] == [True, False, False]  # image, then ReLU outputs
    assert all(layers[n].a_quant.spec.bits == 8 and layers[n].a_quant.spec.signed for n in edge if "downsample" in n or n == "head")
    block = q.stages[0].blocks[1]
    assert isinstance(block.attn, quant.QuantAttention) and block.attn.split == (recipe == "vaq")
    assert block.mlp.fc1.w_quant.spec.per_channel == per_channel
    assert block.projs[1].mlp.fc2.a_quant.spec.learned_offset and block.projs[1].mlp.fc1.a_quant.spec.signed
    # one quantized layer per weight: the recursion reuses the block's quantizers, no copies
    split = 6 if recipe == "vaq" else 4  # q, k, v, proj, fc1, fc2 (lsq: one fused qkv)
    assert len(layers) == 3 + 2 + 1 + sum(split + 2 * len(b.projs) for s in q.stages for b in s.blocks)


def test_shared_quantizers_calibrate_on_every_application() -> None:
    model = core.resolve_model(NAME, random_init=True, model_args=ARGS).model
    q = core.prepare(model, "vaq", bits=4)
    x = _images(4, 64)
    seen: list[Tensor] = []
    hook = q.stages[0].blocks[0].attn.softmax_quant.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().mean()))
    stats = core.calibrate(q, [x])
    hook.remove()
    assert len(seen) == 2  # 8 groups of 8 tokens, then 2 shuffled groups of 32: softmax outputs of different size
    assert stats["stages.0.blocks.0.attn.softmax_quant"] == pytest.approx(float(sum(seen)) / 2, rel=1e-6)


def test_fast_sensitivity_segments_rebuild_the_logits() -> None:
    q = core.prepare(core.resolve_model(NAME, random_init=True, model_args=ARGS).model, "vaq", bits=4).eval()
    core.calibrate(q, [_images(4, 64)])
    family = get_family(q)
    names = family.block_names(q)
    assert names == ["stages.0.blocks.0", "stages.0.blocks.1", "stages.1.downsample", "stages.1.blocks.0",
                     "stages.2.downsample", "stages.2.blocks.0"]
    x = _images(2, 64, seed=3)
    with torch.no_grad():
        full = q(x)
        hidden = family.block_inputs(q, x)
        for i in range(len(names) + 1):
            assert torch.equal(family.run_from(q, i, hidden[i]), full)


def test_qat_export_and_bit_exact_reload(tmp_path) -> None:
    info = commands.quantize(NAME, bits=2, recipe="vaq", out=tmp_path / "run", random_init=True, model_args=TINY, epochs=1,
                             batch_size=16, limit_train=32, limit_val=20)
    assert info.status == "done" and info.epochs_done == 1
    summary = commands.export(tmp_path / "run", tmp_path / "sret.safetensors", verify=True)
    assert summary.verify["max_abs_diff"] == 0.0 and summary.quantized_layers == 3 + 2 + 1 + 3 * (6 + 2 * 2)
    run_model = core.load_run_model(tmp_path / "run")
    reloaded = commands.load(tmp_path / "sret.safetensors")
    x = _images(4, 32)
    with torch.no_grad():
        assert torch.equal(reloaded(x), commands.load(tmp_path / "sret.safetensors")(x))
        assert torch.equal(reloaded(x), run_model.model(x))
    # the compressed-tensors view loads strictly into the stock (FP) SReT
    view = commands.export(tmp_path / "run", tmp_path / "view.safetensors", format="compressed-tensors", verify=True)
    assert view.verify["max_abs_diff"] <= 1e-4
    from vitqtool.export import source_state_dict

    stock = core.resolve_model(NAME, random_init=True, model_args=TINY).model
    stock.load_state_dict(source_state_dict(tmp_path / "view.safetensors"), strict=True)
    with pytest.raises(ExportFormatError, match="not loaded from a transformers checkpoint"):
        commands.export(tmp_path / "run", tmp_path / "hf", format="hf")
