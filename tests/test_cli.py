"""Expected failures end every program with one clear message and a non-zero exit, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from common.cli import cli_main
from common.config import ConfigError
from trainer import train

REPO = Path(__file__).resolve().parents[1]


def test_bad_config_value_is_one_message_and_exit_1(tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text("optim:\n  weight_decay: lots\n")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", str(bad)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "error:" in err and "run.yaml" in err and "optim.weight_decay" in err and "lots" in err
    assert "Traceback" not in err


def test_debug_keeps_the_traceback(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("optim:\n  weight_decay: lots\n")
    with pytest.raises(ConfigError, match="weight_decay"):
        train.main(["--config", str(bad), "--debug"])


def test_a_bug_is_not_hidden():
    @cli_main
    def main(argv):
        raise KeyError("a real bug")

    with pytest.raises(KeyError):
        main([])


def test_missing_file_from_the_command_line(tmp_path):
    """The real entry point, as a user runs it: `python -m eval.generate` with a checkpoint that isn't there."""
    proc = subprocess.run([sys.executable, "-m", "eval.generate", "--checkpoint-dir", str(tmp_path / "nope"),
                           "--shard-dir", str(tmp_path), "--output-path", str(tmp_path / "gen.jsonl")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "nope" in proc.stderr and "error:" in proc.stderr
    assert "Traceback" not in proc.stderr
