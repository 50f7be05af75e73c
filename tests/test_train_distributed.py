"""Data parallelism on CPU processes (gloo), launched with `accelerate launch` as a user would.

- One machine, 2 processes (`--multi_gpu --num_processes 2`): identical calibration on every rank;
  `softlabels` splits the shards and writes bitwise the store of one process.
- Two "machines" on 127.0.0.1 (`--num_machines 2 --machine_rank 0|1`, one process each): training
  equals one process bitwise; `vitqtool softlabels` across them equals one process bitwise; a run
  interrupted on 2 processes resumes on 1 and one interrupted on 1 resumes on 2, keeping the global
  batch, and both end bitwise where the uninterrupted run ends, with the same loss curve.

The 1-process runs use the same global batch B = 8 per optimiser step as two micro-batches of 4
(grad_accum = 2), i.e. the same per-forward arithmetic as each of the 2 processes. Tolerance: none,
the weights are bitwise equal: averaging 2 gradients by halving is exact in float32, activation
statistics are summed in float64 (exact), and the LSQ activation-gradient scale is corrected to the
global batch in both runs. (One forward over 8 rows instead of two over 4 rounds some activations 1
ulp differently; fake quantization turns a few such ulps into code flips and AdamW's first steps,
~lr * sign(g), into +-lr differences, so "1 process, micro-batch 8" is a different computation.)
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import interrupt_at_step
from vitqtool.commands import quantize, softlabels
from vitqtool.core import calibrate, prepare
from vitqtool.core.models import resolve_model
from vitqtool.core.runs import CKPT_DIR, MODEL_FILE, read_index
from vitqtool.errors import RunError
from vitqtool.quant import iter_quantizers
from vitqtool.train import RunInterrupted

MODEL = "vit_tiny_patch16_224"
ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10}
# 32 images / global batch 8 = 4 steps per epoch, 2 epochs. Eager quantizers: the fused kernels train bitwise like them
# (tests/test_quantize.py) and would cost every launched process ~5 s of compiling.
RUN = dict(bits=4, recipe="vaq", random_init=True, model_args=ARGS, epochs=2, limit_train=32, limit_val=50, fuse_quantizers=False)
SOFT = dict(random_init=True, model_args=ARGS, crops=3, topk=3, limit=24, images_per_shard=5)  # 5 shards
SOFT_CLI = ["softlabels", MODEL, "--random-init", "--model-args", json.dumps(ARGS), "--crops", "3", "--topk", "3", "--limit",
            "24", "--images-per-shard", "5", "--json", "--out"]  # as SOFT

CALIBRATION_WORKER = textwrap.dedent(f"""
    import sys, torch, torch.distributed as dist
    from pathlib import Path
    from vitqtool.core import calibrate, prepare
    from vitqtool.core.models import resolve_model
    from vitqtool.quant import iter_quantizers
    from accelerate import PartialState
    from vitqtool.cli import main
    out = Path(sys.argv[1])
    PartialState(cpu=True)  # joins the process group, as quantize and softlabels do
    rank = dist.get_rank()
    torch.manual_seed(0)
    qmodel = prepare(resolve_model({MODEL!r}, random_init=True, model_args={ARGS!r}).model, "vaq")
    g = torch.Generator().manual_seed(100 + rank)  # a different calibration batch on each rank
    calibrate(qmodel, [torch.randn(4, 3, 32, 32, generator=g) * (1 + rank)])
    torch.save({{n: q.step.detach().clone() for n, q in iter_quantizers(qmodel)}}, out / f"steps{{rank}}.pt")
    sys.exit(main([*{SOFT_CLI!r}, str(out / "labels")]))  # the CLI, last: it leaves the process group when done
""")

TRAIN_WORKER = textwrap.dedent(f"""
    import signal, sys, torch.distributed as dist
    from pathlib import Path
    from vitqtool.commands import quantize
    from vitqtool.train import RunInterrupted, loop
    out, log = Path(sys.argv[1]), [Path(sys.argv[2])]
    quantize({MODEL!r}, out=out / "dp", batch_size=4, overrides=log, **{RUN!r})  # 4 images per process = global batch 8
    original, calls = loop.task_loss, [0]
    def task_loss(tr, batch):  # rank 0 is signalled during step 5 (epoch 2, micro-batch 1 of 4)
        calls[0] += 1
        if calls[0] == 5 and dist.get_rank() == 0:
            signal.raise_signal(signal.SIGINT)
        return original(tr, batch)
    loop.task_loss = task_loss
    try:
        quantize({MODEL!r}, out=out / "two_then_one", batch_size=4, overrides=log, **{RUN!r})
        sys.exit("the run was not interrupted")
    except RunInterrupted:
        pass
    loop.task_loss = original
    quantize({MODEL!r}, out=out / "one_then_two", batch_size=4, overrides=log, resume=True, **{RUN!r})  # stopped on 1
    from vitqtool.cli import main
    sys.exit(main([*{SOFT_CLI!r}, str(out / "labels_nodes")]))  # the CLI, last: it leaves the process group when done
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Launch:
    """A finished launch: the shared folder and each launcher's stdout."""

    folder: Path
    outputs: list[str]


def _launch(machines: list[list[str]], target: list[str]) -> list[str]:
    """Run `accelerate launch` once per entry of `machines` (its own flags) concurrently, all with `target`; their stdouts."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    common = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--mixed_precision", "no",
              "--dynamo_backend", "no"]
    procs = [subprocess.Popen([*common, *flags, *target], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for flags in machines]
    done = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=400)
        done.append(stdout)
        assert proc.returncode == 0, "\n".join(line for line in stderr.splitlines() if not line.startswith("W1"))[-6000:]
    return done


def _two_machines(port: int) -> list[list[str]]:
    """The flags of two one-process "machines" on 127.0.0.1, as a two-node cluster would have them."""
    return [["--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
             "--main_process_port", str(port)] for rank in (0, 1)]


def _weights(run: Path) -> dict:
    return load_file(str(run / CKPT_DIR / read_index(run)["last"] / MODEL_FILE))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _steps(run: Path) -> list[tuple]:
    """(step, loss, kd, obr) of every logged optimiser step in metrics.jsonl."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["kd"], r["obr"]) for r in lines if "loss" in r]


def _store_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """The folder the launched processes and this one share; holds the recipe override that logs every step."""
    out = tmp_path_factory.mktemp("dist")
    (out / "log.toml").write_text("[oscillation]\nlog_every = 1\n")
    return out


@pytest.fixture(scope="module")
def reference(shared) -> Path:
    """The uninterrupted 1-process run with the global batch of 8 as 2 micro-batches of 4."""
    quantize(MODEL, out=shared / "single", batch_size=8, grad_accum=2, overrides=[shared / "log.toml"], **RUN)
    return shared / "single"


@pytest.fixture(scope="module")
def store_one(shared) -> Path:
    """The soft-label store one process writes."""
    softlabels(MODEL, shared / "labels_one", **SOFT)
    return shared / "labels_one"


@pytest.fixture(scope="module")
def two_process_run(shared) -> Launch:
    (shared / "worker.py").write_text(CALIBRATION_WORKER)
    return Launch(shared, _launch([["--num_processes", "2", "--num_machines", "1", "--main_process_port", str(_free_port())]],
                                  [str(shared / "worker.py"), str(shared)]))


@pytest.fixture(scope="module")
def two_machines(shared, reference) -> Launch:
    """Training on two one-process machines; first a 1-process run interrupted at step 3 for them to resume."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        interrupt_at_step(monkeypatch, 3, lambda: signal.raise_signal(signal.SIGINT))
        with pytest.raises(RunInterrupted, match="step 3"):
            quantize(MODEL, out=shared / "one_then_two", batch_size=8, grad_accum=2, overrides=[shared / "log.toml"], **RUN)
    (shared / "train_worker.py").write_text(TRAIN_WORKER)
    return Launch(shared, _launch(_two_machines(_free_port()), [str(shared / "train_worker.py"), str(shared), str(shared / "log.toml")]))


def test_calibration_identical_on_every_rank_and_equal_to_pooled_batches(two_process_run):
    s0, s1 = torch.load(two_process_run.folder / "steps0.pt"), torch.load(two_process_run.folder / "steps1.pt")
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


def test_softlabels_on_two_processes_and_two_machines_equal_one_process(two_process_run, two_machines, store_one):
    reference = _store_bytes(store_one)
    assert len(reference) == 6  # manifest + 5 shards
    for launch, store in ((two_process_run, "labels"), (two_machines, "labels_nodes")):
        *_, last = launch.outputs
        report = json.loads(launch.outputs[0])  # one JSON document from the main process; the others print nothing
        assert len(launch.outputs) == 1 or last.strip() == ""
        assert (report["processes"], report["shards"], report["images"], report["out"]) == (2, 5, 24, str(launch.folder / store))
        assert _store_bytes(launch.folder / store) == reference


def test_two_machines_train_bitwise_like_one_process(two_machines, reference):
    dp = two_machines.folder / "dp"
    _assert_same_weights(dp, reference)
    torch.manual_seed(0)  # quantize seeds the random init with the run seed (0)
    init = resolve_model(MODEL, random_init=True, model_args=ARGS).model.state_dict()
    assert (_weights(reference)["blocks.0.mlp.fc1.weight"] - init["blocks.0.mlp.fc1.weight"]).abs().max() > 1e-4  # trained
    meta = json.loads((dp / "run.json").read_text())
    assert meta["identity"]["processes"] == 2 and meta["step"] == 8
    assert _steps(dp) == _steps(reference)  # the logged loss is the global batch's, not one process's


def test_a_run_stopped_on_two_processes_resumes_on_one_and_ends_where_the_uninterrupted_run_ends(two_machines, reference):
    run = two_machines.folder / "two_then_one"
    state = torch.load(run / CKPT_DIR / read_index(run)["last"] / "state.pt", weights_only=True)
    assert (state["train"]["step"], state["train"]["epoch"], state["train"]["batch"], len(state["rng"])) == (5, 1, 1, 2)
    log = [run.parent / "log.toml"]
    with pytest.raises(RunError, match=r"global batch of 8 images.*this launch has 4 \(--batch-size 4 x 1 process\); resume with --batch-size 8"):
        quantize(MODEL, out=run, batch_size=4, overrides=log, resume=True, **RUN)
    quantize(MODEL, out=run, batch_size=8, grad_accum=2, overrides=log, resume=True, **RUN)
    _assert_same_weights(run, reference)
    assert [s[0] for s in _steps(run)] == list(range(1, 9))
    assert _steps(run) == _steps(reference)  # the loss curve continues: steps 6-8 as if never interrupted


def test_a_run_stopped_on_one_process_resumes_on_two(two_machines, reference):
    run = two_machines.folder / "one_then_two"
    assert json.loads((run / "run.json").read_text())["status"] == "done"
    _assert_same_weights(run, reference)
    assert _steps(run) == _steps(reference)
