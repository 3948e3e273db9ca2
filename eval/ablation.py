"""Does the image matter? One checkpoint, three image inputs, paired comparisons.

    python -m eval.ablation --checkpoint-dir runs/uniform/final --base-model-path /models/mistral-7b \
        --shard-dir shards --num-samples 100 --out-dir ablation_out

Variants (same cases, same prompts, same decoding):
* `true`     — each case's own Stage1 latent (the normal model);
* `shuffled` — latents (and block tokens) of another case, a seeded derangement; the image type
               (class embedding, and the text of the prompt) stays the case's own, so only the
               image content is wrong;
* `zero`     — every image-prefix embedding set to 0.

Reported per variant: embedding similarity of the generation to the reference, and the held-out
target loss (mean NLL of the reference under teacher forcing). The loss is far more sensitive than
generations for small or briefly trained models. Differences to `true` are paired per case, with
95% bootstrap CIs; a CI that excludes 0 means the image input changes the model's output.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np

from common.cli import cli_main
from common.config import parse_config, print_config, save_config
from common.io import atomic_write_json, atomic_write_text
from common.runtime import seed_everything
from eval.generate import GenerationGroups, load_cases, load_model, run_generation
from eval.inputs import EvalCase
from eval.modeling import PREFIX_MODES, target_losses
from eval.report import bootstrap_ci
from eval.scores import EmbeddingScorer
from models.tasks import TASKS


@dataclass
class AblationConfig(GenerationGroups):
    """Same checkpoint with true, shuffled and zero image prefixes."""

    task: Literal[TASKS] = field(default="summary", metadata={"help": "task evaluated (an image task)"})  # type: ignore[valid-type]
    variants: list[str] = field(default_factory=lambda: list(PREFIX_MODES), metadata={"help": "true shuffled zero"})
    out_dir: str = field(default="ablation_out", metadata={"help": "output directory"})
    generate: bool = field(default=True, metadata={"help": "generate and score (else: loss only)"})
    compute_loss: bool = field(default=True, metadata={"help": "held-out target loss per variant"})
    max_seq_len: int = field(default=0, metadata={"help": "loss truncation (0 = the checkpoint's, else 512)"})
    embedding_model: Optional[str] = field(default=None, metadata={"help": "local sentence-transformers folder"})
    num_bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples"})
    seed: int = field(default=0, metadata={"help": "seed of the shuffle and the bootstrap"})

    def validate(self) -> None:
        super().validate()
        if self.model_cfg.model != "stage2":
            raise ValueError("the ablation needs a Stage2 checkpoint (--checkpoint-dir)")
        if self.task == "text_summary":
            raise ValueError("task text_summary uses no image: nothing to ablate")
        bad = sorted(set(self.variants) - set(PREFIX_MODES))
        if bad or "true" not in self.variants:
            raise ValueError(f"--variants must include 'true' and only {PREFIX_MODES}; got {self.variants}")


def shuffled_donors(cases: Sequence[EvalCase], seed: int) -> dict[tuple, EvalCase]:
    """{case.key: the case with another case's latent}: a seeded derangement (nobody keeps its own)."""
    if len(cases) < 2:
        raise ValueError("the shuffled variant needs at least 2 cases")
    order = np.random.default_rng(seed).permutation(len(cases))
    donor_of = {int(order[i]): int(order[(i + 1) % len(order)]) for i in range(len(order))}
    return {c.key: dataclasses.replace(c, latent=cases[donor_of[i]].latent,
                                       block_tokens=cases[donor_of[i]].block_tokens)
            for i, c in enumerate(cases)}


def paired_difference(variant: Sequence[float], true: Sequence[float], num_bootstrap: int, seed: int) -> dict:
    d = np.asarray(variant, dtype=np.float64) - np.asarray(true, dtype=np.float64)
    d = d[~np.isnan(d)]
    lo, hi = bootstrap_ci(d, num_bootstrap, seed=seed)
    return {"n": int(d.size), "mean_diff": float(d.mean()) if d.size else math.nan, "ci_low": lo, "ci_high": hi}


def _mean_ci(values: Sequence[float], num_bootstrap: int, seed: int) -> dict:
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    lo, hi = bootstrap_ci(x, num_bootstrap, seed=seed)
    return {"n": int(x.size), "mean": float(x.mean()) if x.size else math.nan, "ci_low": lo, "ci_high": hi}


def _record_metric(result: dict, metric: str, values: dict, cfg) -> None:
    """Per variant: the metric's mean with its CI and, against `true`, the paired difference."""
    for v in cfg.variants:
        entry = result["variants"].setdefault(v, {})
        entry[metric] = _mean_ci(values[v], cfg.num_bootstrap, cfg.seed)
        if v != "true":
            entry[f"{metric}_diff_vs_true"] = paired_difference(values[v], values["true"], cfg.num_bootstrap, cfg.seed)


def run_ablation(cfg: AblationConfig) -> dict:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    model = load_model(cfg.model_cfg)
    cases = load_cases(cfg.inputs, model, skip_report_path=out_dir / "skips.json")
    donors = {"true": None, "zero": None}
    if "shuffled" in cfg.variants:
        donors["shuffled"] = shuffled_donors(cases, cfg.seed)
    result: dict = {"checkpoint": cfg.model_cfg.checkpoint_dir, "task": cfg.task, "num_cases": len(cases),
                    "variants": {}}

    if cfg.compute_loss:
        max_len = cfg.max_seq_len or (model.train_config.data.max_seq_len if model.train_config is not None else 512)
        losses = {}
        for v in cfg.variants:
            order = [donors[v][c.key] for c in cases] if donors[v] else None
            losses[v] = target_losses(model, cases, cfg.task, max_len, cfg.decoding.batch_size,
                                      prefix_mode="zero" if v == "zero" else "true", latents_from=order)
        _record_metric(result, "target_loss", losses, cfg)

    if cfg.generate:
        records = {}
        for v in cfg.variants:
            records[v], _ = run_generation(model, cases, cfg.task, cfg.decoding, out_dir / f"{v}.jsonl",
                                           record_name=f"{model.name}:{v}",
                                           prefix_mode="zero" if v == "zero" else "true", donors=donors[v])
        keyed = {v: {(r["case_id"], r["element"]): r for r in recs} for v, recs in records.items()}
        keys = sorted(set.intersection(*(set(k) for k in keyed.values())))
        scorer = EmbeddingScorer(cfg.embedding_model)
        scores = {v: scorer.score([keyed[v][k]["reference"] for k in keys], [keyed[v][k]["generation"] for k in keys])
                  for v in cfg.variants}
        _record_metric(result, "embedding", scores, cfg)
        for v in cfg.variants:
            if v != "true":
                same = sum(keyed[v][k]["generation"] == keyed["true"][k]["generation"] for k in keys)
                result["variants"][v]["identical_generations"] = int(same)
    atomic_write_json(out_dir / "ablation.json", result)
    atomic_write_text(out_dir / "ablation.md", format_markdown(result))
    return result


def _cell(d: Optional[dict], key: str) -> str:
    if not d:
        return "–"
    return f"{d[key]:.4f} [{d['ci_low']:.4f}, {d['ci_high']:.4f}]"


def format_markdown(result: dict) -> str:
    lines = [f"# Image ablation: {result['checkpoint']} ({result['task']}, {result['num_cases']} cases)", "",
             "| variant | target loss | Δ loss vs true | embedding | Δ embedding vs true | identical gens |",
             "|---|---|---|---|---|---|"]
    for v, e in result["variants"].items():
        lines.append(f"| {v} | {_cell(e.get('target_loss'), 'mean')} | {_cell(e.get('target_loss_diff_vs_true'), 'mean_diff')} "
                     f"| {_cell(e.get('embedding'), 'mean')} | {_cell(e.get('embedding_diff_vs_true'), 'mean_diff')} "
                     f"| {e.get('identical_generations', '–')} |")
    lines += ["", "Brackets: 95% bootstrap CI. Differences are paired per case; a CI excluding 0 means the "
              "image input changes the model's behaviour.", ""]
    return "\n".join(lines)


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_config(AblationConfig, argv)
    print_config(cfg)
    save_config(cfg, Path(cfg.out_dir) / "ablation_config.json")
    print(format_markdown(run_ablation(cfg)))


if __name__ == "__main__":
    main()
