"""Score generations and report them (the spec's eval_simple): tables, CSV, plots.

    python -m eval.report --generations gen/pretrained.jsonl gen/uniform.jsonl gen/summary_centric.jsonl \
        --metric embedding --max-samples 200 --out-dir eval_out --plot-path eval_out/eval_plot.png

Models are the `model` field of the records (a file may hold several). Only samples that every
model answered are compared (paired by case, element and task), so means and win rates are over
the same cases. Every file must hold records: an empty or unreadable file is an error naming it
(never a model silently left out); a torn last line (a generation run killed mid-write) is skipped
with a warning naming file and line, and listed in the output; a malformed line before the last is
an error naming file and line. Writes into --out-dir: `scores.jsonl` (one line per model x sample), `summary.md`
and `summary.csv` (mean, median, 95% bootstrap CI of the mean, pairwise win rates), the plot, and
the config.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np

from common.cli import cli_main
from common.config import parse_config, print_config, save_config
from common.io import atomic_path, atomic_write_text, read_jsonl_checked
from eval.judge import JudgeCache, LocalHFJudge, OpenAIJudge, judge_all
from eval.scores import EmbeddingScorer

METRICS = ("embedding", "judge")


@dataclass
class JudgeConfig:
    judge_base_url: Optional[str] = field(default=None, metadata={"help": "OpenAI-compatible base URL (.../v1)"})
    judge_model: str = field(default="gpt-4o-mini", metadata={"help": "judge model name at that URL"})
    judge_api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "env var holding the API key"})
    judge_model_path: Optional[str] = field(default=None, metadata={"help": "local HF judge model instead"})
    judge_cache: Optional[str] = field(default=None, metadata={"help": "cache file (default <out-dir>/judge_cache.jsonl)"})
    judge_timeout_s: float = field(default=60.0, metadata={"help": "per-request timeout"})
    judge_max_retries: int = field(default=4, metadata={"help": "retries on timeout/429/5xx"})
    judge_max_total_s: float = field(default=3600.0, metadata={"help": "total time budget for judging"})
    judge_threads: int = field(default=4, metadata={"help": "concurrent judge requests"})


@dataclass
class ReportConfig:
    """Score generations (embedding similarity and/or LLM judge) and write tables and plots."""

    generations: list[str] = field(default_factory=list, metadata={"help": "generation JSONL files"})
    metric: Literal["embedding", "judge", "both"] = field(default="embedding", metadata={"help": "scores"})
    max_samples: int = field(default=0, metadata={"help": "paired samples scored (0 = all)"})
    num_print_samples: int = field(default=3, metadata={"help": "samples printed side by side"})
    out_dir: str = field(default="eval_out", metadata={"help": "output directory"})
    plot_path: Optional[str] = field(default=None, metadata={"help": "plot file (default <out-dir>/eval_plot.png)"})
    embedding_model: Optional[str] = field(default=None, metadata={"help": "local sentence-transformers folder"})
    embedding_device: str = field(default="cpu", metadata={"help": "device of the embedding model"})
    num_bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples for CIs"})
    seed: int = field(default=0, metadata={"help": "bootstrap seed"})
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def validate(self) -> None:
        if not self.generations:
            raise ValueError("--generations: give at least one JSONL file")
        for p in self.generations:
            if not Path(p).exists():
                raise FileNotFoundError(f"{p}: generations file not found")
        if self.metric in ("judge", "both") and not (self.judge.judge_base_url or self.judge.judge_model_path):
            raise ValueError("--metric judge needs --judge-base-url or --judge-model-path")

    @property
    def metrics(self) -> tuple[str, ...]:
        return METRICS if self.metric == "both" else (self.metric,)


# ---------------------------------------------------------------------------------------- stats
def bootstrap_ci(values: Sequence[float], num_bootstrap: int = 2000, alpha: float = 0.05,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(num_bootstrap, x.size))].mean(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def win_rate(a: Sequence[float], b: Sequence[float]) -> float:
    """Share of paired samples where a scores higher than b; ties count half."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"win rate needs paired scores, got {a.shape} and {b.shape}")
    if a.size == 0:
        return float("nan")
    return float(((a > b).sum() + 0.5 * (a == b).sum()) / a.size)


def summarize(scores: dict[str, list[float]], num_bootstrap: int = 2000, seed: int = 0) -> list[dict]:
    rows = []
    for name, vals in scores.items():
        lo, hi = bootstrap_ci(vals, num_bootstrap, seed=seed)
        rows.append({"model": name, "n": len(vals), "mean": float(np.mean(vals)) if vals else float("nan"),
                     "median": float(np.median(vals)) if vals else float("nan"), "ci_low": lo, "ci_high": hi})
    return rows


def win_rates(scores: dict[str, list[float]]) -> dict[tuple[str, str], float]:
    return {(a, b): win_rate(scores[a], scores[b]) for a, b in itertools.permutations(scores, 2)}


# ----------------------------------------------------------------------------------------- data
def load_generations(paths: Sequence[str], dropped: Optional[dict[str, int]] = None) -> dict[str, dict[tuple, dict]]:
    """{model: {(case_id, element, task): record}}; a model appearing in two files is an error.

    A file without records (empty, or only a torn line) is an error naming it. A torn last line is
    skipped with a warning on stderr and recorded in `dropped` ({path: line number}); any other
    malformed line is an error naming file and line.
    """
    by_model: dict[str, dict[tuple, dict]] = {}
    origin: dict[str, str] = {}
    for p in paths:
        contents = read_jsonl_checked(p)
        if contents.torn_line is not None:
            print(f"[report] warning: {p}: line {contents.torn_line} is an incomplete record (a generation "
                  "run killed mid-write?); skipped", file=sys.stderr, flush=True)
            if dropped is not None:
                dropped[str(p)] = contents.torn_line
        if not contents.records:
            what = "only an incomplete line" if contents.torn_line is not None else "an empty file"
            raise ValueError(f"{p}: no generation records ({what}); regenerate it (python -m eval.generate "
                             "resumes) or leave it out of --generations")
        for line, r in zip(contents.line_numbers, contents.records):
            if not isinstance(r, dict):
                raise ValueError(f"{p}: line {line} is not a JSON object")
            missing = [k for k in ("case_id", "element", "task", "generation", "reference") if k not in r]
            if missing:
                raise ValueError(f"{p}: line {line} lacks field(s) {missing}")
            name = r.get("model") or Path(p).stem
            if name in origin and origin[name] != p:
                raise ValueError(f"model {name!r} appears in {origin[name]} and {p}; rename one (--model-name)")
            origin[name] = p
            by_model.setdefault(name, {})[(str(r["case_id"]), int(r["element"]), r["task"])] = r
    return by_model


def paired_keys(by_model: dict[str, dict[tuple, dict]], max_samples: int = 0) -> tuple[list[tuple], dict]:
    """Keys every model has and whose reference is non-empty, in a stable order; plus skip counts."""
    common = set.intersection(*(set(v) for v in by_model.values())) if by_model else set()
    skips = {"not_in_every_model": len(set().union(*(set(v) for v in by_model.values())) - common)
             if by_model else 0, "empty_reference": 0}
    first = next(iter(by_model.values()), {})
    keys = []
    for k in sorted(common):
        if not str(first[k].get("reference", "")).strip():
            skips["empty_reference"] += 1
            continue
        keys.append(k)
    if max_samples:
        keys = keys[:max_samples]
    return keys, skips


def score_embedding(by_model, keys, cfg: ReportConfig) -> dict[str, list[float]]:
    scorer = EmbeddingScorer(cfg.embedding_model, device=cfg.embedding_device)
    return {m: scorer.score([recs[k]["reference"] for k in keys], [recs[k]["generation"] for k in keys])
            for m, recs in by_model.items()}


def make_judge(jc: JudgeConfig, out_dir: Path):
    cache = JudgeCache(jc.judge_cache or out_dir / "judge_cache.jsonl")
    if jc.judge_model_path:
        return LocalHFJudge(jc.judge_model_path, cache=cache)
    return OpenAIJudge(jc.judge_base_url, jc.judge_model, jc.judge_api_key_env, timeout_s=jc.judge_timeout_s,
                       max_retries=jc.judge_max_retries, max_total_s=jc.judge_max_total_s, cache=cache)


def score_judge(by_model, keys, cfg: ReportConfig, out_dir: Path) -> tuple[dict[str, list[Optional[float]]], dict]:
    judge = make_judge(cfg.judge, out_dir)
    scores, failures = {}, {}
    for m, recs in by_model.items():
        s, f = judge_all(judge, [recs[k]["reference"] for k in keys], [recs[k]["generation"] for k in keys],
                         num_threads=cfg.judge.judge_threads)
        scores[m] = s
        failures[m] = f
    return scores, failures


# -------------------------------------------------------------------------------------- outputs
def _fmt(x: float) -> str:
    return "nan" if x != x else f"{x:.4f}"


def summary_tables(results: dict[str, dict[str, list[float]]], num_bootstrap: int, seed: int, skips: dict,
                   failures: dict, dropped: Optional[dict[str, int]] = None) -> tuple[str, str, list[dict]]:
    """(markdown, csv, rows) for every metric: summary rows plus the pairwise win-rate matrix."""
    md = ["# Evaluation summary", ""]
    rows_all = []
    for metric, scores in results.items():
        rows = summarize(scores, num_bootstrap, seed)
        rates = win_rates(scores)
        md += [f"## {metric}", "", "| model | n | mean | median | 95% CI | "
               + " | ".join(f"win vs {m}" for m in scores) + " |",
               "|---|---|---|---|---|" + "---|" * len(scores)]
        for r in rows:
            r["metric"] = metric
            for other in scores:
                r[f"win_vs_{other}"] = rates.get((r["model"], other), float("nan"))
            wins = " | ".join("–" if o == r["model"] else _fmt(r[f"win_vs_{o}"]) for o in scores)
            md.append(f"| {r['model']} | {r['n']} | {_fmt(r['mean'])} | {_fmt(r['median'])} | "
                      f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}] | {wins} |")
            rows_all.append(r)
        if failures.get(metric):
            md += ["", f"Judge failures (not scored): {failures[metric]}"]
        md.append("")
    md += [f"Skipped samples: {skips}", ""]
    if dropped:
        md += ["Incomplete last lines skipped (a generation run killed mid-write): "
               + "; ".join(f"{p} line {n}" for p, n in dropped.items()), ""]
    md += ["Win rate: share of paired samples where the row model "
           "scores higher than the column model (ties count half). CI: percentile bootstrap of the mean.", ""]
    fields = ["metric", "model", "n", "mean", "median", "ci_low", "ci_high"]
    fields += sorted({k for r in rows_all for k in r if k.startswith("win_vs_")})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, restval="")
    writer.writeheader()
    for r in rows_all:
        writer.writerow({k: r.get(k, "") for k in fields})
    return "\n".join(md), buf.getvalue(), rows_all


def plot_scores(results: dict[str, dict[str, list[float]]], path: str | Path) -> None:
    """Per metric: score distributions (violin + points) and per-sample scores of every model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(13, 4.2 * len(results)), squeeze=False)
    for row, (metric, scores) in enumerate(results.items()):
        names = list(scores)
        ax = axes[row][0]
        data = [np.asarray(scores[n], dtype=float) for n in names]
        if all(d.size > 1 for d in data):
            ax.violinplot(data, showmeans=True, showmedians=False)
        for i, d in enumerate(data, start=1):
            jitter = np.random.default_rng(i).uniform(-0.08, 0.08, d.size)
            ax.scatter(np.full(d.size, i) + jitter, d, s=8, alpha=0.5)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=15)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric}: distribution per model")
        ax = axes[row][1]
        for n, d in zip(names, data):
            ax.plot(np.arange(d.size), d, marker="o", ms=3, lw=1, label=n)
        ax.set_xlabel("sample")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric}: per-sample scores")
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=110)
    plt.close(fig)


def write_scores_jsonl(path: Path, by_model, keys, results) -> None:
    lines = []
    for m, recs in by_model.items():
        for i, k in enumerate(keys):
            rec = {"model": m, "case_id": k[0], "element": k[1], "task": k[2]}
            rec.update({metric: scores[m][i] for metric, scores in results.items()})
            lines.append(json.dumps(rec))
    atomic_write_text(path, "\n".join(lines) + "\n")


def print_side_by_side(by_model, keys, n: int, width: int = 300) -> None:
    for k in keys[:n]:
        first = next(iter(by_model.values()))[k]
        print(f"=== case {k[0]} element {k[1]} | {k[2]}\nREFERENCE: {first['reference'][:width]}")
        for m, recs in by_model.items():
            print(f"[{m}] {recs[k]['generation'][:width]}")


def run_report(cfg: ReportConfig) -> dict:
    """Score, tabulate and plot; returns {"rows", "skips", "dropped_lines", "failures", "paths"}."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dropped: dict[str, int] = {}
    by_model = load_generations(cfg.generations, dropped)
    keys, skips = paired_keys(by_model, cfg.max_samples)
    if not keys:
        raise ValueError(f"no sample is present in every model's generations ({list(by_model)}); skips: {skips}")
    print(f"[report] {len(by_model)} model(s) x {len(keys)} paired sample(s); skipped {skips}"
          + (f"; {len(dropped)} incomplete last line(s) skipped: {dropped}" if dropped else ""))
    print_side_by_side(by_model, keys, cfg.num_print_samples)
    results: dict[str, dict[str, list[float]]] = {}
    failures: dict[str, dict] = {}
    if "embedding" in cfg.metrics:
        results["embedding"] = score_embedding(by_model, keys, cfg)
    if "judge" in cfg.metrics:
        raw, fails = score_judge(by_model, keys, cfg, out_dir)
        # Compare only samples every model got a judge score for, so the stats stay paired.
        ok = [i for i in range(len(keys)) if all(raw[m][i] is not None for m in raw)]
        results["judge"] = {m: [raw[m][i] for i in ok] for m in raw}
        failures["judge"] = {m: f for m, f in fails.items() if f}
    md, csv_text, rows = summary_tables(results, cfg.num_bootstrap, cfg.seed, skips, failures, dropped)
    paths = {"md": out_dir / "summary.md", "csv": out_dir / "summary.csv", "scores": out_dir / "scores.jsonl",
             "plot": Path(cfg.plot_path) if cfg.plot_path else out_dir / "eval_plot.png"}
    atomic_write_text(paths["md"], md)
    atomic_write_text(paths["csv"], csv_text)
    if "judge" not in results or all(len(v) == len(keys) for v in results["judge"].values()):
        write_scores_jsonl(paths["scores"], by_model, keys, results)
    else:
        write_scores_jsonl(paths["scores"], by_model, keys, {k: v for k, v in results.items() if k != "judge"})
    plot_scores(results, paths["plot"])
    print(md)
    return {"rows": rows, "skips": skips, "dropped_lines": dropped, "failures": failures, "paths": paths}


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_config(ReportConfig, argv)
    print_config(cfg)
    save_config(cfg, Path(cfg.out_dir) / "report_config.json")
    run_report(cfg)


if __name__ == "__main__":
    main()
