"""launch/train.sbatch on a real single-node SLURM: 2 srun tasks (CPU, gloo) train, checkpoint, and a
requeued submission of the same job resumes from its last checkpoint."""

from __future__ import annotations

import json
import sys

import pytest

from common.io import read_jsonl
from tests.slurm import slurm_cluster  # noqa: F401  (fixture)
from tests.test_train_e2e import REPO, base_flags

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_sbatch_trains_on_two_tasks_and_resumes(slurm_cluster, shard_dir, tiny_lm_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    env = {"PYTHON": sys.executable, "STAGE2_REPO": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    options = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=00:20:00"]

    res = slurm_cluster.sbatch(REPO / "launch" / "train.sbatch",
                               *base_flags(shard_dir, tiny_lm_dir, out, **{"max-steps": 4, "save-steps": 2}),
                               env=env, options=options, cwd=REPO)
    assert res.returncode == 0, res.output[-6000:]
    assert (out / "final" / "adapter_model.safetensors").is_file(), res.output[-3000:]
    start = [r for r in read_jsonl(out / "train_log.jsonl") if r["kind"] == "start"]
    assert start[0]["world_size"] == 2 and start[0]["step"] == 0

    # The same submission again (as after a requeue): --resume is on by default in the script.
    res = slurm_cluster.sbatch(REPO / "launch" / "train.sbatch",
                               *base_flags(shard_dir, tiny_lm_dir, out, **{"max-steps": 6, "save-steps": 2}),
                               env=env, options=options, cwd=REPO)
    assert res.returncode == 0, res.output[-6000:]
    log = read_jsonl(out / "train_log.jsonl")
    starts = [r for r in log if r["kind"] == "start"]
    assert starts[-1]["step"] == 4, starts
    assert [r["step"] for r in log if r["kind"] == "train"][-2:] == [5, 6]
    assert json.loads((out / "resume" / "step-6" / "trainer_state.json").read_text())["step"] == 6
