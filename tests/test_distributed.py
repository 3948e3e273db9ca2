"""CPU affinity planning (trainer/distributed.py): which CPUs each local rank is pinned to."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from trainer import distributed as D


def fake_sysfs(root: Path, cores: int, threads_per_core: int) -> Path:
    """/sys/devices/system/cpu with `cores` physical cores of `threads_per_core` hyperthreads each,
    numbered like Linux does on x86 (cpu c and its siblings c + cores, c + 2*cores, ...)."""
    for core in range(cores):
        siblings = [core + t * cores for t in range(threads_per_core)]
        for cpu in siblings:
            d = root / f"cpu{cpu}" / "topology"
            d.mkdir(parents=True, exist_ok=True)
            (d / "thread_siblings_list").write_text(",".join(map(str, siblings)) + "\n")
    return root


def test_parse_cpulist():
    assert D.parse_cpulist("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert D.parse_cpulist("5") == {5}
    assert D.parse_cpulist("") == set()
    assert D._cpulist_text([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_physical_cores_keep_hyperthreads_together(tmp_path):
    sysfs = fake_sysfs(tmp_path, cores=4, threads_per_core=2)  # cpu c and c+4 are one core
    assert D.physical_cores(range(8), sysfs) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # CPUs outside the candidates are not added back
    assert D.physical_cores([0, 1, 4], sysfs) == [[0, 4], [1]]
    # no topology files: every CPU is its own core
    assert D.physical_cores([2, 3], tmp_path / "missing") == [[2], [3]]


@pytest.mark.parametrize("ncores,parts", [(16, 2), (16, 3), (7, 4), (3, 3), (2, 4)])
def test_split_cores_deals_every_core_once_in_near_equal_shares(ncores, parts):
    cores = [[c, c + ncores] for c in range(ncores)]
    shares = [D.split_cores(cores, parts, i) for i in range(parts)]
    if ncores < parts:  # too few cores to split: everyone shares all of them
        assert all(s == sorted(c for core in cores for c in core) for s in shares)
        return
    flat = [c for s in shares for c in s]
    assert sorted(flat) == sorted(c for core in cores for c in core), "every CPU exactly once"
    sizes = [len(s) // 2 for s in shares]
    assert max(sizes) - min(sizes) <= 1
    for s in shares:  # whole cores: a CPU's sibling is in the same share
        assert all((c + ncores if c < ncores else c - ncores) in s for c in s)


def test_two_gpus_on_one_numa_node_split_its_cores(tmp_path):
    sysfs = fake_sysfs(tmp_path, cores=16, threads_per_core=2)
    allowed = set(range(32))
    node = set(range(32))
    r0 = D.plan_cpu_affinity(0, [node, node], allowed, sysfs)
    r1 = D.plan_cpu_affinity(1, [node, node], allowed, sysfs)
    assert r0 == list(range(8)) + list(range(16, 24))
    assert r1 == list(range(8, 16)) + list(range(24, 32))


def test_gpus_on_different_numa_nodes_get_their_own_node(tmp_path):
    sysfs = fake_sysfs(tmp_path, cores=16, threads_per_core=1)
    allowed = set(range(16))
    node0, node1 = set(range(8)), set(range(8, 16))
    # GPUs 0,1 on node 0 and GPUs 2,3 on node 1: each pair splits its own node
    gpus = [node0, node0, node1, node1]
    plans = [D.plan_cpu_affinity(r, gpus, allowed, sysfs) for r in range(4)]
    assert plans == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]


def test_unknown_gpu_locality_and_restricted_cpus(tmp_path):
    sysfs = fake_sysfs(tmp_path, cores=8, threads_per_core=1)
    # sysfs does not say where the GPUs sit: the allowed CPUs are split among all local ranks
    assert D.plan_cpu_affinity(1, [None, None], set(range(8)), sysfs) == [4, 5, 6, 7]
    # a cgroup allows only CPUs away from the GPU: use the allowed ones rather than none
    assert D.plan_cpu_affinity(0, [{6, 7}], {0, 1, 2}, sysfs) == [0, 1, 2]
    # only part of the GPU's node is allowed: the allowed part of it
    assert D.plan_cpu_affinity(0, [{0, 1, 2, 3}, {0, 1, 2, 3}], {1, 2, 3, 4, 5}, sysfs) == [1, 2]


def test_local_world_size_from_launchers():
    assert D.local_world_size(8, {"LOCAL_WORLD_SIZE": "4"}) == 4  # torchrun
    assert D.local_world_size(8, {"LOCAL_SIZE": "2"}) == 2  # deepspeed launcher
    assert D.local_world_size(8, {"SLURM_NTASKS_PER_NODE": "8"}) == 8
    assert D.local_world_size(3, {}) >= 1


def test_binding_pins_this_process(monkeypatch):
    """bind_cpu_affinity on a 'GPU' machine (CUDA faked): this process ends up on its planned CPUs,
    and `auto` leaves a process alone once something else restricted its CPUs."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no sched_setaffinity on this platform")
    before = os.sched_getaffinity(0)
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(D, "gpu_local_cpus", lambda i: None)
    monkeypatch.setenv("LOCAL_SIZE", "2")
    try:
        assert D.bind_cpu_affinity("off", 0, 2) is None and os.sched_getaffinity(0) == before
        if len(before) < (os.cpu_count() or 0):
            assert D.bind_cpu_affinity("auto", 0, 2) is None  # already restricted by someone else
        cpus = D.bind_cpu_affinity("gpu", 1, 2)
        expected = D.plan_cpu_affinity(1, [None, None], before)
        assert cpus == expected and os.sched_getaffinity(0) == set(expected)
        assert torch.get_num_threads() == len(expected)
        if len(expected) < len(before):  # now restricted: auto does not bind again
            assert D.bind_cpu_affinity("auto", 0, 2) is None and os.sched_getaffinity(0) == set(expected)
    finally:
        os.sched_setaffinity(0, before)
        torch.set_num_threads(threads)
