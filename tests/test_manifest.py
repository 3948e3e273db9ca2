"""data_prep.manifest: round trip, clear errors naming file and field, Stage1 compatibility, shard checks."""

from __future__ import annotations

import json

import pytest

from common.io import sha256_file
from data_prep.manifest import (
    Manifest,
    ManifestError,
    ManifestMismatch,
    ShardEntry,
    Stage1Record,
    check_stage1_compatible,
    load_manifest,
    save_manifest,
    verify_shard,
)
from models.cond_names import default_cond_name_to_id
from models.stage1 import Stage1Settings


def _manifest(tmp_path) -> Manifest:
    shards = []
    for name, split, n in (("train-000000.tar", "train", 3), ("train-000001.tar", "train", 2),
                           ("val-000000.tar", "val", 1)):
        (tmp_path / name).write_bytes(name.encode() * n)
        shards.append(ShardEntry(name, split, n, sha256_file(tmp_path / name), (tmp_path / name).stat().st_size))
    stage1 = Stage1Record(encoder_sha256="e" * 64, classifier_sha256="c" * 64, image_size=32, trainable_blocks=1,
                          pooling="mean", latent_dim=32, frame=0,
                          normalization={"mean": [0.5] * 3, "std": [0.25] * 3}, num_tokens=17)
    return Manifest(shards=shards, split_counts={"train": {"num_samples": 5}, "val": {"num_samples": 1}},
                    stage1=stage1, cond_name_to_id=default_cond_name_to_id(),
                    skip_summary={"num_skipped": 2, "by_reason": {"missing": 2}}, builder={"samples_per_shard": 3})


def test_round_trip(tmp_path):
    m = _manifest(tmp_path)
    save_manifest(tmp_path, m)
    loaded = load_manifest(tmp_path)
    assert loaded == m
    assert loaded.to_dict() == json.loads((tmp_path / "manifest.json").read_text())
    assert list(loaded.to_dict())[0] == "format_version"
    assert loaded.shard_paths("train") == [str(tmp_path.resolve() / f"train-00000{i}.tar") for i in (0, 1)]
    assert loaded.num_samples("train") == 5 and loaded.num_samples("val") == 1
    assert loaded.shards[0]["name"] == loaded.shards[0].name == "train-000000.tar"  # JSON-style access works
    assert load_manifest(tmp_path / "manifest.json") == m


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("shards"), "'shards'"),
    (lambda d: d["shards"][1].pop("sha256"), "shards[1]: missing field 'sha256'"),
    (lambda d: d["shards"][0].__setitem__("num_samples", "3"), "shards[0]: field 'num_samples'"),
    (lambda d: d["stage1"].pop("image_size"), "stage1: missing field 'image_size'"),
    (lambda d: d["stage1"].__setitem__("trainable_blocks", True), "stage1: field 'trainable_blocks'"),
    (lambda d: d.__setitem__("cond_name_to_id", {"shr6": 3}), "field 'cond_name_to_id'"),
    (lambda d: d.__setitem__("format_version", 99), "field 'format_version' is 99"),
])
def test_malformed_manifest_names_file_and_field(tmp_path, mutate, field):
    d = _manifest(tmp_path).to_dict()
    mutate(d)
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError) as e:
        load_manifest(tmp_path)
    assert str(tmp_path / "manifest.json") in str(e.value) and field in str(e.value)


def test_missing_and_invalid_json(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_stage1_mismatch_names_each_differing_field(tmp_path):
    m = _manifest(tmp_path)
    save_manifest(tmp_path, m)
    same = Stage1Settings(image_size=32, stage1_trainable_blocks=1, latent_pooling="mean", gif_frame=0)
    check_stage1_compatible(m, same, "e" * 64, "c" * 64)
    check_stage1_compatible(m, same, None, None)  # hashes unknown: not compared

    other = Stage1Settings(image_size=224, stage1_trainable_blocks=1, latent_pooling="cls", gif_frame=0)
    with pytest.raises(ManifestMismatch) as e:
        check_stage1_compatible(m, other, "f" * 64, "c" * 64)
    msg = str(e.value)
    assert set(e.value.differences) == {"image_size", "latent_pooling", "stage1_encoder_ckpt (sha256)"}
    assert "image_size: shards built with 32, this run uses 224" in msg
    assert "latent_pooling: shards built with 'mean', this run uses 'cls'" in msg
    assert "trainable_blocks" not in msg and "classifier" not in msg
    assert str(tmp_path / "manifest.json") in msg


def test_verify_shard_detects_truncation_and_corruption(tmp_path):
    m = _manifest(tmp_path)
    entry = m.shards[0]
    assert verify_shard(tmp_path, entry)
    path = tmp_path / entry.name
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    assert not verify_shard(tmp_path, entry, full=False)  # size alone catches truncation
    path.write_bytes(data[:-1] + b"X")  # same size, other bytes: only the hash catches it
    assert verify_shard(tmp_path, entry, full=False) and not verify_shard(tmp_path, entry)
    path.unlink()
    assert not verify_shard(tmp_path, entry)
