"""Compare the pretrained text-only baseline with any number of named Stage2 checkpoints.

    python -m eval.compare --base-model-path /models/mistral-7b --shard-dir shards --num-samples 50 \
        --checkpoint uniform=runs/uniform/final --checkpoint summary_centric=runs/sc/final \
        --out-dir compare_out --metric embedding

Every model answers the same cases (same selection, same prompts up to the image prefix), one
model in memory at a time. Writes `<out-dir>/<name>.jsonl` per model (resumable, like
`eval.generate`), prints the answers side by side, and with `--metric embedding` scores them through
`eval.report` (summary table, CSV, plot in the same directory).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch

from common.cli import cli_main
from common.config import parse_config, print_config, save_config
from common.runtime import seed_everything
from eval.generate import InputConfig, ModelConfig, load_cases, load_model, run_generation
from eval.modeling import DecodingConfig
from eval.report import ReportConfig, load_generations, paired_keys, print_side_by_side, run_report
from models.tasks import TASKS


@dataclass
class CompareConfig:
    """Pretrained baseline vs named Stage2 checkpoints on the same cases."""

    inputs: InputConfig = field(default_factory=InputConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    checkpoint: list[str] = field(default_factory=list, metadata={"help": "NAME=DIR, repeatable or space separated"})
    base_model_path: Optional[str] = field(default=None, metadata={"help": "local base LM (for adapters and baseline)"})
    pretrained_model_path: Optional[str] = field(default=None, metadata={"help": "baseline LM (default: --base-model-path)"})
    include_pretrained: bool = field(default=True, metadata={"help": "also run the text-only pretrained baseline"})
    task: Literal[TASKS] = field(default="summary", metadata={"help": "task whose prompt is answered"})  # type: ignore[valid-type]
    out_dir: str = field(default="compare_out", metadata={"help": "output directory"})
    metric: Literal["none", "embedding"] = field(
        default="none", metadata={"help": "score afterwards (judge: run eval.report on the JSONLs)"})
    embedding_model: Optional[str] = field(default=None, metadata={"help": "local sentence-transformers folder"})
    num_print_samples: int = field(default=3, metadata={"help": "cases printed side by side"})
    device: str = field(default="auto", metadata={"help": "cpu | cuda | auto"})
    dtype: str = field(default="auto", metadata={"help": "auto | bf16 | fp16 | fp32"})
    seed: int = field(default=0, metadata={"help": "seed for sampling"})

    def validate(self) -> None:
        self.inputs.validate()
        self.decoding.validate()
        self.named_checkpoints()
        if self.include_pretrained and not (self.pretrained_model_path or self.base_model_path):
            raise ValueError("the pretrained baseline needs --pretrained-model-path or --base-model-path")
        if not self.checkpoint and not self.include_pretrained:
            raise ValueError("nothing to compare: give --checkpoint NAME=DIR and/or --include-pretrained")

    def named_checkpoints(self) -> list[tuple[str, str]]:
        out = []
        for spec in self.checkpoint:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--checkpoint {spec!r}: expected NAME=DIR")
            if name == "pretrained" or name in dict(out):
                raise ValueError(f"--checkpoint {spec!r}: the name {name!r} is taken")
            out.append((name, path))
        return out


def model_configs(cfg: CompareConfig) -> list[ModelConfig]:
    out = []
    if cfg.include_pretrained:
        out.append(ModelConfig(model="pretrained", base_model_path=cfg.pretrained_model_path or cfg.base_model_path,
                               model_name="pretrained", device=cfg.device, dtype=cfg.dtype))
    for name, path in cfg.named_checkpoints():
        out.append(ModelConfig(model="stage2", checkpoint_dir=path, base_model_path=cfg.base_model_path,
                               model_name=name, device=cfg.device, dtype=cfg.dtype))
    return out


def run_compare(cfg: CompareConfig) -> dict[str, Path]:
    """Generate with every model; returns {model name: its JSONL}."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for mcfg in model_configs(cfg):
        seed_everything(cfg.seed)
        model = load_model(mcfg)
        cases = load_cases(cfg.inputs, model, skip_report_path=out_dir / "skips.json")
        paths[model.name] = out_dir / f"{model.name}.jsonl"
        run_generation(model, cases, cfg.task, cfg.decoding, paths[model.name])
        del model, cases
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return paths


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_config(CompareConfig, argv)
    print_config(cfg)
    save_config(cfg, Path(cfg.out_dir) / "compare_config.json")
    paths = run_compare(cfg)
    by_model = load_generations([str(p) for p in paths.values()])
    keys, skips = paired_keys(by_model)
    print(f"[compare] {len(keys)} case(s) answered by all of {list(by_model)}; skipped {skips}")
    print_side_by_side(by_model, keys, cfg.num_print_samples)
    if cfg.metric != "none":
        run_report(ReportConfig(generations=[str(p) for p in paths.values()], metric=cfg.metric,
                                out_dir=str(cfg.out_dir), embedding_model=cfg.embedding_model,
                                num_print_samples=0))


if __name__ == "__main__":
    main()
