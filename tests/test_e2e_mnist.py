"""End to end on builtin:mnist5k: train a tiny ViT in FP, then W4A4 vaq QAT keeps accuracy and W2A2 vaq beats W2A2 ptq."""

import pytest

from vitqtool.commands import quantize, train_fp

ARGS = {"img_size": 28, "patch_size": 7, "embed_dim": 96, "depth": 2, "num_heads": 2, "num_classes": 10}
# digits: no flips, mild crops (the recipe defaults are ImageNet's)
AUGMENT = "[augment]\nscale = [0.75, 1.0]\nratio = [0.9, 1.1]\nhflip = false\n"


@pytest.mark.slow
def test_fp_then_w4_vaq_keeps_accuracy_and_w2_vaq_beats_ptq(tmp_path):
    # FP lr 1e-3 (3e-3 gave 43-68% over seeds on one CPU and 58% on another); QAT fine-tunes at 3e-4.
    # Measured with FP seeds 0..3 on one machine: FP 80.6/84.0/82.4/83.9, W4A4 vaq -0.1/+0.1/-1.4/-0.5
    # points from FP, W2A2 vaq 22.6/29.7/32.0/30.3 points above W2A2 ptq.
    fp = train_fp("vit_tiny_patch16_224", tmp_path / "fp", model_args=ARGS, epochs=8, batch_size=32, lr=1e-3,
                  scale=(0.75, 1.0), ratio=(0.9, 1.1))
    assert fp.top1 > 60  # a learned classifier (chance: 10%)
    overrides = tmp_path / "mnist.toml"
    overrides.write_text(AUGMENT)
    common = dict(batch_size=32, lr=3e-4, overrides=[overrides])

    def top1(info):
        return info.best_top1

    w4 = top1(quantize(str(fp.folder), bits=4, recipe="vaq", epochs=1, out=tmp_path / "w4", **common))
    w2_ptq = top1(quantize(str(fp.folder), bits=2, recipe="ptq", out=tmp_path / "w2ptq", batch_size=32, calib_batches=4))
    w2_vaq = top1(quantize(str(fp.folder), bits=2, recipe="vaq", epochs=2, out=tmp_path / "w2", **common))
    print(f"FP {fp.top1:.1f}  W4A4 vaq {w4:.1f}  W2A2 ptq {w2_ptq:.1f}  W2A2 vaq {w2_vaq:.1f}")  # 80.6 80.5 48.0 70.6
    assert w4 >= fp.top1 - 2
    assert w2_vaq >= w2_ptq + 10
