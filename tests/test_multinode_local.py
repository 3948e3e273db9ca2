"""benchmarks/multinode_local.py's node commands and comparison (its runs: the CPU smoke run in its
docstring; the same launcher forms train in tests/test_launch_forms.py)."""

from __future__ import annotations

import pytest

from benchmarks.multinode_local import MultinodeConfig, compare, node_commands


def test_each_node_gets_its_half_of_the_gpus(tmp_path):
    ds = node_commands("deepspeed", 4, 1234, ["--max-steps", "2"], tmp_path)
    assert [c[c.index("--node_rank") + 1] for c in ds] == ["0", "1"]
    assert all(c[c.index("--include") + 1] == "node0:0,1@node1:2,3" and "--no_ssh" in c for c in ds)
    assert (tmp_path / "hostfile").read_text().split() == ["node0", "slots=4", "node1", "slots=4"]
    tr = node_commands("torchrun", 2, 1234, ["--max-steps", "2"], tmp_path)
    assert [c[c.index("--node-rank") + 1] for c in tr] == ["0", "1"]
    assert all(c[c.index("--nproc-per-node") + 1] == "1" and c[-3:] == ["launch/train.sh", "--max-steps", "2"]
               for c in tr)


def test_compare_reports_loss_and_data_agreement():
    ref = {"steps": [{"step": 1, "loss": 2.0, "real_tokens": 10}, {"step": 2, "loss": 1.5, "real_tokens": 12}],
           "throughput": {"tokens_per_s": 100.0}}
    run = {"steps": [{"step": 1, "loss": 2.01, "real_tokens": 10}, {"step": 2, "loss": 1.5, "real_tokens": 11}],
           "throughput": {"tokens_per_s": 90.0}}
    c = compare(run, ref)
    assert c["compared_steps"] == 2 and c["same_samples_every_step"] is False
    assert c["max_abs_loss_diff"] == pytest.approx(0.01) and c["mean_abs_loss_diff"] == pytest.approx(0.005)
    assert c["tokens_per_s_ratio"] == pytest.approx(0.9)


@pytest.mark.parametrize("over", [{"gpus": 3}, {"gpus": 0}, {"launchers": ["mpirun"]}, {"warmup_steps": 30}])
def test_bad_configs_are_refused(over):
    with pytest.raises(ValueError):
        MultinodeConfig(**over).validate()
