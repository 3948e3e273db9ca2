"""The generation benchmark end to end on CPU (the program the lead runs on an H100, smaller)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import generation as gb


@pytest.fixture(scope="module")
def lm_dir(request, tmp_path_factory):
    try:
        import tiny_models.lm  # noqa: F401

        return Path(request.getfixturevalue("tiny_lm_dir"))
    except ImportError:  # local stand-in until tiny_models.lm lands
        from tests.test_model import make_tiny_lm_dir

        return make_tiny_lm_dir(tmp_path_factory.mktemp("bench_lm"))


def test_generation_benchmark_runs_both_ways(lm_dir, tmp_path):
    out = tmp_path / "bench.json"
    r = gb.main(["--model-path", str(lm_dir), "--num-summaries", "6", "--batch-size", "3",
                 "--max-new-tokens", "5", "--latent-dim", "16", "--lora-r", "4", "--device", "cpu",
                 "--no-repeat-ngram-size", "0", "--repetition-penalty", "1.0", "--out-json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["sequential"]["summaries"] == 6 and saved["batched"]["summaries"] == 6
    assert r["speedup"] == pytest.approx(r["batched"]["summaries_per_s"] / r["sequential"]["summaries_per_s"])
    # fp32 greedy: batching must not change what is generated.
    assert r["identical_outputs"] == "6/6"
