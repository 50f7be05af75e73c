"""Exact resume: SIGINT (in-process) and SIGKILL (subprocess) mid-epoch, then --resume, equal an uninterrupted run bitwise."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import interrupt_at_step
from vitqtool.commands import quantize
from vitqtool.core.runs import CKPT_DIR, MODEL_FILE, STATE_FILE, read_index
from vitqtool.train import RunInterrupted

ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "num_classes": 10}
# 64 images / batch 8 = 8 steps per epoch, 2 epochs; checkpoints every 3 steps and at epoch ends; each epoch validated
# on 50 images (all 1,000 took longer than the training)
RUN = dict(bits=4, recipe="vaq", random_init=True, model_args=ARGS, epochs=2, batch_size=8, limit_train=64, limit_val=50, save_every=3)


def _last(run_dir: Path) -> tuple[dict, dict]:
    folder = run_dir / CKPT_DIR / read_index(run_dir)["last"]
    return load_file(str(folder / MODEL_FILE)), torch.load(folder / STATE_FILE, weights_only=True)


def _assert_same_run(a: Path, b: Path) -> None:
    (wa, sa), (wb, sb) = _last(a), _last(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert sa["train"] == sb["train"]
    osc_a, osc_b = sa["oscillation"], sb["oscillation"]
    assert osc_a.keys() == osc_b.keys() and all(torch.equal(osc_a[k], osc_b[k]) for k in osc_a)
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    quantize("vit_tiny_patch16_224", out=out, **RUN)
    return out


def test_sigint_saves_and_resume_is_exact(reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        interrupt_at_step(m, 11, lambda: signal.raise_signal(signal.SIGINT))
        with pytest.raises(RunInterrupted, match="step 11.*--resume") as info:
            quantize("vit_tiny_patch16_224", out=out, **RUN)
    assert info.value.exit_code == 130
    _, state = _last(out)
    assert state["train"]["step"] == 11 and state["train"]["epoch"] == 1 and state["train"]["batch"] == 3  # mid-epoch 2
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    quantize("vit_tiny_patch16_224", out=out, resume=True, **RUN)
    _assert_same_run(reference, out)
    epochs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "val_top1" in l]
    assert [e["epoch"] for e in epochs] == [1, 2]


def test_sigkill_mid_epoch_then_resume_is_exact(reference, tmp_path):
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from pathlib import Path
        from vitqtool.commands import quantize
        original, count = torch.optim.AdamW.step, [0]
        def step(self, *a, **k):
            count[0] += 1
            if count[0] == 14:  # last checkpoint: step 12 = epoch 2, micro-batch 4 of 8
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, *a, **k)
        torch.optim.AdamW.step = step
        quantize("vit_tiny_patch16_224", out=Path({str(out)!r}), **{RUN!r})
    """)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    _, state = _last(out)
    assert (state["train"]["step"], state["train"]["epoch"], state["train"]["batch"]) == (12, 1, 4)
    assert not [p for p in (out / CKPT_DIR).iterdir() if p.name.startswith(".tmp")]
    quantize("vit_tiny_patch16_224", out=out, resume=True, **RUN)
    _assert_same_run(reference, out)
