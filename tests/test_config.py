"""common/config.py: every CLI's --help shows each field's help text as written; config files and flags
are checked and converted by each field's declared type, errors naming the file and the key."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Literal, Optional

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
    ("benchmarks.multigpu.config", "ScalingConfig"),
    ("benchmarks.throughput.config", "BenchConfig"),
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


# ------------------------------------------------------------------------------------------------
# Values are checked and converted by their declared type, from files and flags alike

def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def _train_config(tmp_path, text: str, name: str = "config.yaml"):
    from common.config import load_config
    from trainer.config import TrainConfig

    return load_config(TrainConfig, _write(tmp_path, name, text))


@pytest.mark.parametrize("text,error", [
    ("optim:\n  weight_decay: lots\n", "optim.weight_decay: expected a float, got 'lots'"),
    ("weight_decay: lots\n", "optim.weight_decay: expected a float, got 'lots'"),  # a flat file, the same key
    ("lora_r: 8.7\n", "model.lora_r: expected an int, got 8.7 (not a whole number)"),
    ("lora_r: true\n", "model.lora_r: expected an int, got True"),
    ("lora_r: '8x'\n", "model.lora_r: expected an int, got '8x'"),
    ("lora_r:\n", "model.lora_r: expected an int, got null"),
    ("use_wandb: maybe\n", "logging.use_wandb: expected a boolean (true/false, yes/no, on/off), got 'maybe'"),
    ("use_wandb: 1\n", "logging.use_wandb: expected a boolean (true/false, yes/no, on/off), got 1"),
    ("engine: fsdp\n", "engine: expected one of 'deepspeed', 'torch', 'ddp', 'fsdp2'; got 'fsdp'"),
    ("debug_nan_at_steps: [1, x]\n", "debug_nan_at_steps[1]: expected an int, got 'x'"),
    ("lora_target_modules: q_proj\n", "model.lora_target_modules: expected a list, got 'q_proj'"),
    ("wandb_run_name: yes\n", "logging.wandb_run_name: expected a string, got True (YAML reads unquoted "
                               "yes/no/on/off/true/false as booleans: quote the value)"),
    ("optim: 5\n", "optim: expected a mapping of its fields"),
])
def test_a_config_file_value_of_the_wrong_type_names_the_file_and_the_key(tmp_path, text, error):
    with pytest.raises(ValueError) as info:
        _train_config(tmp_path, text)
    assert str(info.value) == f"{tmp_path / 'config.yaml'}: {error}" or (
        error.startswith("optim: ") and str(info.value).startswith(f"{tmp_path / 'config.yaml'}: {error}"))


def test_config_file_values_are_converted_to_their_declared_types(tmp_path):
    cfg = _train_config(tmp_path, "\n".join([
        "lr: 2e-5",                # YAML 1.1 reads this as a string
        "weight_decay: 0",         # an int for a float field
        "lora_r: 8.0",             # an integral float for an int field
        'use_wandb: "no"',         # a quoted YAML boolean word: false, not a truthy string
        "resume: yes",             # unquoted: YAML's boolean
        "distributed: 'On'",
        "cpu_affinity: off",       # YAML reads off as false; the choice "off" is meant
        "wandb_run_name: 42",      # a number for a string field, taken as written
        "debug_nan_at_steps: [3, 5.0]",
        "optim:",                  # a group with every field commented out
    ]) + "\n")
    assert cfg.optim.lr == 2e-5 and type(cfg.optim.lr) is float
    assert cfg.optim.weight_decay == 0.0 and type(cfg.optim.weight_decay) is float
    assert cfg.model.lora_r == 8 and type(cfg.model.lora_r) is int
    assert cfg.logging.use_wandb is False and cfg.checkpoint.resume is True and cfg.distributed is True
    assert cfg.cpu_affinity == "off" and cfg.logging.wandb_run_name == "42"
    assert cfg.debug_nan_at_steps == [3, 5] and all(type(s) is int for s in cfg.debug_nan_at_steps)


def test_every_bad_value_is_reported_at_once_as_a_config_error(tmp_path):
    from common.config import ConfigError

    with pytest.raises(ConfigError) as info:
        _train_config(tmp_path, "weight_decay: lots\nlora_r: 8.7\nuse_wandb: 'nope'\n")
    lines = str(info.value).splitlines()
    assert len(lines) == 3 and all(line.startswith(f"{tmp_path / 'config.yaml'}: ") for line in lines)
    assert issubclass(ConfigError, ValueError)


def test_optional_literal_dict_and_null_values():
    from common.config import from_dict

    @dataclasses.dataclass
    class Cfg:
        n: Optional[int] = 3
        mode: Literal["auto", "on", "off"] = "auto"
        extra: Optional[dict] = None
        names: list[str] = dataclasses.field(default_factory=list)

    cfg = from_dict(Cfg, {"n": None, "mode": True, "extra": {"a": 1}, "names": ["x", 2]})
    assert cfg == Cfg(n=None, mode="on", extra={"a": 1}, names=["x", "2"])
    with pytest.raises(ValueError, match=r"cfg\.json: extra: expected a mapping, got \[1\]"):
        from_dict(Cfg, {"extra": [1]}, source="cfg.json")
    with pytest.raises(ValueError, match="cfg.json: mode: expected one of 'auto', 'on', 'off'; got 'of'"):
        from_dict(Cfg, {"mode": "of"}, source="cfg.json")


def test_saved_configs_load_back_unchanged(tmp_path):
    """Every CLI's defaults survive save_config + load_config: valid configs are read as before."""
    from common.config import load_config, save_config

    for module, name in CLI_CONFIGS:
        cls = getattr(importlib.import_module(module), name)
        save_config(cls(), tmp_path / f"{name}.json")
        assert load_config(cls, tmp_path / f"{name}.json") == cls(), name


def test_a_syntax_error_names_the_file_and_the_line(tmp_path):
    with pytest.raises(ValueError, match=r"config\.yaml, line 2, column \d+: not valid YAML"):
        _train_config(tmp_path, "lr: 1e-4\n  weight_decay: [\n")
    with pytest.raises(ValueError, match=r"config\.json, line 2, column \d+: not valid JSON"):
        _train_config(tmp_path, '{"lr": 1e-4,\n "weight_decay": }', name="config.json")


def test_flags_and_files_share_the_converter(tmp_path, capsys):
    from common.config import parse_config
    from models.prefix_lm import ModelConfig

    for flag, value, error in [("--lora-r", "8.7", "expected an int, got '8.7' (not a whole number)"),
                               ("--lora-dropout", "lots", "expected a float, got 'lots'"),
                               ("--precision", "fp8", "expected one of 'auto', 'bf16', 'fp32'; got 'fp8'")]:
        with pytest.raises(SystemExit):
            parse_config(ModelConfig, [flag, value])
        assert f"argument {flag}: {error}" in capsys.readouterr().err
    assert parse_config(ModelConfig, ["--lora-r", "8", "--lora-dropout", "2e-1"]).lora_dropout == 0.2
    # A bad value in the file is an error even where a flag overrides it; the flag wins otherwise.
    path = _write(tmp_path, "run.yaml", "lora_r: 8.7\nlora_dropout: '0.1'\n")
    with pytest.raises(ValueError, match=r"run\.yaml: lora_r: expected an int"):
        parse_config(ModelConfig, ["--config", str(path), "--lora-r", "8"])
    path.write_text("lora_r: 16\nlora_dropout: '0.1'\n")
    cfg = parse_config(ModelConfig, ["--config", str(path), "--lora-r", "8"])
    assert cfg.lora_r == 8 and cfg.lora_dropout == 0.1
