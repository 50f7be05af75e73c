"""SReT, the Sliced Recursive Transformer (Shen, Liu, Xing, ECCV 2022): our implementation, registered with timm.

timm has no SReT; importing `vitqtool.families` registers `sret_tiny_patch16_224` (the paper's SReT-T) so that
`timm.create_model` builds it. Facts from the paper (arXiv 2111.05297) and the authors' released code
(github.com/szq0214/SReT, `SReT.py`), read for the architecture, not copied:
- stem: three 3x3 stride-2 convolutions (in -> C/2 -> C -> C), each followed by BatchNorm and ReLU (1/8 of the
  image); a learned position table (1, C, H/8, W/8) is added to the feature map;
- stages; stage s > 0 starts with a pooling convolution (3x3, stride 2, one group per input channel, channel
  multiplier C_s / C_{s-1}). A stage of `depth` layers has `num_blocks` weight-shared transformer blocks; block r
  is applied L = depth / num_blocks times in a row, and every application is followed by its own non-linear
  projection layer (LayerNorm + MLP of ratio `proj_mlp_ratio`);
- every residual is a learnable mix: x = a * x + b * f(x), scalars initialised to 1 (the shared block's four are
  shared by its applications, like its weights);
- sliced group self-attention: the tokens (raster order) are cut into G contiguous groups and attend within
  their group. The k-th application of a stage (k = r * L + l) uses `groups` when k is even and
  `recursive_groups` when k is odd (for L = 2: the second application of every block); when that odd-k count is
  above 1 the tokens are permuted before slicing and restored after, so groups mix across recursions;
- head: global average pool, LayerNorm, Linear.

The one deliberate difference: the released code draws a new random permutation in eval as well; here eval
uses one fixed permutation (a seeded draw of the same distribution), so inference, exports and their checks
are deterministic. Training draws from torch's global RNG exactly where the released code does.

Checkpoints of the released code (`transformers.{s}.blocks.{i}`: even i a transformer block, each weight-shared
block stored once per application; odd i a projection layer) and of the Quantization-Variation repository's
FP models (the same with `attn.proj_q/k/v` instead of `attn.qkv`) load through `convert_reference_state_dict`.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Mapping, Sequence

import torch
from timm.layers import Attention, DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

from ..errors import WeightsError

EVAL_PERMUTATION_SEED = 0  # eval: the one token permutation of the recursive group attention


def token_permutation(n: int, training: bool, device: torch.device) -> Tensor:
    """Training: a fresh permutation from torch's global RNG (as the released code); eval: a fixed seeded one.

    The eval permutation is drawn by Python's `random` (seeded), not by a torch Generator in the forward: a trace
    (the ONNX export) then records it as a constant index tensor, and it is the same on every torch version.
    """
    if training:
        return torch.randperm(n).to(device)
    return torch.tensor(_eval_permutation(n), dtype=torch.long, device=device)


@functools.cache
def _eval_permutation(n: int) -> tuple[int, ...]:
    """The fixed eval permutation of `n` tokens."""
    return tuple(random.Random(EVAL_PERMUTATION_SEED).sample(range(n), n))


class SReTStem(nn.Module):
    """Three 3x3 stride-2 convolutions (in -> dim/2 -> dim -> dim), each with BatchNorm and ReLU: 1/8 resolution."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(in_chans, dim // 2, 3, 2, 1), nn.BatchNorm2d(dim // 2), nn.ReLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(dim // 2, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.ReLU()
        self.conv3, self.bn3, self.act3 = nn.Conv2d(dim, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.act3(self.bn3(self.conv3(x)))


class SReTPooling(nn.Module):
    """Downsampling between stages: 3x3 stride-2 convolution, one group per input channel (NHWC in and out)."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_dim, dim, 3, stride=2, padding=1, groups=in_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class SReTProjection(nn.Module):
    """The non-linear projection layer after every block application: x = alpha * x + beta * MLP(LN(x))."""

    def __init__(self, dim: int, mlp_ratio: float, drop: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.alpha = nn.Parameter(torch.ones(1))
        self.beta = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.alpha * x + self.beta * self.mlp(self.norm(x))


class SReTBlock(nn.Module):
    """One weight-shared transformer layer applied `applications` times, each application followed by its own projection layer.

    Application l is the stage's k-th (k = first_index + l): odd k attends in `recursive_groups` shuffled groups,
    even k in `groups` contiguous groups (the released code's rule).
    """

    def __init__(self, dim: int, num_heads: int, applications: int, first_index: int, groups: int, recursive_groups: int,
                 mlp_ratio: float, proj_mlp_ratio: float, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.alpha1, self.beta1, self.alpha2, self.beta2 = (nn.Parameter(torch.ones(1)) for _ in range(4))
        self.projs = nn.ModuleList(SReTProjection(dim, proj_mlp_ratio, drop) for _ in range(applications))
        # (groups, shuffle) of each application
        self.slicing = tuple((recursive_groups, recursive_groups != 1) if (first_index + i) % 2 else (groups, False)
                             for i in range(applications))

    def attend(self, x: Tensor, groups: int, shuffle: bool) -> Tensor:
        """Sliced group self-attention over tokens (B, N, C): each of `groups` contiguous groups attends within itself."""
        b, n, c = x.shape
        perm = token_permutation(n, self.training, x.device) if shuffle else None
        if perm is not None:
            x = x[:, perm]
        out = self.attn(x.reshape(b * groups, n // groups, c)).reshape(b, n, c)
        return out if perm is None else out[:, torch.argsort(perm)]

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        for (groups, shuffle), proj in zip(self.slicing, self.projs):
            x = self.alpha1 * x + self.beta1 * self.drop_path(self.attend(self.norm1(x), groups, shuffle))
            x = self.alpha2 * x + self.beta2 * self.drop_path(self.mlp(self.norm2(x)))
            x = proj(x)
        return x.reshape(b, h, w, c)


class SReTStage(nn.Module):
    """Pooling (stages after the first), then `num_blocks` recursive blocks covering `depth` applications."""

    def __init__(self, in_dim: int | None, dim: int, depth: int, num_blocks: int, num_heads: int, groups: int,
                 recursive_groups: int, mlp_ratio: float, proj_mlp_ratio: float, drop: float, attn_drop: float,
                 drop_path: Sequence[float]) -> None:
        super().__init__()
        self.downsample = SReTPooling(in_dim, dim) if in_dim is not None else nn.Identity()
        loops = depth // num_blocks
        # as in the released code, block r's drop-path rate is the stage's r-th rate
        self.blocks = nn.Sequential(*(SReTBlock(dim, num_heads, loops, r * loops, groups, recursive_groups, mlp_ratio,
                                                proj_mlp_ratio, drop, attn_drop, drop_path[r]) for r in range(num_blocks)))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class SReT(nn.Module):
    """Sliced Recursive Transformer: conv stem + position table, stages of recursive blocks with pooling between, GAP head."""

    def __init__(self, img_size: int | Sequence[int] = 224, in_chans: int = 3, num_classes: int = 1000,
                 dims: Sequence[int] = (64, 128, 256), depths: Sequence[int] = (4, 10, 6),
                 num_blocks: Sequence[int] = (2, 5, 3), num_heads: Sequence[int] = (2, 4, 8),
                 groups: Sequence[int] = (8, 4, 1), recursive_groups: Sequence[int] = (2, 1, 1), mlp_ratio: float = 3.6,
                 proj_mlp_ratio: float = 1.0, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, global_pool: str = "avg") -> None:
        super().__init__()
        per_stage = {"dims": dims, "depths": depths, "num_blocks": num_blocks, "num_heads": num_heads, "groups": groups,
                     "recursive_groups": recursive_groups}
        if len({len(v) for v in per_stage.values()}) != 1:
            raise ValueError(f"dims, depths, num_blocks, num_heads, groups and recursive_groups need one value per stage, got {per_stage}")
        if global_pool != "avg":
            raise ValueError(f"SReT pools by global average only (global_pool='avg'), got {global_pool!r}")
        height, width = _pair(img_size)
        if height % 8 or width % 8:
            raise ValueError(f"img_size {img_size} is not a multiple of 8 (the stem's stride and the position table's cell)")
        grid = (height // 8, width // 8)
        for s, (dim, depth, blocks, heads, g1, g2) in enumerate(zip(*per_stage.values())):
            if depth % blocks or dim % heads or (s and dim % dims[s - 1]):
                raise ValueError(f"stage {s}: depth {depth} must be a multiple of num_blocks {blocks}, dim {dim} of num_heads "
                                 f"{heads} and of the previous stage's dim")
            if s:
                grid = ((grid[0] + 1) // 2, (grid[1] + 1) // 2)
            tokens = grid[0] * grid[1]
            if tokens % g1 or tokens % g2:
                raise ValueError(f"stage {s}: {tokens} tokens cannot be sliced into {g1} and {g2} groups; change img_size or groups")
        self.num_classes, self.in_chans, self.global_pool = num_classes, in_chans, global_pool
        self.num_features = self.head_hidden_size = dims[-1]
        self.stem = SReTStem(in_chans, dims[0])
        self.pos_embed = nn.Parameter(torch.zeros(1, dims[0], height // 8, width // 8))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / sum(depths) for i in range(sum(depths))]
        starts = [sum(depths[:s]) for s in range(len(depths))]
        self.stages = nn.Sequential(*(
            SReTStage(dims[s - 1] if s else None, dims[s], depths[s], num_blocks[s], num_heads[s], groups[s],
                      recursive_groups[s], mlp_ratio, proj_mlp_ratio, drop_rate, attn_drop_rate,
                      rates[starts[s]:starts[s] + depths[s]])
            for s in range(len(dims))))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new (random) classifier for `num_classes` classes (0: none)."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"SReT pools by global average only, got {global_pool!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_stem(self, x: Tensor) -> Tensor:
        """Images -> the first stage's input: stem, plus the position table, channels last (B, H/8, W/8, C)."""
        return self.pos_drop(self.stem(x) + self.pos_embed).permute(0, 2, 3, 1)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.stages(self.forward_stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Channels-last features -> logits: average pool, LayerNorm, classifier."""
        x = self.norm(x.mean(dim=(1, 2)))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


_BLOCK_KEYS = {"coefficient1.bias": "alpha1", "coefficient2.bias": "beta1", "coefficient3.bias": "alpha2",
               "coefficient4.bias": "beta2"}
_PROJ_KEYS = {"coefficient1.bias": "alpha", "coefficient2.bias": "beta"}
_SPLIT_QKV = re.compile(r"attn\.proj_([qkv])\.(weight|bias)$")


def _reference_name(key: str, loops: Sequence[int]) -> tuple[str, str | None] | None:
    """(our name, part q/k/v of a split projection or None) of a released-code key; None for a key of no known module."""
    if key in ("pos_embed",) or key.startswith(("norm.", "head.")):
        return key, None
    if m := re.fullmatch(r"patch_embed\.((?:conv|bn)[123]\..+)", key):
        return f"stem.{m[1]}", None
    if m := re.fullmatch(r"pools\.(\d+)\.conv\.(.+)", key):
        return f"stages.{int(m[1]) + 1}.downsample.conv.{m[2]}", None
    m = re.fullmatch(r"transformers\.(\d+)\.blocks\.(\d+)\.(.+)", key)
    if m is None or int(m[1]) >= len(loops):
        return None
    stage, index, rest = int(m[1]), int(m[2]), m[3]
    block, application = divmod(index // 2, loops[stage])
    where = f"stages.{stage}.blocks.{block}"
    if index % 2:  # a projection layer
        rest = _PROJ_KEYS.get(rest) or rest.replace("norm1.", "norm.", 1)
        return f"{where}.projs.{application}.{rest}", None
    if split := _SPLIT_QKV.fullmatch(rest):
        return f"{where}.attn.qkv.{split[2]}", split[1]
    return f"{where}.{_BLOCK_KEYS.get(rest, rest)}", None


def is_reference_layout(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether `state_dict` is in the released code's layout (its stem is `patch_embed.conv1`, ours `stem.conv1`)."""
    return "patch_embed.conv1.weight" in state_dict


def convert_reference_state_dict(state_dict: Mapping[str, Tensor], model: SReT) -> dict[str, Tensor]:
    """A released-code SReT state dict under our names (unchanged when it is not in that layout).

    A weight-shared block is stored once per application there: every copy must be equal (WeightsError naming
    both otherwise). Split `proj_q/k/v` projections are concatenated into `qkv`. Keys of no known module keep
    their names, so strict loading names them as unexpected; so are missing ones, under our names.
    """
    if not is_reference_layout(state_dict):
        return dict(state_dict)
    loops = [len(stage.blocks[0].projs) for stage in model.stages]
    out: dict[str, Tensor] = {}
    source: dict[str, str] = {}
    parts: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        named = _reference_name(key, loops)
        ours, part = named if named is not None else (key, None)
        if part is not None:
            ours_part = f"{ours}[{part}]"
            if ours_part in source and not torch.equal(parts[ours][part], value):
                raise WeightsError(f"'{source[ours_part]}' and '{key}' hold different weights for one weight-shared SReT block")
            parts.setdefault(ours, {})[part] = value
            source.setdefault(ours_part, key)
            continue
        if ours in out and not torch.equal(out[ours], value):
            raise WeightsError(f"'{source[ours]}' and '{key}' hold different weights for one weight-shared SReT block")
        out.setdefault(ours, value)
        source.setdefault(ours, key)
    for ours, qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            raise WeightsError(f"the split attention projections of '{ours}' lack {sorted({'q', 'k', 'v'} - set(qkv))}")
        out[ours] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: SReT) -> dict[str, Tensor]:
    """timm's pretrained-weights hook: a released-code checkpoint under our names."""
    return convert_reference_state_dict(state_dict, model)


def _cfg(**kwargs: object) -> dict[str, object]:
    # eval transform of the released code (DeiT's): bicubic resize to 256, centre crop 224
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
            "interpolation": "bicubic", "fixed_input_size": True, "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225), "first_conv": "stem.conv1", "classifier": "head",
            "license": "apache-2.0", "paper_ids": "arXiv:2111.05297", **kwargs}


default_cfgs = generate_default_cfgs({"sret_tiny_patch16_224": _cfg()})


def _create_sret(variant: str, pretrained: bool = False, **kwargs: object) -> SReT:
    return build_model_with_cfg(SReT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


@register_model
def sret_tiny_patch16_224(pretrained: bool = False, **kwargs: object) -> SReT:
    """SReT-T (the paper's SReT_T; 4.8M parameters): dims 64/128/256, 4+10+6 layers on 2+5+3 shared blocks."""
    args = {"dims": (64, 128, 256), "depths": (4, 10, 6), "num_blocks": (2, 5, 3), "num_heads": (2, 4, 8),
            "groups": (8, 4, 1), "recursive_groups": (2, 1, 1), "mlp_ratio": 3.6, "proj_mlp_ratio": 1.0}
    return _create_sret("sret_tiny_patch16_224", pretrained, **{**args, **kwargs})
