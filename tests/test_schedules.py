"""Task schedules: phases, validation, and the pure per-sample task draw."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from common.config import parse_config
from models.tasks import TASKS
from trainer.schedules import (
    Phase,
    ScheduleConfig,
    ScheduleError,
    build_phases,
    enabled_tasks,
    load_phases,
    phase_at,
    sample_task,
    total_epochs,
)

KEYS = [f"case{i:05d}__e{i % 20:02d}" for i in range(6000)]


def assert_frequencies_match(probs: dict, seed: int = 0, epoch: int = 0) -> None:
    counts = Counter(sample_task(probs, seed, epoch, k) for k in KEYS)
    n = len(KEYS)
    assert set(counts) <= {t for t, p in probs.items() if p > 0}
    for task in TASKS:
        p = probs.get(task, 0.0)
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[task] - n * p) <= 3 * sigma + 1, (task, counts[task], n * p)


def test_uniform_phase_and_frequencies():
    (phase,) = build_phases(ScheduleConfig(num_epochs=3))
    assert phase.epochs == 3 and phase.tasks == ["caption", "summary", "cot"]
    assert phase.probs["caption"] == pytest.approx(1 / 3) and phase.probs["text_summary"] == 0
    assert_frequencies_match(phase.probs)


def test_uniform_with_text_summary_has_four_tasks():
    (phase,) = build_phases(ScheduleConfig(text_summary=True))
    assert phase.tasks == list(TASKS)
    assert_frequencies_match(phase.probs, seed=3)


def test_summary_centric_phases_and_frequencies():
    cfg = ScheduleConfig(schedule="summary_centric", warmup_epochs=2, main_epochs=3)
    warmup, main = build_phases(cfg)
    assert (warmup.name, warmup.epochs, warmup.tasks) == ("warmup", 2, ["caption", "cot"])
    assert main.epochs == 3 and main.probs["summary"] == pytest.approx(0.7)
    assert total_epochs([warmup, main]) == 5
    assert [phase_at([warmup, main], e).name for e in range(5)] == ["warmup"] * 2 + ["main"] * 3
    with pytest.raises(ValueError, match="past the schedule"):
        phase_at([warmup, main], 5)
    assert_frequencies_match(warmup.probs, seed=1, epoch=0)
    assert_frequencies_match(main.probs, seed=1, epoch=2)


def test_sample_task_is_deterministic_and_depends_on_seed_and_epoch():
    probs = build_phases(ScheduleConfig())[0].probs
    first = [sample_task(probs, 7, 0, k) for k in KEYS[:500]]
    assert first == [sample_task(dict(reversed(list(probs.items()))), 7, 0, k) for k in KEYS[:500]]
    other_epoch = [sample_task(probs, 7, 1, k) for k in KEYS[:500]]
    other_seed = [sample_task(probs, 8, 0, k) for k in KEYS[:500]]
    # About 2/3 of the draws change when the seed or epoch does.
    assert sum(a != b for a, b in zip(first, other_epoch)) > 200
    assert sum(a != b for a, b in zip(first, other_seed)) > 200


def test_single_task_probability_one():
    assert {sample_task({"summary": 1.0}, 0, 0, k) for k in KEYS[:200]} == {"summary"}


@pytest.mark.parametrize("cfg, match", [
    (ScheduleConfig(schedule="summary_centric", prob_summary=0.8), "sum to 1"),
    (ScheduleConfig(schedule="summary_centric", prob_summary=0.85, prob_caption=-0.15, prob_cot=0.3), ">= 0"),
    (ScheduleConfig(schedule="summary_centric", prob_summary=0.6, prob_text_summary=0.1), "--text-summary"),
    (ScheduleConfig(num_epochs=0), "epochs must be an integer >= 1"),
    (ScheduleConfig(schedule="summary_centric", warmup_epochs=0), "warm-up"),
    (ScheduleConfig(schedule="phased"), "needs --phases"),
    (ScheduleConfig(schedule="phased", phases="/nonexistent/phases.yaml"), "not found"),
])
def test_validation_errors(cfg, match):
    with pytest.raises(ScheduleError, match=match):
        cfg.validate()


def test_text_summary_in_summary_centric_when_enabled():
    cfg = ScheduleConfig(schedule="summary_centric", prob_summary=0.6, prob_text_summary=0.1, text_summary=True)
    _, main = build_phases(cfg)
    assert main.tasks == list(TASKS)
    assert_frequencies_match(main.probs, seed=5, epoch=1)


@pytest.mark.parametrize("name", ["phased.yaml", "captions_first.yaml"])
def test_shipped_phased_examples_parse(repo_root, name):
    path = repo_root / "docs/examples" / name
    phases = build_phases(ScheduleConfig(schedule="phased", phases=str(path)))
    assert len(phases) >= 2 and all(isinstance(p, Phase) for p in phases)
    assert total_epochs(phases) == sum(p.epochs for p in phases)
    assert enabled_tasks(phases) == ["caption", "summary", "cot"]


def test_phased_yaml_and_its_errors(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("phases:\n"
                    "  - {name: a, epochs: 2, probs: {caption: 1.0}}\n"
                    "  - {name: b, epochs: 1, probs: {summary: 0.5, text_summary: 0.5}}\n")
    phases = load_phases(good, text_summary=True)
    assert [(p.name, p.epochs, p.tasks) for p in phases] == [("a", 2, ["caption"]), ("b", 1, ["summary", "text_summary"])]
    assert phase_at(phases, 2).name == "b"

    with pytest.raises(ScheduleError, match=r"good.yaml: phases\[1\].*--text-summary"):
        load_phases(good, text_summary=False)
    cases = {
        "- {name: a, epochs: 1, probs: {captions: 1.0}}\n": r"phases\[0\].*unknown task.*captions",
        "- {name: a, epochs: 1, probs: {caption: 0.5, cot: 0.4}}\n": "sum to 1",
        "- {name: a, epochs: 0, probs: {caption: 1.0}}\n": "epochs must be",
        "- {name: a, probs: {caption: 1.0}}\n": "missing field 'epochs'",
        "- {name: a, epochs: 1, probs: {caption: 1.0}, lr: 3}\n": "unknown field",
        "{}\n": "non-empty list",
        "- [unclosed\n": "not valid YAML",
    }
    for i, (text, match) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.yaml"
        bad.write_text(text)
        with pytest.raises(ScheduleError, match=match):
            load_phases(bad, text_summary=False)


def test_schedule_flags_parse():
    cfg = parse_config(ScheduleConfig, ["--schedule", "summary_centric", "--warmup-epochs", "2", "--prob-summary",
                                        "0.5", "--prob-caption", "0.25", "--prob-cot", "0.25"])
    assert [p.epochs for p in build_phases(cfg)] == [2, 1]
    with pytest.raises(ScheduleError):
        parse_config(ScheduleConfig, ["--schedule", "summary_centric", "--prob-summary", "0.5"])
