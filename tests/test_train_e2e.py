"""End-to-end training runs (CPU, DeepSpeed ZeRO-2 over gloo, tiny models, synthetic shards).

The multi-process runs go through launch/train.sh exactly as a user would start them.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.io import read_jsonl
from common.runtime import free_port
from trainer.config import parse_train_config
from trainer.distributed import shm_allreduce_path

REPO = Path(__file__).resolve().parents[1]

# The seed README's two recipes (minus the torchrun prefix), plus --shard-dir.
SPEC_UNIFORM = """--gemini-json a.json b.json --image-root data --model-path m --output-dir o
  --batch-size 1 --num-epochs 1 --lr 2e-5 --encoder-lr 5e-6 --warmup-ratio 0.1 --max-seq-len 256 --image-size 224
  --use-lora --lora-r 32 --lora-alpha 64 --lora-dropout 0.05 --num-image-tokens 4
  --stage1-encoder-ckpt enc.pt --stage1-classifier-ckpt cls.pt --stage1-trainable-blocks 1
  --distributed --num-workers 2 --sample-log-steps 500 --sample-log-max-new-tokens 80
  --use-wandb --wandb-project climate-to-text-stage2-mtl --wandb-run-name stage2_uniform_mtl"""
SPEC_SUMMARY_CENTRIC = """--gemini-json a.json --image-root data --model-path m --output-dir o --batch-size 1
  --warmup-epochs 1 --main-epochs 1 --prob-summary 0.7 --prob-caption 0.15 --prob-cot 0.15 --prob-text-summary 0.0
  --lr 2e-5 --encoder-lr 5e-6 --warmup-ratio 0.1 --max-seq-len 256 --image-size 224 --use-lora --lora-r 32
  --lora-alpha 64 --lora-dropout 0.05 --num-image-tokens 4 --stage1-encoder-ckpt enc.pt
  --stage1-classifier-ckpt cls.pt --stage1-trainable-blocks 1 --distributed --num-workers 2
  --sample-log-steps 500 --sample-log-max-new-tokens 80 --use-wandb --wandb-project p --wandb-run-name r
  --schedule summary_centric --text-summary"""


@pytest.mark.parametrize("flags", [SPEC_UNIFORM, SPEC_SUMMARY_CENTRIC])
def test_every_spec_flag_parses(flags):
    cfg = parse_train_config(shlex.split(flags) + ["--shard-dir", "s", "--local_rank=1"])
    assert cfg.model.lora_r == 32 and cfg.optim.encoder_lr == 5e-6 and cfg.stage1.stage1_trainable_blocks == 1
    assert cfg.logging.use_wandb and cfg.logging.sample_log_max_new_tokens == 80 and cfg.local_rank == 1
    assert cfg.data.num_workers == 2 and cfg.checkpoint.output_dir == "o"


def test_gemini_json_without_shards_says_how_to_build_them():
    with pytest.raises(ValueError, match="data_prep.build_shards"):
        parse_train_config(shlex.split(SPEC_UNIFORM))


# ------------------------------------------------------------------------------------------------
# Helpers shared with tests/test_resume.py and tests/test_train_slurm.py


def base_flags(shard_dir, lm_dir, out_dir, **over) -> list[str]:
    """A tiny, fast fp32 run: small batches, 1 data worker, log every step."""
    flags = {"shard-dir": shard_dir, "model-path": lm_dir, "output-dir": out_dir, "precision": "fp32",
             "batch-size": 4, "num-workers": 1, "shuffle-buffer": 16, "max-seq-len": 256, "lora-r": 8,
             "lora-alpha": 16, "lr": 1e-3, "log-steps": 1, "save-steps": 0, "sample-log-steps": 0,
             "val-max-samples": 16, "max-steps": 6, "seed": 1, "image-size": 32}
    flags.update(over)
    out = []
    for k, v in flags.items():
        if v is True:
            out.append(f"--{k}")
        elif v is not None:
            out += [f"--{k}"] + ([str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)])
    return out


# What a launcher sets for its ranks: a test that started an in-process group (the engine tests) has
# them in os.environ, and a job started from the test must not look like a rank of that group.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def run_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    return {**env, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run_train(flags: list[str], num_procs: int = 2, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    port = free_port()
    cmd = [str(REPO / "launch" / "train.sh"), "--num-gpus", str(num_procs), "--master-port", str(port), "--", *flags]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # say where it stood, not only that it ran out of time
        tail = [(x.decode(errors="replace") if isinstance(x, bytes) else x or "")[-6000:] for x in (e.stdout, e.stderr)]
        raise AssertionError(f"training still running after {timeout} s:\n{tail[0]}\n{tail[1]}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    # DeepSpeed's CPU allreduce segments must not outlive the job (they are RAM: see
    # trainer.distributed.disable_shm_allreduce_op).
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    left = [str(shm_allreduce_path(r, env)) for r in range(num_procs) if shm_allreduce_path(r, env).exists()]
    assert not left, f"shared-memory segments left behind: {left}"
    return proc


def train_records(out_dir, kind="train") -> list[dict]:
    return [r for r in read_jsonl(Path(out_dir) / "train_log.jsonl") if r["kind"] == kind]


# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["uniform", "summary_centric"])
def test_two_process_zero2_run_writes_checkpoints_and_learns(schedule, shard_dir, tiny_lm_dir, tmp_path):
    out = tmp_path / "run"
    over = {"schedule": schedule, "max-steps": 8, "save-steps": 4, "sample-log-steps": 4, "sample-log-num": 1,
            "sample-log-max-new-tokens": 8}
    if schedule == "summary_centric":
        # Its 8 steps are warm-up (captions + CoT links only) while the held-out set mixes all tasks
        # (summaries too): at 1e-3 the warm-up steps overshoot on that mix, at 5e-4 they improve it.
        over.update({"warmup-epochs": 1, "main-epochs": 1, "lr": 5e-4})
    run_train(base_flags(shard_dir, tiny_lm_dir, out, **over))

    recs = train_records(out)
    assert [r["step"] for r in recs] == list(range(1, 9))
    # Per-step losses of 8 small mixed-task batches are noisy; the held-out loss is the measure.
    vals = train_records(out, "val")
    assert [v["step"] for v in (vals[0], vals[-1])] == [0, 8], vals
    assert vals[-1]["val_loss"] < vals[0]["val_loss"], vals
    for v in vals:  # the image-use gap at every validation, pooled over both ranks' held-out batches
        assert v["image_gap_batches"] >= 2 and v["image_gap_seconds"] > 0, v
        assert v["image_gap_ci_low"] <= v["image_gap"] <= v["image_gap_ci_high"], v
    assert all(r["tokens_per_s"] > 0 and sum(r["task_mix"].values()) > 0 for r in recs)
    for r in recs:  # each rank's time per step, by loop phase, adds up to the window's wall time
        times = r["rank_ms_per_step"]
        assert set(times) == {"data", "fwd_bwd", "step", "other"} and all(len(v) == 2 for v in times.values())
        assert all(v >= 0 for vs in times.values() for v in vs) and min(times["fwd_bwd"]) > 0
        if r["step"] == 1:
            continue  # ranks start their clocks apart; the first step's collectives align them
        window_ms = 1000 * r["real_tokens"] / r["tokens_per_s"]  # --log-steps 1
        for rank in (0, 1):
            total = sum(times[p][rank] for p in times)
            assert abs(total - window_ms) <= 0.1 * window_ms + 20, (rank, times, window_ms)
    if schedule == "summary_centric":  # warm-up phase: captions and CoT links only
        assert all(r["task_mix"].get("summary", 0) == 0 for r in recs)
    assert train_records(out, "sample"), "sample generations are logged"
    for ckpt in ("checkpoint-4", "final"):
        assert (out / ckpt / "adapter_model.safetensors").is_file() and (out / ckpt / "train_config.json").is_file()
    assert (out / "resume" / "latest").read_text().strip() == "step-8"
    assert (out / "resume" / "step-8" / "trainer_state.json").is_file()
    assert json.loads((out / "resume" / "step-8" / "trainer_state.json").read_text())["world_size"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_two_process_run_on_llama_and_qwen2_then_generates(arch, shard_dir, synthetic_data, tmp_path):
    """Base models beyond Mistral: a tiny Llama 3.x / Qwen2.5 (biased q/k/v, tied embeddings) goes
    through shards -> 2-process training -> checkpoint -> generation from that checkpoint."""
    from eval.generate import run_generation
    from eval.inputs import load_shard_cases, select_cases
    from eval.modeling import DecodingConfig, load_checkpoint_model
    from tiny_models.lm import make_tiny_lm

    json_paths, _ = synthetic_data
    lm_dir = make_tiny_lm(tmp_path / f"tiny_{arch}", corpus_json=json_paths, pretrain_steps=30, arch=arch)
    out = tmp_path / "run"
    proc = run_train(base_flags(shard_dir, lm_dir, out, **{"max-steps": 3, "val-max-samples": 8}))
    assert "no fused kernels for this architecture" not in proc.stderr + proc.stdout  # a supported architecture
    recs = train_records(out)
    assert [r["step"] for r in recs] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in recs)
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}

    model = load_checkpoint_model(str(out / "final"), device="cpu", dtype="fp32", name=arch)
    assert type(model.prefix_lm.base_lm).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    cases = select_cases(load_shard_cases(shard_dir, "train", model.cond_map), 2, 1)
    records, _ = run_generation(model, cases, "caption", DecodingConfig(batch_size=2, max_new_tokens=6,
                                                                         min_new_tokens=2),
                                tmp_path / "gen.jsonl", progress=False)
    assert len(records) == 2 and all(r["generation"].strip() for r in records), records


@pytest.mark.slow
def test_nan_steps_are_skipped_then_too_many_stop_the_run(shard_dir, tiny_lm_dir, tmp_path):
    """One run (one launch, not two): an isolated NaN step (2) is skipped and counted and training goes
    on; a good step (3) resets the streak, so the streak 4, 5, 6 is what exceeds --max-nan-steps 2 and
    stops the run at step 6 (with step 2 still counted as part of it, it would stop at step 5)."""
    out = tmp_path / "nan"
    proc = run_train(base_flags(shard_dir, tiny_lm_dir, out, **{"max-steps": 8, "debug-nan-at-steps": [2, 4, 5, 6],
                                                                "max-nan-steps": 2, "use-wandb": True,
                                                                "sample-log-steps": 2, "sample-log-num": 1,
                                                                "sample-log-max-new-tokens": 4}),
                     num_procs=1, check=False)
    assert proc.returncode != 0
    assert "3 consecutive non-finite steps (> --max-nan-steps 2) at step 6" in proc.stderr + proc.stdout, \
        proc.stderr[-3000:]
    assert list(out.glob("wandb/offline-run-*")), "wandb logs offline (WANDB_MODE=offline)"
    recs = train_records(out)
    assert [(r["step"], r["nan_steps_total"]) for r in recs] == [(1, 0), (2, 1), (3, 1), (4, 2), (5, 3)]
    assert all(r["loss"] == r["loss"] for r in recs)  # skipped steps do not poison the logged loss
    assert train_records(out, "sample"), "sample generations go on after a skipped step"
    assert not (out / "final").exists()


@pytest.mark.slow
def test_full_finetune_run_saves_and_reloads_the_whole_lm(shard_dir, tiny_lm_dir, tmp_path):
    """--no-use-lora trains the whole LM: its checkpoint holds that LM (no adapter), and eval loads it."""
    from transformers import AutoModelForCausalLM

    from trainer.checkpoint import load_inference_model

    out = tmp_path / "full"
    run_train(base_flags(shard_dir, tiny_lm_dir, out, **{"max-steps": 2, "no-use-lora": True}),
              num_procs=1)
    final = out / "final"
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    assert not (final / "adapter_config.json").exists()
    model, tokenizer, cond_map, _ = load_inference_model(final)
    assert not hasattr(model.lm, "peft_config")
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).state_dict()
    tuned = model.lm.state_dict()
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert changed and "model.embed_tokens.weight" in tuned, "training changed the LM's own weights"


@pytest.mark.slow
def test_truncated_shard_is_a_clear_error_naming_it(shard_dir, tiny_lm_dir, tmp_path):
    broken = tmp_path / "shards"
    shutil.copytree(shard_dir, broken)
    victim = sorted(broken.glob("train-*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:1000])
    proc = run_train(base_flags(broken, tiny_lm_dir, tmp_path / "o"), num_procs=1, check=False)
    assert proc.returncode != 0 and victim.name in proc.stderr, proc.stderr[-3000:]
    victim.unlink()
    proc = run_train(base_flags(broken, tiny_lm_dir, tmp_path / "o2"), num_procs=1, check=False)
    assert proc.returncode != 0 and victim.name in proc.stderr and "missing" in proc.stderr


@torch.no_grad()
def _heldout_loss(model, stream, shuffle: bool, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    total, tokens = 0.0, 0.0
    for batch in stream.val_loader():
        if shuffle and batch.get("latents") is not None:
            batch = dict(batch, latents=batch["latents"][torch.randperm(batch["latents"].shape[0], generator=g)])
        out = model(batch)
        total += float(out.task_loss_sum.sum())
        tokens += float(out.task_token_count.sum())
    return total / tokens


@pytest.mark.slow
def test_the_image_is_used(shard_dir, tiny_lm_dir, tmp_path):
    """Text depends on the image in the synthetic data: shuffled latents must hurt held-out loss.

    Captions only (the task where the image matters most). Of a caption's ~80 tokens only a few
    depend on the image (region, strength, extent words), and the tiny random Stage1 encoder's
    mean-pooled latent carries the extent well, the strength partly and the region hardly at all,
    so the achievable gap is a few thousandths of a nat per token (~0.3 nats per caption): the
    margin asked for is half the gap seen here, several times the spread between permutations.
    The held-out set is one batch of all val samples, so the shuffle moves latents across cases
    (consecutive samples are elements of the same case, sharing its region and strength).
    """
    from data_prep.manifest import load_manifest
    from trainer.checkpoint import load_inference_model
    from trainer.data import DataConfig, TrainStream
    from trainer.schedules import ScheduleConfig, build_phases

    phases = tmp_path / "captions.yaml"
    phases.write_text("- {name: captions, epochs: 6, probs: {caption: 1.0}}\n")
    out = tmp_path / "img"
    run_train(base_flags(shard_dir, tiny_lm_dir, out, **{"max-steps": 300, "lr": 1e-2, "batch-size": 8,
                                                        "schedule": "phased", "phases": phases,
                                                        "warmup-ratio": 0.05, "lora-dropout": 0.0}),
              num_procs=1)
    model, tok, _, _ = load_inference_model(out / "final")
    manifest = load_manifest(shard_dir)
    data_cfg = DataConfig(shard_dir=str(shard_dir), batch_size=128, num_workers=0, val_max_samples=128)
    stream = TrainStream(manifest, shard_dir, tok, data_cfg,
                         build_phases(ScheduleConfig(schedule="phased", phases=str(phases))), 4, 0, 1, 1)
    true_loss = _heldout_loss(model, stream, False)
    shuffled = [_heldout_loss(model, stream, True, seed) for seed in range(3)]
    assert all(s > true_loss + 0.002 for s in shuffled), (true_loss, shuffled)
    # The trainer's own gap at its last validation (its batches, rotation within a batch) saw it too.
    assert train_records(out, "val")[-1]["image_gap"] > 0
