"""launch/build_shards.sbatch as a real SLURM job array builds the same bytes as one process."""

from __future__ import annotations

import sys

import pytest

from data_prep.manifest import load_manifest

pytest_plugins = ["tests.slurm"]


def _content(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.mark.slow
@pytest.mark.slurm
def test_sbatch_array_builds_the_same_shards(slurm_cluster, repo_root, tmp_path, synthetic_data, stage1_ckpts,
                                             shard_dir):
    json_paths, image_root = synthetic_data
    out = tmp_path / "slurm_shards"
    # The same flags as the `shard_dir` fixture's in-process build (tests/conftest.py).
    args = ["--gemini-json", *map(str, json_paths), "--image-root", str(image_root),
            "--stage1-encoder-ckpt", str(stage1_ckpts[0]), "--stage1-classifier-ckpt", str(stage1_ckpts[1]),
            "--out", str(out), "--samples-per-shard", "64", "--num-workers", "0",
            "--stage1-trainable-blocks", "0", "--image-size", "32"]
    result = slurm_cluster.sbatch(repo_root / "launch" / "build_shards.sbatch", *args,
                                  options=["--array=0-2", "--cpus-per-task=1", "--time=20"],
                                  env={"PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}, cwd=repo_root)
    assert result.returncode == 0, result.output
    assert len(result.outputs) == 3, result.output
    for text in result.outputs.values():
        assert "array task" in text and "of 3" in text
    assert sum("wrote" in t and "manifest.json" in t for t in result.outputs.values()) >= 1, result.output

    manifest = load_manifest(out)
    assert len(manifest.shards) >= 3  # every array task had work
    assert _content(out) == _content(shard_dir)
    # each node built only its own shards (i % 3 == rank)
    for rank in range(3):
        record = (out / ".build" / f"node-{rank}-of-3.json").read_text()
        names = [e.name for i, e in enumerate(manifest.shards) if i % 3 == rank]
        assert all(n in record for n in names)
