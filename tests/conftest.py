"""Session fixtures: tiny real-architecture models and generated data, built once per test run.

Everything here is made locally (no downloads): tiny Stage1 checkpoints of the real classes, a
small synthetic WeatherQA-like dataset, its shards, and a tiny Mistral with a locally trained
tokenizer saved like a real model directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.slurm import slurm_cluster  # noqa: F401  (session fixture: a real single-node SLURM)

# Two cores in CI: keep torch from oversubscribing them when tests start subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_environ():
    """In-process tests that initialise torch.distributed export RANK/MASTER_PORT/...; restore the
    environment after each test so that later launched jobs never inherit them (a leaked
    MASTER_PORT is still bound by this process's store: the next job would fail EADDRINUSE)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def stage1_ckpts(tmp_path_factory):
    """(encoder_ckpt, classifier_ckpt): tiny random MAE ViT + EfficientNet saved as checkpoint files."""
    from tiny_models.stage1 import save_tiny_stage1

    return save_tiny_stage1(tmp_path_factory.mktemp("stage1"))


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """(list of Gemini JSON paths, image_root) for a small synthetic dataset (2 files)."""
    from data_prep.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic")
    json_paths = generate(out, num_cases=24, num_files=2, seed=0)
    return json_paths, out


def _build_synthetic_shards(out, synthetic_data, stage1_ckpts, trainable_blocks: int):
    from data_prep.build_shards import BuildConfig, build

    json_paths, image_root = synthetic_data
    cfg = BuildConfig(gemini_json=[str(p) for p in json_paths], image_root=str(image_root),
                      stage1_encoder_ckpt=str(stage1_ckpts[0]), stage1_classifier_ckpt=str(stage1_ckpts[1]),
                      out=str(out), samples_per_shard=64, num_workers=0,
                      stage1_trainable_blocks=trainable_blocks, image_size=32)
    build(cfg)
    return out


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, synthetic_data, stage1_ckpts):
    """A built shard directory (K=0) of the synthetic dataset."""
    return _build_synthetic_shards(tmp_path_factory.mktemp("shards"), synthetic_data, stage1_ckpts, 0)


@pytest.fixture(scope="session")
def small_shard_dir(tmp_path_factory, stage1_ckpts):
    """Shards (K=0) of a smaller synthetic dataset: 12 cases, 200 train / 40 val samples (shard_dir:
    400 / 80). For the runs that must train across an epoch boundary (the resume tests): an epoch
    of it is half the steps."""
    from data_prep.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic_small")
    json_paths = generate(out, num_cases=12, num_files=2, seed=0)
    return _build_synthetic_shards(tmp_path_factory.mktemp("shards_small"), (json_paths, out), stage1_ckpts, 0)


@pytest.fixture(scope="session")
def shard_dir_k1(tmp_path_factory, synthetic_data, stage1_ckpts):
    """A built shard directory with K=1 cached block tokens."""
    return _build_synthetic_shards(tmp_path_factory.mktemp("shards_k1"), synthetic_data, stage1_ckpts, 1)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, synthetic_data):
    """A tiny random MistralForCausalLM + tokenizer trained on the synthetic texts, saved as a model dir."""
    from tiny_models.lm import make_tiny_lm

    json_paths, _ = synthetic_data
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm"), corpus_json=json_paths)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n 2 --dist loadgroup`, as `make test` runs): the SLURM tests share one
    worker, since the single-node cluster they start is one per machine."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
    _group_module_fixture_users(items)
    _name_xdist_groups(config, items)


def _group_module_fixture_users(items):
    """A module-scoped fixture is built once per worker that runs a test using it, and some are whole
    training runs (test_fsdp2's two_process_run, test_checkpoint's trained, test_benchmarks'
    tiny_setup, ...): the tests of a module that use one share a group (one worker, one build).
    Tests that already name a group keep it."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None or item.get_closest_marker("xdist_group"):
            continue
        if any(defs and defs[-1].scope == "module" for defs in info.name2fixturedefs.values()):
            item.add_marker(pytest.mark.xdist_group(f"module-fixtures:{item.module.__name__}"))


def _name_xdist_groups(config, items):
    """`--dist loadgroup` keeps a group on one worker by the suffix `@<group>` of its tests' node ids,
    which pytest-xdist's worker adds by setting `item._nodeid`. pytest >= 9.2 derives `item.nodeid`
    from `item._id` instead, so that rename is silently lost and every group is spread over the
    workers (each worker then starts the group's module/session fixtures again: a second SLURM
    cluster, a second shared training run). Rename through `_id` where it exists."""
    if not getattr(config.option, "loadgroup", False):
        return  # not an xdist worker of --dist loadgroup
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # pytest < 9.2: xdist's own rename works
        return
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        suffix = "@" + "_".join(names)
        if names and not item.nodeid.endswith(suffix):
            item._id = NodeId.parse(item.nodeid + suffix)
