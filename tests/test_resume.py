"""Exact resume: N steps + resume + M steps give the per-step losses of N + M uninterrupted steps.

One 2-process ZeRO-2 run of N + M steps saves resume checkpoints along the way. Pointing
`resume/latest` back at step N recreates the state of a job killed right after that save (the
pointer is the commit point); `--resume` must then reproduce steps N+1..N+M exactly (fp32, with
LoRA dropout on and an epoch boundary inside the resumed part). The second test does the same on
the trainer's default batching (token budgets), across a schedule-phase boundary where the batch
size changes.
The first test's uninterrupted run is a module fixture: the planted-pickle test resumes a copy of it too
(one launch for both; the two are one xdist group, so that the fixture runs once).
"""

from __future__ import annotations

import shutil

import pytest

from common.io import read_jsonl
from tests.test_train_e2e import base_flags, run_train

# small_shard_dir: 200 train samples / 2 ranks / 16 per batch = 7 batches per epoch: step 6 is
# mid-epoch 0, steps 7..10 cross into epoch 1.
ZERO2_RUN = {"batch-size": 16, "num-epochs": 2, "max-steps": 10, "save-steps": 3, "save-total-limit": 10,
             "lora-dropout": 0.1}


@pytest.fixture(scope="module")
def zero2_run(small_shard_dir, tiny_lm_dir, tmp_path_factory):
    """The uninterrupted 2-process ZeRO-2 run of 10 steps (resume checkpoints at steps 3, 6, 9, 10)."""
    out = tmp_path_factory.mktemp("zero2_run") / "run"
    run_train(base_flags(small_shard_dir, tiny_lm_dir, out, **ZERO2_RUN))
    return out


def copy_of_run(zero2_run, shard_dir, tiny_lm_dir, tmp_path):
    """(output dir, flags): a copy of the fixture's run, for a test to resume (and damage) on its own."""
    out = shutil.copytree(zero2_run, tmp_path / "run")
    return out, base_flags(shard_dir, tiny_lm_dir, out, **ZERO2_RUN)


@pytest.mark.slow
@pytest.mark.xdist_group("zero2_run")
def test_resume_reproduces_the_uninterrupted_losses(zero2_run, small_shard_dir, tiny_lm_dir, tmp_path):
    out, flags = copy_of_run(zero2_run, small_shard_dir, tiny_lm_dir, tmp_path)
    first = read_jsonl(out / "train_log.jsonl")
    assert (out / "resume" / "step-6" / "trainer_state.json").is_file()
    assert first[0]["steps_per_epoch"][0] == 7, first[0]  # the premise: steps 7..10 cross into epoch 1

    (out / "resume" / "latest").write_text("step-6\n")  # "killed" right after the step-6 save
    run_train(flags + ["--resume"])
    log = read_jsonl(out / "train_log.jsonl")
    second = log[len(first):]
    assert second[0]["kind"] == "start" and second[0]["step"] == 6, second[0]

    def losses(recs):
        return {r["step"]: r["loss"] for r in recs if r["kind"] == "train" and r["step"] > 6}

    want, got = losses(first), losses(second)
    assert sorted(got) == [7, 8, 9, 10] and sorted(want) == [7, 8, 9, 10]
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-5), (step, want[step], got[step])
    # Every held-out loss inside the resumed part (end of epoch 0, end of the run) matches too.
    def vals(recs):
        return {r["step"]: r["val_loss"] for r in recs if r["kind"] == "val" and r["step"] > 6}

    want_val, got_val = vals(first), vals(second)
    assert got_val and sorted(got_val) == sorted(want_val), (want_val, got_val)
    for step in want_val:
        assert got_val[step] == pytest.approx(want_val[step], abs=1e-5), (step, want_val[step], got_val[step])


@pytest.mark.slow
def test_resume_across_a_phase_boundary_with_token_budgets(small_shard_dir, tiny_lm_dir, tmp_path):
    out = tmp_path / "run"
    flags = base_flags(small_shard_dir, tiny_lm_dir, out, **{
        "batch-size": 0, "batch-tokens": 4096, "schedule": "summary_centric", "warmup-epochs": 1,
        "main-epochs": 1, "max-steps": 9, "save-steps": 2, "save-total-limit": 10, "lora-dropout": 0.1})
    run_train(flags)
    first = read_jsonl(out / "train_log.jsonl")
    start = first[0]
    # The premise: the phases got their own batch sizes, and step 4 is inside the warm-up epoch,
    # whose end lies inside the resumed steps 5..9.
    sizes = start["batch_size_per_phase"]
    assert sizes["warmup"] != sizes["main"], sizes
    assert 4 < start["steps_per_epoch"][0] < 9, start

    (out / "resume" / "latest").write_text("step-4\n")
    run_train(flags + ["--resume"])
    second = read_jsonl(out / "train_log.jsonl")[len(first):]
    assert second[0]["kind"] == "start" and second[0]["step"] == 4, second[0]

    def losses(recs):
        return {r["step"]: (r["loss"], r["task_mix"]) for r in recs if r["kind"] == "train" and r["step"] > 4}

    want, got = losses(first), losses(second)
    assert sorted(got) == sorted(want) == list(range(5, 10))
    for step, (loss, mix) in want.items():
        assert got[step][1] == mix, step  # same examples, same tasks
        assert got[step][0] == pytest.approx(loss, abs=1e-5), (step, loss, got[step][0])
    assert any(mix.get("summary", 0) for step, (_, mix) in want.items()), "the main phase is reached"


@pytest.mark.slow
@pytest.mark.xdist_group("zero2_run")
def test_resume_refuses_a_planted_pickle(zero2_run, small_shard_dir, tiny_lm_dir, tmp_path):
    """A pickle planted in place of a resume checkpoint file (same size, so it passes the size check)
    runs no code: --resume stops with an error naming the file."""
    import pickle

    out, flags = copy_of_run(zero2_run, small_shard_dir, tiny_lm_dir, tmp_path)
    marker = tmp_path / "planted-code-ran"
    (out / "resume" / "latest").write_text("step-6\n")
    target = out / "resume" / "step-6" / "mp_rank_00_model_states.pt"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    data = pickle.dumps(Payload(), protocol=2)
    target.write_bytes(data + b"\0" * (target.stat().st_size - len(data)))
    proc = run_train(flags + ["--resume"], check=False)
    assert proc.returncode != 0
    assert f"{target}: refused" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert not marker.exists()
