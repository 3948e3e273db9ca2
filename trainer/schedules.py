"""Task schedules: which MTL task each training sample gets, epoch by epoch.

A schedule is a list of phases; a phase runs for a number of epochs with fixed task probabilities:

| --schedule        | phases                                                                        |
|-------------------|-------------------------------------------------------------------------------|
| `uniform`         | one phase of --num-epochs, equal probabilities over A/B/C (+D with --text-summary) |
| `summary_centric` | `warmup` (A+C, 0.5/0.5) for --warmup-epochs, then `main` with the --prob-* values  |
|                   | for --main-epochs                                                             |
| `phased`          | the phases of a YAML file (--phases), e.g. docs/examples/phased.yaml           |

The task of a sample is `sample_task(phase.probs, seed, epoch, key)`: a pure function of the seed,
the epoch and the sample's key. It draws no random state, so it does not depend on the number of
ranks or data-loader workers, on the order samples arrive in, or on where a run was resumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping

import yaml

from common.io import stable_hash
from models.tasks import TASKS

PROB_TOLERANCE = 1e-6


class ScheduleError(ValueError):
    """A schedule setting or phases file is invalid; the message names the flag or file and field."""


@dataclass
class ScheduleConfig:
    schedule: Literal["uniform", "summary_centric", "phased"] = field(default="uniform", metadata={
        "help": "task schedule: uniform (equal task mix), summary_centric (A+C warm-up, then the "
                "--prob-* mix) or phased (phases from the --phases YAML file)"})
    num_epochs: int = field(default=1, metadata={"help": "epochs of the uniform schedule"})
    warmup_epochs: int = field(default=1, metadata={"help": "summary_centric: epochs of the A+C warm-up phase"})
    main_epochs: int = field(default=1, metadata={"help": "summary_centric: epochs of the summary-heavy main phase"})
    prob_summary: float = field(default=0.7, metadata={"help": "summary_centric main phase: probability of task B (image -> summary)"})
    prob_caption: float = field(default=0.15, metadata={"help": "summary_centric main phase: probability of task A (caption)"})
    prob_cot: float = field(default=0.15, metadata={"help": "summary_centric main phase: probability of task C (CoT link)"})
    prob_text_summary: float = field(default=0.0, metadata={"help": "summary_centric main phase: probability of task D (captions -> summary; needs --text-summary)"})
    text_summary: bool = field(default=False, metadata={"help": "enable task D (all captions of a case -> summary); in uniform it joins the mix"})
    phases: str = field(default="", metadata={"help": "phased: YAML file with a list of {name, epochs, probs: {caption, summary, cot, text_summary}}"})

    def validate(self) -> None:
        build_phases(self)


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    probs: dict[str, float]  # every task of TASKS, in TASKS order; zero = not trained in this phase

    @property
    def tasks(self) -> list[str]:
        return [t for t in TASKS if self.probs.get(t, 0.0) > 0]


# ----------------------------------------------------------------------------------------------
# Building and checking phases


def make_phase(name: str, epochs, probs: Mapping, text_summary: bool, where: str) -> Phase:
    """A checked Phase; `where` names the source (flag or file + phase) in error messages."""
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ScheduleError(f"{where}: epochs must be an integer >= 1, got {epochs!r}")
    if not isinstance(probs, Mapping) or not probs:
        raise ScheduleError(f"{where}: probs must be a non-empty mapping of task -> probability, got {probs!r}")
    unknown = sorted(set(probs) - set(TASKS))
    if unknown:
        raise ScheduleError(f"{where}: unknown task(s) {unknown}; known: {list(TASKS)}")
    clean = {}
    for task in TASKS:
        p = probs.get(task, 0.0)
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not math.isfinite(p) or p < 0:
            raise ScheduleError(f"{where}: probability of {task} must be a number >= 0, got {p!r}")
        clean[task] = float(p)
    total = sum(clean.values())
    if abs(total - 1.0) > PROB_TOLERANCE:
        raise ScheduleError(f"{where}: task probabilities must sum to 1, got {total:.6g} ({clean})")
    if clean["text_summary"] > 0 and not text_summary:
        raise ScheduleError(f"{where}: text_summary has probability {clean['text_summary']} but task D "
                            "is disabled; pass --text-summary to enable it")
    return Phase(name, epochs, clean)


def _uniform(cfg: ScheduleConfig) -> list[Phase]:
    tasks = [t for t in TASKS if t != "text_summary" or cfg.text_summary]
    return [make_phase("uniform", cfg.num_epochs, {t: 1.0 / len(tasks) for t in tasks}, cfg.text_summary,
                       "--num-epochs")]


def _summary_centric(cfg: ScheduleConfig) -> list[Phase]:
    main = {"caption": cfg.prob_caption, "summary": cfg.prob_summary, "cot": cfg.prob_cot,
            "text_summary": cfg.prob_text_summary}
    return [make_phase("warmup", cfg.warmup_epochs, {"caption": 0.5, "cot": 0.5}, cfg.text_summary,
                       "summary_centric warm-up (--warmup-epochs)"),
            make_phase("main", cfg.main_epochs, main, cfg.text_summary,
                       "summary_centric main phase (--main-epochs, --prob-*)")]


def load_phases(path: str | Path, text_summary: bool) -> list[Phase]:
    """Phases from a YAML file: a list (or {phases: list}) of {name, epochs, probs}."""
    path = Path(path)
    if not path.is_file():
        raise ScheduleError(f"--phases: file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ScheduleError(f"{path}: not valid YAML: {e}") from None
    if isinstance(data, dict) and "phases" in data:
        data = data["phases"]
    if not isinstance(data, list) or not data:
        raise ScheduleError(f"{path}: expected a non-empty list of phases {{name, epochs, probs}}")
    phases = []
    for i, entry in enumerate(data):
        where = f"{path}: phases[{i}]"
        if not isinstance(entry, dict):
            raise ScheduleError(f"{where}: expected a mapping with name, epochs, probs")
        unknown = sorted(set(entry) - {"name", "epochs", "probs"})
        if unknown:
            raise ScheduleError(f"{where}: unknown field(s) {unknown}; expected name, epochs, probs")
        for key in ("epochs", "probs"):
            if key not in entry:
                raise ScheduleError(f"{where}: missing field {key!r}")
        name = str(entry.get("name") or f"phase{i}")
        phases.append(make_phase(name, entry["epochs"], entry["probs"], text_summary, f"{where} ({name})"))
    return phases


def build_phases(cfg: ScheduleConfig) -> list[Phase]:
    if cfg.schedule == "uniform":
        return _uniform(cfg)
    if cfg.schedule == "summary_centric":
        return _summary_centric(cfg)
    if cfg.schedule == "phased":
        if not cfg.phases:
            raise ScheduleError("--schedule phased needs --phases <file.yaml> (see docs/examples/phased.yaml)")
        return load_phases(cfg.phases, cfg.text_summary)
    raise ScheduleError(f"--schedule: unknown schedule {cfg.schedule!r}; known: uniform, summary_centric, phased")


def total_epochs(phases: list[Phase]) -> int:
    return sum(p.epochs for p in phases)


def phase_at(phases: list[Phase], epoch: int) -> Phase:
    """The phase that epoch `epoch` (0-based) belongs to."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    end = 0
    for phase in phases:
        end += phase.epochs
        if epoch < end:
            return phase
    raise ValueError(f"epoch {epoch} is past the schedule's {end} epoch(s)")


def enabled_tasks(phases: list[Phase]) -> list[str]:
    """Tasks trained in at least one phase, in TASKS order."""
    return [t for t in TASKS if any(p.probs.get(t, 0.0) > 0 for p in phases)]


# ----------------------------------------------------------------------------------------------
# Sampling


def sample_task(probs: Mapping[str, float], seed: int, epoch: int, key: str) -> str:
    """The task of sample `key` in `epoch`: a stable hash of (seed, epoch, key) mapped to [0, 1)
    and looked up in the cumulative probabilities (in TASKS order, so dict order never matters)."""
    u = stable_hash(f"task/{seed}/{epoch}/{key}") / 2.0**64
    chosen, cumulative = None, 0.0
    for task in TASKS:
        p = probs.get(task, 0.0)
        if p <= 0:
            continue
        chosen = task  # the last task with p > 0 also absorbs float round-off near u = 1
        cumulative += p
        if u < cumulative:
            return task
    if chosen is None:
        raise ValueError(f"no task has a positive probability in {dict(probs)}")
    return chosen
