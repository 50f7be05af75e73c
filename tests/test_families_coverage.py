"""benchmarks/families.py on a few architectures: statuses, the one-line reasons, the summary and the block it writes into the docs."""

import pytest

from benchmarks.families import END, START, replace_block, run, summary_table


def test_coverage_rows_and_summary_for_an_accepted_and_a_refused_family():
    rows = run(["sret_model", "resnet"], seed=0, limit=1)
    sret, eca = rows
    assert sret["architecture"] == "sret_tiny_patch16_224" and sret["status"] == "exact"
    assert sret["max_abs_diff"] <= 1e-5 and sret["logit_std"] > 0.1 and sret["args"]["img_size"] == 32
    assert eca["architecture"] == "ecaresnet26t" and eca["status"] == "refused" and eca["cls"] == "ResNet"
    assert eca["message"] == ("layer1.0.se.conv: layer type Conv1d (no quantization rule for it in the resnet layout) "
                              "is not supported by the quantized layout")
    table = summary_table(rows, ["sret_model", "resnet"])
    assert table[2] == "| `sret_model` (SReT) | 1 | 1 | 0 | - | - |"
    assert table[3] == ("| `resnet` (ResNet) | 1 | 0 | 1 | layer1.N.se.conv: layer type Conv1d (no quantization rule for it in the "
                        "resnet layout) (1) | - |")


def test_the_readme_block_is_replaced_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START}\nold\n{END}\nrest\n")
    replace_block(readme, ["new 1", "new 2"])
    assert readme.read_text() == f"intro\n{START}\nnew 1\nnew 2\n{END}\nrest\n"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="needs exactly one"):
        replace_block(readme, ["x"])
