"""Hang detection (trainer/heartbeat.py): in-process rings on a real TCPStore, and a 2-process training
job whose rank 1 is SIGSTOPped after its first step."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from benchmarks.hang_drill import rank_pid
from common.runtime import free_port
from tests.test_train_e2e import REPO, base_flags, run_env, train_records
from trainer.heartbeat import HANG_EXIT_CODE, Heartbeat


@pytest.fixture()
def store():
    return dist.TCPStore("127.0.0.1", free_port(), is_master=True, timeout=timedelta(seconds=30))


class Reports:
    def __init__(self):
        self.messages: list[str] = []
        self.event = threading.Event()

    def __call__(self, message: str) -> None:
        self.messages.append(message)
        self.event.set()


def _ring(store, world: int, timeout_s: float, reports: Reports) -> list[Heartbeat]:
    return [Heartbeat(store, r, world, timeout_s, on_hang=reports, interval_s=0.1, kill_local_peer=False).start()
            for r in range(world)]


def test_a_silent_rank_is_named_by_its_watcher_within_the_timeout(store):
    reports = Reports()
    beats = _ring(store, 3, 1.0, reports)
    time.sleep(1.5)
    assert not reports.messages, "live ranks are not reported"
    # Rank 2 falls silent as a SIGSTOPped process would: its threads stop without saying "done".
    beats[2]._stop.set()
    silent_at = time.monotonic()
    assert reports.event.wait(5), "the silent rank was not reported"
    took = time.monotonic() - silent_at
    assert 0.8 <= took <= 2.0, took
    msg = reports.messages[0]
    assert msg.startswith("[rank 1 on ") and "rank 2 (host " in msg and f"pid {os.getpid()}" in msg, msg
    assert socket.gethostname() in msg and "--hang-timeout 1" in msg
    for b in beats:
        b.stop()


def test_ranks_that_finish_are_not_reported(store):
    reports = Reports()
    beats = _ring(store, 2, 0.5, reports)
    beats[1].stop()  # finished first; rank 0 still in its last steps
    time.sleep(1.5)
    beats[0].stop()
    assert not reports.messages, reports.messages


@pytest.mark.slow
def test_sigstopped_rank_stops_the_job_naming_rank_and_host(shard_dir, tiny_lm_dir, tmp_path):
    """2 CPU processes; rank 1 stopped after step 1 -> non-zero exit within the timeout (+ launcher
    teardown), the log naming rank 1, its host and pid. Started LLaVA-style (`deepspeed trainer/train.py
    --deepspeed ...`), so this run is also that launcher form's test (tests/test_launch_forms.py): it
    must train a step first."""
    out, timeout_s = tmp_path / "run", 10
    flags = base_flags(shard_dir, tiny_lm_dir, out, **{"max-steps": 200, "num-epochs": 4, "val-max-samples": 0,
                                                        "image-gap-every": 0, "hang-timeout": timeout_s})
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "trainer/train.py", "--deepspeed", "ds_configs/zero2.json", *flags]
    env = {**run_env(), "DS_ACCELERATOR": "cpu"}
    env.pop("PYTHONPATH", None)  # as typed: the installed package (pip install -e .) is found
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    log = out / "train_log.jsonl"
    victim = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if log.is_file() and '"kind": "train"' in log.read_text():
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        victim = rank_pid(proc.pid, 1)
        assert victim is not None, f"no process of rank 1 under launcher pid {proc.pid}"
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.monotonic()
        output, _ = proc.communicate(timeout=timeout_s + 60)
        took = time.monotonic() - stopped_at
    finally:
        for kill in ((lambda: os.kill(victim, signal.SIGKILL)) if victim else None,
                     lambda: os.killpg(proc.pid, signal.SIGKILL)):
            try:
                kill and kill()
            except ProcessLookupError:
                pass
    assert proc.returncode != 0, output[-4000:]
    assert train_records(out, "start")[0]["world_size"] == 2 and train_records(out)[0]["step"] == 1
    assert took <= timeout_s + 15, (took, output[-4000:])
    hang = [line for line in output.splitlines() if "HANG:" in line]
    assert hang and f"rank 1 (host {socket.gethostname()} pid {victim})" in hang[0], output[-4000:]
    assert f"exit code {HANG_EXIT_CODE}" in hang[0] and f"Killed rank 1 (pid {victim}" in hang[0]
