"""Stage2 inference: batched generation for a checkpoint (or the pretrained baseline) to JSONL.

    python -m eval.generate --checkpoint-dir runs/uniform/final --base-model-path /models/mistral-7b \
        --shard-dir shards --split val --num-samples 200 --task summary --output-path gen/uniform.jsonl
    python -m eval.generate --checkpoint-dir ... --json-path a.json --image-root data/WeatherQA \
        --stage1-encoder-ckpt enc.pt --num-samples 3
    python -m eval.generate --model pretrained --base-model-path /models/mistral-7b --shard-dir shards

One JSONL record per (case, element, task): case_id, element, cond_name, model, task, prompt,
generation, reference. Records are appended batch by batch and flushed, so a killed run keeps what
it generated; a rerun with the same output path skips the records already there (an incomplete last
line left by the killed run is removed first, with a warning, and generated again).

Inputs are checked before anything is generated. The Stage1 that made the latents (the shards'
manifest; for JSON input --stage1-encoder-ckpt and --stage1-classifier-ckpt) must be the one the
checkpoint was trained with (its stage1_identity.json; older checkpoints without it get a warning).
JSON input is read like the shard builder reads it: an element with a bad field or an unreadable
image is skipped, the skips are summarised by reason and saved to `<output stem>.skips.json`, and a
run in which no element is usable fails.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

from tqdm import tqdm

from common.cli import cli_main
from common.config import parse_config, print_config, save_config
from common.io import append_jsonl, read_jsonl, repair_jsonl_tail, sha256_file
from common.runtime import seed_everything
from data_prep.manifest import Manifest, ManifestMismatch, check_stage1_compatible, load_manifest
from data_prep.shard_format import MANIFEST_FILENAME
from eval.inputs import EvalCase, json_skip_summary, load_json_inputs, load_shard_cases, select_cases
from eval.modeling import (
    DecodingConfig,
    EvalModel,
    build_requests,
    generate_texts,
    length_sorted_batches,
    load_checkpoint_model,
    load_pretrained_model,
    record_key,
)
from models.cond_names import COND_MAP_FILENAME
from models.stage1 import Stage1Settings, load_stage1_classifier, load_stage1_encoder
from models.tasks import TASKS
from trainer.checkpoint import STAGE1_IDENTITY_FILE


@dataclass
class InputConfig:
    """Where the evaluation cases come from: shards (cached latents) or Gemini JSON + images."""

    shard_dir: Optional[str] = field(default=None, metadata={"help": "shard directory (latents cached)"})
    split: str = field(default="val", metadata={"help": "shard split to evaluate"})
    json_path: list[str] = field(default_factory=list, metadata={"help": "Gemini JSON file(s)"})
    image_root: Optional[str] = field(default=None, metadata={"help": "root of image_rel_path (JSON input)"})
    num_samples: int = field(default=3, metadata={"help": "records to generate (0 = all)"})
    elements_per_case: int = field(default=1, metadata={"help": "elements used per case (0 = all)"})
    stage1_encoder_ckpt: Optional[str] = field(default=None, metadata={"help": "Stage1 MAE encoder (JSON input)"})
    stage1_classifier_ckpt: Optional[str] = field(
        default=None, metadata={"help": "Stage1 classifier; its class count is checked against the cond map"})
    image_size: int = field(default=0, metadata={"help": "Stage1 image size (0 = from the checkpoint, else 224)"})
    latent_pooling: str = field(default="", metadata={"help": "Stage1 pooling mean|cls ('' = from the checkpoint)"})
    gif_frame: int = field(default=-1, metadata={"help": "GIF frame fed to Stage1 (-1 = from the checkpoint, else 0)"})

    def validate(self) -> None:
        if bool(self.shard_dir) == bool(self.json_path):
            raise ValueError("give exactly one input: --shard-dir, or --json-path with --image-root")
        if self.json_path and not self.image_root:
            raise ValueError("--json-path needs --image-root")


@dataclass
class ModelConfig:
    model: Literal["stage2", "pretrained"] = field(
        default="stage2", metadata={"help": "a Stage2 checkpoint or the pretrained text-only baseline"})
    checkpoint_dir: Optional[str] = field(default=None, metadata={"help": "Stage2 inference checkpoint"})
    base_model_path: Optional[str] = field(default=None, metadata={"help": "local base LM directory"})
    model_name: Optional[str] = field(default=None, metadata={"help": "name written into records"})
    device: str = field(default="auto", metadata={"help": "cpu | cuda | cuda:N | auto"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU) | bf16 | fp16 | fp32"})

    def validate(self) -> None:
        if self.model == "stage2" and not self.checkpoint_dir:
            raise ValueError("--model stage2 needs --checkpoint-dir")
        if self.model == "pretrained" and not self.base_model_path:
            raise ValueError("--model pretrained needs --base-model-path")


@dataclass
class GenerationGroups:
    """The groups of every program that generates with one model: its cases, the model, the decoding.

    Programs extend it with their own fields (`GenerateConfig`, `eval.ablation.AblationConfig`), so
    the groups and their checks are declared once.
    """

    inputs: InputConfig = field(default_factory=InputConfig)
    model_cfg: ModelConfig = field(default_factory=ModelConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)

    def validate(self) -> None:
        self.inputs.validate()
        self.model_cfg.validate()
        self.decoding.validate()


@dataclass
class GenerateConfig(GenerationGroups):
    """Stage2 inference: batched generation to a resumable JSONL."""

    task: Literal[TASKS] = field(default="summary", metadata={"help": "task whose prompt is answered"})  # type: ignore[valid-type]
    output_path: str = field(default="generations.jsonl", metadata={"help": "JSONL output (appended, resumable)"})
    num_print_samples: int = field(default=3, metadata={"help": "records printed at the end"})
    seed: int = field(default=0, metadata={"help": "seed for sampling"})


# ------------------------------------------------------------------------------------- loading
def load_model(cfg: ModelConfig) -> EvalModel:
    if cfg.model == "pretrained":
        return load_pretrained_model(cfg.base_model_path, cfg.device, cfg.dtype,
                                     name=cfg.model_name or "pretrained")
    return load_checkpoint_model(cfg.checkpoint_dir, cfg.base_model_path, cfg.device, cfg.dtype,
                                 name=cfg.model_name)


def check_classifier(classifier_ckpt: str, cond_map: dict[str, int]) -> None:
    """The classifier's class count (and label names, when it has them) must match the cond map."""
    clf = load_stage1_classifier(classifier_ckpt)
    n = getattr(getattr(clf, "config", None), "num_labels", None) or getattr(clf, "num_classes", None)
    if n is not None and int(n) != len(cond_map):
        raise ValueError(f"{classifier_ckpt}: classifier has {n} classes but {COND_MAP_FILENAME} has "
                         f"{len(cond_map)}: shards, checkpoints and the classifier must share one mapping")


class Stage1IdentityError(ValueError):
    """Evaluation inputs made with another Stage1 than the checkpoint was trained with."""


def json_stage1_settings(cfg: InputConfig, model: EvalModel) -> Stage1Settings:
    """The Stage1 settings JSON input is decoded and encoded with: the flags, else the checkpoint's
    training config; a checkpoint without one (the seed's) and the baseline get the Stage1 defaults."""
    s1 = model.train_config.stage1 if model.train_config is not None else Stage1Settings()
    tail = getattr(getattr(model.prefix_lm, "prefix", None), "tail", None)
    return Stage1Settings(stage1_encoder_ckpt=cfg.stage1_encoder_ckpt or "",
                          stage1_classifier_ckpt=cfg.stage1_classifier_ckpt or "",
                          image_size=cfg.image_size or s1.image_size,
                          stage1_trainable_blocks=s1.stage1_trainable_blocks if tail is not None else 0,
                          latent_pooling=cfg.latent_pooling or s1.latent_pooling,
                          gif_frame=cfg.gif_frame if cfg.gif_frame >= 0 else s1.gif_frame)


def _sha256_of(flag: str, path: str) -> str:
    try:
        return sha256_file(path)
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"{flag} {path}: no such file") from None


def check_stage1_identity(cfg: InputConfig, model: EvalModel) -> None:
    """Refuse inputs made with another Stage1 than the one the checkpoint was trained with.

    The checkpoint's identity (trainer.checkpoint.STAGE1_IDENTITY_FILE: the training shards'
    manifest `stage1` section) is compared by `data_prep.manifest.check_stage1_compatible`, the
    trainer's own check: with --shard-dir against the shards' manifest (encoder and classifier
    sha256, image size, pooling, frame, and K when the checkpoint trained Stage1 blocks: a K = 0
    checkpoint reads only latents, which do not depend on K); with --json-path against the sha256
    of --stage1-encoder-ckpt (and of --stage1-classifier-ckpt when given) and the settings the
    images are encoded with. A checkpoint without the file (older ones, the seed's) is warned about.
    """
    if not model.uses_image:
        return
    ident = Path(model.source) / STAGE1_IDENTITY_FILE
    rec = model.stage1
    if rec is None:
        given = (f"the shards in {cfg.shard_dir}" if cfg.shard_dir
                 else f"--stage1-encoder-ckpt {cfg.stage1_encoder_ckpt}")
        print(f"[generate] warning: {model.source} has no {STAGE1_IDENTITY_FILE} (a checkpoint from before it "
              f"was written, or the seed's): cannot check that the Stage1 of {given} is the one training used",
              file=sys.stderr, flush=True)
        return
    if cfg.shard_dir:
        shards = load_manifest(cfg.shard_dir)
        trained = Stage1Settings(image_size=rec.image_size, latent_pooling=rec.pooling, gif_frame=rec.frame,
                                 stage1_trainable_blocks=rec.trainable_blocks or shards.stage1.trainable_blocks)
        try:
            check_stage1_compatible(shards, trained, rec.encoder_sha256, rec.classifier_sha256)
        except ManifestMismatch as e:
            manifest_path = Path(shards.shard_dir) / MANIFEST_FILENAME
            lines = [f"  {name}: {ident} has {ckpt!r}, {manifest_path} has {built!r}"
                     for name, (built, ckpt) in e.differences.items()]
            raise Stage1IdentityError(
                f"{model.source} was trained on latents of another Stage1 than the shards in {cfg.shard_dir} "
                "were built with:\n" + "\n".join(lines) + "\nEvaluate on shards built with the checkpoint's "
                "Stage1 checkpoints and settings (python -m data_prep.build_shards), or with --json-path.") from None
        return
    used = json_stage1_settings(cfg, model)
    given = {"stage1_encoder_ckpt (sha256)": cfg.stage1_encoder_ckpt}
    encoder_sha = _sha256_of("--stage1-encoder-ckpt", cfg.stage1_encoder_ckpt)
    classifier_sha = None
    if cfg.stage1_classifier_ckpt:
        classifier_sha = _sha256_of("--stage1-classifier-ckpt", cfg.stage1_classifier_ckpt)
        given["stage1_classifier_ckpt (sha256)"] = cfg.stage1_classifier_ckpt
    # The checkpoint's identity in the role of the "shards" the trainer's check compares against.
    trained = Manifest(shards=[], split_counts={}, stage1=rec, cond_name_to_id={})
    try:
        check_stage1_compatible(trained, used, encoder_sha, classifier_sha)
    except ManifestMismatch as e:
        lines = [f"  {name}: {ident} has {ckpt!r}, {given.get(name, 'this run')} has {now!r}"
                 for name, (ckpt, now) in e.differences.items()]
        raise Stage1IdentityError(
            f"{model.source} was trained with another Stage1 than this run gives it:\n" + "\n".join(lines)
            + "\nPass the Stage1 checkpoints (and settings) the checkpoint was trained with, or leave "
              "--image-size/--latent-pooling/--gif-frame unset to use the checkpoint's.") from None


def load_cases(cfg: InputConfig, model: EvalModel, max_cases: int = 0,
               skip_report_path: Optional[str | Path] = None) -> list[EvalCase]:
    """The selected cases with latents, checked against the model's cond map and Stage1 identity.

    JSON input is read and checked like the shard builder reads it (eval.inputs.load_json_inputs), for
    every model alike (the baseline's images are decoded too, so that every model gets the same
    cases); the skipped elements are summarised, saved to `skip_report_path` when given, and a run
    in which nothing is usable fails.
    """
    if model.uses_image and cfg.json_path and not cfg.stage1_encoder_ckpt:
        raise ValueError("JSON input to a Stage2 model needs --stage1-encoder-ckpt to compute latents")
    check_stage1_identity(cfg, model)
    if cfg.stage1_classifier_ckpt:
        check_classifier(cfg.stage1_classifier_ckpt, model.cond_map)
    if cfg.shard_dir:
        # Read enough cases for the selection (a summary eval needs only the first element of each).
        limit = cfg.num_samples if (cfg.num_samples and cfg.elements_per_case) else 0
        cases = load_shard_cases(cfg.shard_dir, cfg.split, model.cond_map, max_cases=max_cases or limit)
        return select_cases(cases, cfg.num_samples, cfg.elements_per_case)
    s1 = json_stage1_settings(cfg, model)
    encoder = None
    if model.uses_image:
        encoder = load_stage1_encoder(cfg.stage1_encoder_ckpt, s1.latent_pooling).to(model.device).eval()
    cases, report = load_json_inputs(cfg.json_path, model.cond_map, cfg.image_root, s1.image_size, s1.gif_frame,
                                     encoder=encoder, trainable_blocks=s1.stage1_trainable_blocks,
                                     num_samples=cfg.num_samples, elements_per_case=cfg.elements_per_case,
                                     max_cases=max_cases, device=str(model.device))
    json_skip_summary(report, len(cases), cfg.json_path, cfg.image_root, skip_report_path)
    return cases


# ------------------------------------------------------------------------------------- running
def make_record(model_name: str, req, task: str, generation: str) -> dict:
    c = req.case
    return {"case_id": c.case_id, "element": c.element_index, "cond_name": c.cond_name,
            "model": model_name, "task": task, "prompt": req.prompt.text,
            "generation": generation, "reference": req.reference}


def run_generation(model: EvalModel, cases: Sequence[EvalCase], task: str, decoding: DecodingConfig,
                   output_path: str | Path, progress: bool = True, record_name: Optional[str] = None,
                   prefix_mode: str = "true",
                   donors: Optional[dict[tuple, EvalCase]] = None) -> tuple[list[dict], Counter]:
    """Generate every case not yet in `output_path`; returns (all records of this model, skips).

    `record_name` (default: the model's name) goes into each record's `model` field. The ablation
    passes `prefix_mode` and `donors` ({case.key: case whose image feeds it}) for its variants.
    """
    name = record_name or model.name
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    torn = repair_jsonl_tail(output_path)  # else the first new record would be glued to the torn line
    if torn is not None:
        print(f"[generate] warning: {output_path}: line {torn} was an incomplete record (a killed run?); "
              "removed, it is generated again", file=sys.stderr, flush=True)
    existing = [r for r in read_jsonl(output_path) if r.get("model") == name and r.get("task") == task]
    done = {record_key(r["case_id"], r["element"], r["task"]) for r in existing}
    requests, skips = build_requests(cases, task, model, decoding.max_prompt_len)
    todo = [r for r in requests if record_key(r.case.case_id, r.case.element_index, task) not in done]
    if len(requests) - len(todo):
        print(f"[generate] {name}: {len(requests) - len(todo)} record(s) already in {output_path}, "
              f"{len(todo)} to generate")
    records = list(existing)
    bar = tqdm(total=len(todo), desc=f"generate {name}/{task}", unit="sample", disable=not progress)
    for idx in length_sorted_batches(todo, decoding.batch_size):
        batch = [todo[i] for i in idx]
        image_from = [donors[r.case.key] for r in batch] if donors is not None else None
        texts = generate_texts(model, batch, decoding, prefix_mode=prefix_mode, latents_from=image_from)
        for req, text in zip(batch, texts):
            rec = make_record(name, req, task, text)
            append_jsonl(output_path, rec)
            records.append(rec)
        bar.update(len(batch))
    bar.close()
    if skips:
        print(f"[generate] {name}: skipped {dict(skips)}")
    return records, skips


def skip_report_path(output_path: str | Path) -> Path:
    """Where the skipped input elements of JSON input are reported: `<output stem>.skips.json`."""
    out = Path(output_path)
    return out.with_name(out.stem + ".skips.json")


def print_samples(records: Sequence[dict], n: int, width: int = 400) -> None:
    for r in list(records)[:n]:
        print(f"--- {r['model']} | case {r['case_id']} element {r['element']} ({r['cond_name']}) | {r['task']}")
        print(f"GENERATION: {r['generation'][:width]}")
        print(f"REFERENCE:  {r['reference'][:width]}")


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg = parse_config(GenerateConfig, argv)
    print_config(cfg)
    out = Path(cfg.output_path)
    save_config(cfg, out.with_name(out.stem + ".config.json"))
    seed_everything(cfg.seed)
    model = load_model(cfg.model_cfg)
    cases = load_cases(cfg.inputs, model, skip_report_path=skip_report_path(out))
    t0 = time.perf_counter()
    records, _ = run_generation(model, cases, cfg.task, cfg.decoding, out)
    print(f"[generate] {len(records)} record(s) in {out} ({time.perf_counter() - t0:.1f}s this run)")
    print_samples(records, cfg.num_print_samples)


if __name__ == "__main__":
    main()
