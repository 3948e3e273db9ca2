"""ZeRO-3 (`--deepspeed ds_configs/zero3.json`): parameter-partitioned training on CPU (gloo).

- Two ranks with ZeRO-3 make the updates of one process (the ZeRO-2 engine with 2 accumulation
  steps over the same micro-batches): same losses, same trained weights (fp32), for LoRA and for
  full fine-tuning; the inference checkpoint, gathered from the partitions, loads with plain PEFT /
  `AutoModelForCausalLM.from_pretrained`.
- bf16 (the GPU precision) on 1 rank: the steps of ZeRO-2 to bf16 rounding.
- Resume: N steps + resume + M steps = N + M steps on 2 ranks, and from the same 2-rank checkpoint
  on 1 rank (DeepSpeed's universal checkpoint: DeepSpeed 0.19's ZeRO-3 has no elastic load).
- The trainer end to end (launch/train.sh): a skipped non-finite step, sample generations (every
  rank decodes in lockstep), gathered inference checkpoints; the trainer's side of a resume on
  another number of ranks (the data position) on its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.zero3_steps import resume_and_finish, run_steps, steps_config
from trainer.config import TrainConfig, replace
from trainer.engines import build_ds_config

ZERO3 = "ds_configs/zero3.json"


def test_zero3_config_fills_its_bucket_sizes_from_the_hidden_size(tiny_lm_dir):
    cfg = replace(TrainConfig(), deepspeed=ZERO3, model={"model_path": str(tiny_lm_dir)})
    ds = build_ds_config(cfg, "bf16", hidden_size=4096)  # Mistral-7B
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and ds["bf16"]["enabled"] is True and "auto" not in json.dumps(ds)
    assert (z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"], z["stage3_param_persistence_threshold"]) == (
        4096 ** 2, int(0.9 * 4096 ** 2), 40960)
    assert z["stage3_gather_16bit_weights_on_model_save"] is False  # the trainer gathers what it saves itself
    hidden = json.loads((tiny_lm_dir / "config.json").read_text())["hidden_size"]
    assert build_ds_config(cfg, "fp32")["zero_optimization"]["reduce_bucket_size"] == hidden ** 2  # from --model-path
    offload = build_ds_config(replace(cfg, deepspeed="ds_configs/zero3_offload.json"), "bf16", hidden_size=8192)
    assert offload["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert offload["zero_optimization"]["reduce_bucket_size"] == 8192 ** 2


class _RecordingEngine:
    """What load_resume_checkpoint needs of an engine; records how it was asked to load."""

    def __init__(self, partitions_weights: bool):
        self.partitions_weights, self.calls = partitions_weights, []
        self.reshardable = partitions_weights  # as DeepSpeedEngine: ZeRO-3 reshards

    def load(self, root, tag):
        self.calls.append(("load", tag))

    def load_resharded(self, root, tag, saved_world_size):
        self.calls.append(("load_resharded", tag, saved_world_size))


def _two_rank_checkpoint(out, batches_in_epoch: int) -> None:
    from trainer.checkpoint import LATEST_FILE, STATE_FILE, TrainerState, resume_dir, rng_state

    ckpt = resume_dir(out) / "step-6"
    ckpt.mkdir(parents=True)
    state = TrainerState(step=6, epoch=1, batches_in_epoch=batches_in_epoch, world_size=2)
    (ckpt / STATE_FILE).write_text(json.dumps({**state.__dict__, "rng": [rng_state(), rng_state()], "files": {}}))
    (resume_dir(out) / LATEST_FILE).write_text("step-6")


def test_a_zero3_checkpoint_of_2_ranks_resumes_on_1_at_the_same_sample_count(tmp_path):
    from trainer.checkpoint import CheckpointError, load_resume_checkpoint

    _two_rank_checkpoint(tmp_path, batches_in_epoch=3)
    engine = _RecordingEngine(partitions_weights=True)
    warnings = []
    state = load_resume_checkpoint(engine, tmp_path, rank=0, world_size=1, warn=warnings.append)
    assert engine.calls == [("load_resharded", "step-6", 2)]
    assert (state.step, state.epoch, state.batches_in_epoch, state.world_size) == (6, 1, 6, 1)  # 3 x 2 ranks
    assert any("written on 2 ranks, resuming on 1" in w for w in warnings)

    with pytest.raises(CheckpointError, match="same world size.*zero3.json"):  # ZeRO-1/2, torch engine
        load_resume_checkpoint(_RecordingEngine(partitions_weights=False), tmp_path, rank=0, world_size=1)


@pytest.fixture(scope="module")
def dist_one():
    """A 1-process group for the in-process reference; the launcher variables it exports are taken back."""
    from trainer.distributed import init_distributed

    saved = dict(os.environ)
    yield init_distributed(timeout_s=120)
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def two_zero3_ranks(tiny_lm_dir, tmp_path_factory):
    """tests/zero3_steps.py in 2 processes with ZeRO-3, LoRA then full fine-tuning (one launch)."""
    from common.runtime import free_port
    from tests.test_train_e2e import REPO, run_env

    out = tmp_path_factory.mktemp("zero3_2ranks")
    env = {**run_env(), "DS_ACCELERATOR": "cpu"}  # run_env leaves out the in-process group's launcher variables
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "tests.zero3_steps", str(tiny_lm_dir), str(out), ZERO3]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


def _safetensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_same_weights(got_dir, want_dir, names, atol=2e-6, rtol=1e-5):
    for name in names:
        want, got = _safetensors(want_dir / name), _safetensors(got_dir / name)
        assert sorted(got) == sorted(want) and all(v.numel() > 0 for v in got.values()), name
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=atol, rtol=rtol, msg=f"{name}: {k}")


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_two_zero3_ranks_make_the_one_process_updates_and_resume(use_lora, tiny_lm_dir, tmp_path, two_zero3_ranks,
                                                                 dist_one):
    """3 steps on 2 ZeRO-3 ranks against 1 process (ZeRO-2, 2 accumulation steps, same micro-batches):
    same losses and weights. The 2-rank resume checkpoint of step 2 resumes exactly on 2 ranks (in the
    worker) and on 1 rank (ZeRO-3, universal checkpoint, here): same step-3 losses and weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    two = two_zero3_ranks / ("lora" if use_lora else "full")
    got = json.loads((two / "result.json").read_text())
    assert got["flat_lora"] is False, "flat LoRA is switched off under ZeRO-3"
    weights = ["adapter_model.safetensors" if use_lora else "model.safetensors", "stage2_prefix_modules.safetensors"]

    one = tmp_path / "zero2_1rank"
    ref = run_steps(steps_config(str(tiny_lm_dir), "ds_configs/zero2.json", use_lora, grad_accum=2), one,
                    rank=0, world=1, is_main=True)
    assert len(got["losses"]) == len(ref["losses"]) == 6
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
    want = _safetensors(one / "ckpt" / weights[0])
    base = _safetensors(next(tiny_lm_dir.glob("*.safetensors"))) if not use_lora else {}
    moved = max(float((want[k] - base.get(k, torch.zeros_like(want[k]))).abs().max()) for k in want)
    assert moved > 1e-3, "the updates must be visible above the tolerance"
    _assert_same_weights(two / "ckpt", one / "ckpt", weights)

    # Exact resume on 2 ranks (the worker's second engine) ...
    assert got["resumed_losses"] == got["losses"][-2:]
    _assert_same_weights(two / "ckpt_resumed", two / "ckpt", weights, atol=0, rtol=0)
    # ... and on 1 rank from the same 2-rank checkpoint (DeepSpeed universal checkpoint).
    one_z3 = steps_config(str(tiny_lm_dir), ZERO3, use_lora, grad_accum=2)
    resumed = resume_and_finish(one_z3, two / "run", tmp_path / "resumed_1rank", rank=0, world=1, is_main=True)
    assert resumed == pytest.approx(got["losses"][-2:], rel=1e-5, abs=1e-6)
    assert (two / "run" / "resume" / "step-2" / "universal" / "zero").is_dir()
    _assert_same_weights(tmp_path / "resumed_1rank", two / "ckpt", weights)

    # The gathered checkpoint is a standard one: plain PEFT / transformers load it.
    saved = _safetensors(two / "ckpt" / weights[0])
    if use_lora:
        lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir)), str(two / "ckpt"))
        loaded = {k: v for k, v in lm.state_dict().items() if "lora_" in k}
        assert len(loaded) == len(saved)
        for k, v in saved.items():
            torch.testing.assert_close(loaded[k.replace(".weight", ".default.weight")], v, atol=0, rtol=0, msg=k)
    else:
        sd = AutoModelForCausalLM.from_pretrained(str(two / "ckpt")).state_dict()
        for k in saved:
            torch.testing.assert_close(sd[k], saved[k], atol=0, rtol=0, msg=k)


def test_zero3_in_bf16_makes_the_zero2_updates(tiny_lm_dir, tmp_path, dist_one):
    """The GPU precision (bf16 weights, fp32 masters) on CPU, 1 rank: the modules built outside
    zero.Init (LoRA, prefix) are cast to bf16 like ZeRO-2 casts the whole model, and the steps match
    ZeRO-2's to bf16 rounding."""
    runs = {}
    for config in ("ds_configs/zero2.json", ZERO3):
        cfg = replace(steps_config(str(tiny_lm_dir), config, True, grad_accum=2), model={"precision": "bf16"})
        runs[config] = run_steps(cfg, tmp_path / config.split("/")[-1], rank=0, world=1, is_main=True)
    assert runs[ZERO3]["losses"] == pytest.approx(runs["ds_configs/zero2.json"]["losses"], rel=2e-3)
    assert runs[ZERO3]["losses"][-1] < runs[ZERO3]["losses"][0]
    saved = _safetensors(tmp_path / "zero3.json" / "ckpt" / "adapter_model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}


@pytest.mark.slow
def test_zero3_through_the_trainer(shard_dir, tiny_lm_dir, tmp_path):
    """launch/train.sh with --deepspeed ds_configs/zero3.json on 2 ranks: the LM built partitioned,
    flat LoRA off (logged), a non-finite step skipped, samples generated in lockstep, validation, the
    resume and inference checkpoints (the adapter loads with PEFT)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from common.io import read_jsonl
    from tests.test_train_e2e import base_flags, run_train

    out = tmp_path / "run"
    proc = run_train(base_flags(shard_dir, tiny_lm_dir, out, **{
        "deepspeed": ZERO3, "max-steps": 4, "save-steps": 2, "sample-log-steps": 2, "sample-log-num": 1,
        "sample-log-max-new-tokens": 4, "val-max-samples": 8, "debug-nan-at-steps": [3]}))
    assert "--flat-lora is off under ZeRO-3" in proc.stderr
    log = read_jsonl(out / "train_log.jsonl")
    assert [r["step"] for r in log if r["kind"] == "sample"] == [2, 4]
    assert {r["step"]: r["nan_steps_total"] for r in log if r["kind"] == "train"} == {1: 0, 2: 0, 3: 1, 4: 1}
    vals = [r for r in log if r["kind"] == "val"]
    assert [v["step"] for v in vals] == [0, 4] and vals[-1]["val_loss"] < vals[0]["val_loss"], vals
    for rank in (0, 1):
        assert (out / "resume" / "step-4" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
    lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir)), str(out / "final"))
    assert any("lora_B" in n and float(p.abs().max()) > 0 for n, p in lm.named_parameters())  # trained, not the init


def test_zero3_bucket_sizes_come_from_the_model_when_there_is_no_model_path(monkeypatch, tiny_lm_dir):
    """A benchmark's random LM has no --model-path: the engine reads the hidden size from the model
    itself (this failed on the GPU machine before: 'needs the hidden size from --model-path')."""
    import deepspeed

    from trainer.engines.deepspeed_engine import STAGE3_AUTO_SIZES, build_deepspeed_engine

    class Stop(Exception):
        pass

    seen = {}

    def initialize(**kwargs):
        seen.update(kwargs["config"])
        raise Stop

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    from models.prefix_lm import ModelConfig, build_prefix_lm

    model, _ = build_prefix_lm(ModelConfig(model_path=str(tiny_lm_dir), precision="fp32"), latent_dim=8, device="cpu")
    h = model.base_lm.config.hidden_size
    cfg = replace(TrainConfig(), deepspeed=ZERO3, model={"model_path": "", "precision": "fp32"})
    with pytest.raises(Stop):
        build_deepspeed_engine(model, cfg, 10, torch.device("cpu"), "fp32", torch.float32)
    assert [seen["zero_optimization"][k] for k in STAGE3_AUTO_SIZES] == [h * h, int(0.9 * h * h), 10 * h]
