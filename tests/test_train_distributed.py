"""Data parallelism on 2 CPU processes (`accelerate launch --multi_gpu` on CPU, gloo): identical calibration on every rank, and 2 x B/2 == 1 x B.

The 1-process run uses the same global batch B = 8 per optimiser step as two micro-batches of 4
(grad_accum = 2), i.e. the same per-forward arithmetic as each of the 2 processes. Tolerance: none,
the weights are bitwise equal: averaging 2 gradients by halving is exact in float32, activation
statistics are summed in float64 (exact), and the LSQ activation-gradient scale is corrected to the
global batch in both runs. (One forward over 8 rows instead of two over 4 rounds some activations 1
ulp differently; fake quantization turns a few such ulps into code flips and AdamW's first steps,
~lr * sign(g), into +-lr differences, so "1 process, micro-batch 8" is a different computation.)
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vitqtool.core import calibrate, prepare
from vitqtool.core.models import resolve_model
from vitqtool.quant import iter_quantizers
from vitqtool.commands import quantize
from vitqtool.core.runs import CKPT_DIR, MODEL_FILE, read_index

MODEL = "vit_tiny_patch16_224"
ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10}
RUN = dict(bits=4, recipe="vaq", random_init=True, model_args=ARGS, epochs=2, limit_train=16, limit_val=50)

WORKER = textwrap.dedent(f"""
    import sys, torch, torch.distributed as dist
    from pathlib import Path
    from vitqtool.core import calibrate, prepare
    from vitqtool.core.models import resolve_model
    from vitqtool.quant import iter_quantizers
    from vitqtool.commands import quantize
    out = Path(sys.argv[1])
    quantize({MODEL!r}, out=out / "dp", batch_size=4, **{RUN!r})  # 4 images per process = global batch 8
    rank = dist.get_rank()
    torch.manual_seed(0)
    qmodel = prepare(resolve_model({MODEL!r}, random_init=True, model_args={ARGS!r}).model, "vaq")
    g = torch.Generator().manual_seed(100 + rank)  # a different calibration batch on each rank
    calibrate(qmodel, [torch.randn(4, 3, 32, 32, generator=g) * (1 + rank)])
    torch.save({{n: q.step.detach().clone() for n, q in iter_quantizers(qmodel)}}, out / f"steps{{rank}}.pt")
    dist.destroy_process_group()  # a clean exit: gloo's threads must not outlive the interpreter
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    (out / "worker.py").write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(out / "worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_calibration_identical_on_every_rank_and_equal_to_pooled_batches(two_process_run):
    s0, s1 = torch.load(two_process_run / "steps0.pt"), torch.load(two_process_run / "steps1.pt")
    torch.manual_seed(0)
    qmodel = prepare(resolve_model(MODEL, random_init=True, model_args=ARGS).model, "vaq")
    batches = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(100 + r)) * (1 + r) for r in range(2)]
    calibrate(qmodel, batches)  # one process seeing both ranks' batches
    pooled = {n: q.step.detach() for n, q in iter_quantizers(qmodel)}
    assert s0.keys() == s1.keys() == pooled.keys()
    for name in s0:
        assert torch.equal(s0[name], s1[name]), name
        assert torch.equal(s0[name], pooled[name]), name
    assert any(not torch.allclose(s0[n], torch.ones(1)) for n in s0)


def test_two_processes_half_batch_equal_one_process_full_batch(two_process_run, tmp_path):
    single = tmp_path / "single"
    quantize(MODEL, out=single, batch_size=8, grad_accum=2, **RUN)
    dp = two_process_run / "dp"
    w1 = load_file(str(single / CKPT_DIR / read_index(single)["last"] / MODEL_FILE))
    w2 = load_file(str(dp / CKPT_DIR / read_index(dp)["last"] / MODEL_FILE))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.equal(w2[k], w1[k]), k
    torch.manual_seed(0)  # quantize seeds the random init with the run seed (0)
    init = resolve_model(MODEL, random_init=True, model_args=ARGS).model.state_dict()
    assert (w1["blocks.0.mlp.fc1.weight"] - init["blocks.0.mlp.fc1.weight"]).abs().max() > 1e-4  # training moved it
    meta = json.loads((dp / "run.json").read_text())
    assert meta["identity"]["processes"] == 2 and meta["step"] == 4
