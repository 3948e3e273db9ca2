"""The shard directory loads as a standard Hugging Face dataset (`datasets`' webdataset builder), for
inspection: one row per sample, the meta and arrays equal to what data_prep.shard_format decodes."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from data_prep.manifest import load_manifest
from data_prep.shard_format import decode_sample, encode_sample

datasets = pytest.importorskip("datasets")


def raw_sample(shard_path: str, key: str) -> dict:
    """One sample straight from the tar (ext -> bytes), as webdataset hands it to decode_sample."""
    raw = {"__key__": key, "__url__": shard_path}
    with tarfile.open(shard_path) as tar:
        for member in tar.getmembers():
            k, _, ext = member.name.partition(".")
            if k == key:
                raw[ext] = tar.extractfile(member).read()
    return raw


def test_shards_load_with_hf_datasets(shard_dir_k1, tmp_path):
    manifest = load_manifest(shard_dir_k1)
    paths = manifest.shard_paths("train")
    assert len(paths) > 1  # several shards make one split
    ds = datasets.load_dataset("webdataset", data_files={"train": paths}, split="train",
                               cache_dir=str(tmp_path / "hf_cache"))

    assert ds.num_rows == manifest.num_samples("train") == manifest.split_counts["train"]["num_samples"]
    assert len(set(ds["__key__"])) == ds.num_rows
    assert set(ds.column_names) == {"__key__", "__url__", "json", "latent.npy", "cls.npy", "tokens.npy"}

    # HF decodes by extension: the json to a dict, each .npy to (nested) lists of its float16 values
    row = ds[ds.num_rows // 2]
    s = decode_sample(raw_sample(row["__url__"], row["__key__"]))
    assert row["__key__"] == s.key
    assert row["json"] == json.loads(encode_sample(s)["json"])  # every meta field, as decode_sample reads it
    assert (row["json"]["case_id"], row["json"]["element_index"]) == (s.case_id, s.element_index)
    assert ds.features["latent.npy"].feature.dtype == "float16"
    for col, want in (("latent.npy", s.latent), ("cls.npy", s.cls_logits), ("tokens.npy", s.block_tokens)):
        got = np.asarray(row[col], dtype=np.float16)
        assert got.shape == want.shape and np.array_equal(got, want), col

    # with_format("numpy"): arrays, upcast to float32 (the same values)
    arr = ds.with_format("numpy")[ds.num_rows // 2]
    assert arr["latent.npy"].dtype == np.float32 and arr["tokens.npy"].shape == s.block_tokens.shape
    np.testing.assert_array_equal(arr["latent.npy"], s.latent.astype(np.float32))
