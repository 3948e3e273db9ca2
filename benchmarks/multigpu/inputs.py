"""What every run trains on: synthetic data built into shards in this process with random Stage1
models, and a random LM of the chosen shape (or the user's `--shard-dir` / `--model-path`)."""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from benchmarks.make_random_model import RandomModelConfig, stage1_shape_for, write_lm, write_stage1
from benchmarks.multigpu.config import ScalingConfig
from data_prep.build_shards import BuildConfig, build
from data_prep.synthetic import generate
from models.stage1 import load_stage1_encoder

log = logging.getLogger(__name__)


TRAIN_FRACTION = 0.85  # the builder puts ~10% of the cases in val (by case-id hash): plan with margin


@dataclass
class Inputs:
    shard_dir: str
    model_path: str
    stage1_encoder_ckpt: str = ""
    gemini_json: list[str] = field(default_factory=list)
    stage1: tuple[str, str] = ("", "")


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def random_stage1(cfg: ScalingConfig, work: Path) -> tuple[str, str]:
    shape = stage1_shape_for(cfg.shape)
    folder = work / f"stage1-{shape}"
    enc, cls = write_stage1(folder, shape, seed=0)
    return str(enc), str(cls)


def synthetic_data(out: Path, num_images: int, image_px: int, seed: int = 0) -> list[str]:
    """A synthetic WeatherQA-like dataset of about num_images images; returns its JSON paths."""
    num_cases = max(2, math.ceil(num_images / 20))
    return [str(p) for p in generate(out, num_cases=num_cases, num_files=2, seed=seed, image_px=image_px)]


def build_shards_inprocess(json_paths: Sequence[str], image_root: Path, stage1: tuple[str, str], image_size: int,
                           out: Path, samples_per_shard: int, num_workers: int) -> None:
    build(BuildConfig(gemini_json=list(json_paths), image_root=str(image_root), stage1_encoder_ckpt=stage1[0],
                      stage1_classifier_ckpt=stage1[1], image_size=image_size, out=str(out),
                      samples_per_shard=samples_per_shard, num_workers=num_workers))


def training_samples_needed(cfg: ScalingConfig) -> int:
    """Train samples for one epoch that outlasts --max-steps at the global batch (with margin for
    the val split and the ranks' partial last batches)."""
    return math.ceil(cfg.largest_global_batch * (cfg.max_steps + 2) / TRAIN_FRACTION * 1.1)


def prepare_inputs(cfg: ScalingConfig, work: Path) -> Inputs:
    """Shards and model directory for the training runs: the given ones, or generated ones."""
    inputs = Inputs(shard_dir=cfg.shard_dir, model_path=cfg.model_path, stage1_encoder_ckpt=cfg.stage1_encoder_ckpt)
    if not cfg.shard_dir:
        data_dir = work / "train-data"
        num_images = 20 * cfg.num_cases if cfg.num_cases else training_samples_needed(cfg)
        log.info("generating ~%d synthetic images for training into %s", num_images, data_dir)
        inputs.gemini_json = synthetic_data(data_dir, num_images, cfg.image_px)
        inputs.stage1 = random_stage1(cfg, work)

        image_size = load_stage1_encoder(inputs.stage1[0]).config.image_size
        shard_dir = work / "train-shards"
        shutil.rmtree(shard_dir, ignore_errors=True)
        build_shards_inprocess(inputs.gemini_json, data_dir, inputs.stage1, image_size, shard_dir,
                               samples_per_shard=128, num_workers=min(4, os.cpu_count() or 1) if gpu_count() else 0)
        inputs.shard_dir = str(shard_dir)
    if not cfg.model_path:
        model_dir = work / f"lm-{cfg.shape}"
        # Files are moved in sorted order once complete: tokenizer_config.json comes last.
        if (model_dir / "tokenizer_config.json").is_file() and cfg.shape == "7b":
            log.info("reusing the random 7B model in %s (delete it to rewrite)", model_dir)
        else:
            write_lm(RandomModelConfig(out=str(model_dir), shape=cfg.shape, gemini_json=inputs.gemini_json))
        inputs.model_path = str(model_dir)
    return inputs
