"""common/config.py: every CLI's --help shows each field's help text as written."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from common.config import _leaf_fields, build_parser

# Every command-line entry point's config dataclass.
CLI_CONFIGS = [
    ("trainer.config", "TrainConfig"),
    ("data_prep.build_shards", "BuildConfig"),
    ("data_prep.synthetic", "SyntheticConfig"),
    ("eval.generate", "GenerateConfig"),
    ("eval.compare", "CompareConfig"),
    ("eval.report", "ReportConfig"),
    ("eval.ablation", "AblationConfig"),
    ("eval.cot_stats", "CotStatsConfig"),
    ("benchmarks.scaling", "ScalingConfig"),
    ("benchmarks.train_throughput", "BenchConfig"),
    ("benchmarks.generation", "GenBenchConfig"),
]


@pytest.mark.parametrize("module,name", CLI_CONFIGS)
def test_help_renders_every_field_verbatim(module, name):
    cls = getattr(importlib.import_module(module), name)
    text = " ".join(build_parser(cls).format_help().split())  # argparse re-wraps lines
    assert "option_strings" not in text, "a help string leaked argparse's %-formatting"
    for _, f, _ in _leaf_fields(cls):
        words = " ".join(f.metadata.get("help", "").split())
        # argparse may break a long word (a path) across lines: compare the first words only
        assert " ".join(words.split()[:6]) in text, f"{name}.{f.name}: help text not shown as written"


def test_a_percent_sign_in_help_is_shown_as_is():
    @dataclasses.dataclass
    class Cfg:
        slow: bool = dataclasses.field(default=False, metadata={"help": "about 30% slower, 100%% sure"})

    text = " ".join(build_parser(Cfg).format_help().split())
    assert "about 30% slower, 100%% sure (default: False)" in text and "option_strings" not in text
