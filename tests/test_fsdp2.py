"""`--engine fsdp2` (FSDP2 `fully_shard`, CPU gloo): the sharded engine makes the one-process updates.

The reference is the torch engine in ONE process with gradient accumulation 2 over micro-batches
2s and 2s+1 of step s; two FSDP2 processes (no accumulation) see micro-batch 2s+r on rank r: the
same gradients (mean of the two micro-batch losses' gradients), so the same losses and trained
weights (fp32, to fp reassociation), for LoRA (frozen base sharded too, meta-built, each rank
reading its own slices of the base files) and for full fine-tuning. The two-process job also
saves a DCP checkpoint after N steps, runs M more, then reloads it into a fresh engine and reruns
the M steps (N + resume + M = N + M); this process then loads the same 2-rank checkpoint on ONE
rank (accumulation 2) and must continue exactly too. The gathered inference checkpoints load with
plain PEFT / `AutoModelForCausalLM.from_pretrained`. The end-to-end test runs the trainer
(launch/train.sh, 2 processes); resuming the trainer state on another world size is tested on its own.

This file is also the two-process worker: `python -m torch.distributed.run ... tests/test_fsdp2.py`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.runtime import free_port
from tests.test_engine import _batch, _micro_step, _tail_cfg, dist1  # noqa: F401  (fixture)
from trainer.config import TrainConfig, replace

REPO = Path(__file__).resolve().parents[1]
N_STEPS, M_STEPS = 2, 2  # save after N optimizer steps, then M more
ACCUM_1PROC = 2  # micro-batches per step in one process = ranks of the FSDP2 job
SCENARIOS = ("lora", "full")


def _cfg(tiny_lm_dir, scenario: str):
    cfg = _tail_cfg(tiny_lm_dir, max_grad_norm=0.05, weight_decay=0.01)
    model = {"lora_dropout": 0.1, "flat_lora": False}  # the reference's LoRA tensors as FSDP2's (not packed)
    if scenario == "full":
        model["use_lora"] = False
    return replace(cfg, model=model, optim={"lr": 1e-3})


def _model_and_batches(cfg, encoder_ckpt, meta: bool, seed: int = 0):
    """Same seed, same initial weights whichever path builds it (meta or not); LoRA B made non-zero."""
    from models.prefix_lm import build_prefix_lm
    from models.stage1 import load_stage1_encoder

    enc = load_stage1_encoder(encoder_ckpt)
    torch.manual_seed(seed)
    model, tok = build_prefix_lm(cfg.model, latent_dim=enc.latent_dim, tail=enc.tail(1), meta=meta)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    shape = (enc.num_tokens(), enc.latent_dim)
    batches = [_batch(tok, n=2 + i % 2, latent_dim=enc.latent_dim, with_tokens=shape, seed=i)
               for i in range(ACCUM_1PROC * (N_STEPS + M_STEPS))]
    return model, tok, batches


def _run_steps(engine, batches, steps: range, rank: int, world: int) -> dict[int, float]:
    """{micro-batch b: its loss} of this rank over `steps`: step s is micro-batches 2s and 2s+1, one per
    rank on 2 ranks, both in turn (accumulation 2) on 1 rank."""
    per_rank = ACCUM_1PROC // world
    out = {}
    for s in steps:
        for i in range(per_rank):
            b = s * ACCUM_1PROC + rank * per_rank + i
            loss, boundary, applied = _micro_step(engine, batches[b], seed=100 + b)
            assert boundary == (i == per_rank - 1) and bool(applied)
            out[b] = loss
    return out


def _trained(engine) -> dict[str, torch.Tensor]:
    """The trainable weights, full (gathered on rank 0 for FSDP2)."""
    sd = engine.gathered_state_dict()
    if sd is None:
        sd = {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    return {n: v.float() for n, v in sd.items()}


def _gather_losses(losses: dict) -> dict:
    import torch.distributed as dist

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, losses)
    return {b: v for p in parts for b, v in p.items()}


# ------------------------------------------------------------------------------------------------
# The two-process worker


def worker(tiny_lm_dir: str, encoder_ckpt: str, out: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from trainer.checkpoint import save_inference_checkpoint
    from trainer.distributed import init_distributed
    from trainer.engines import FSDP2Engine, build_engine

    info = init_distributed(timeout_s=300)
    rank, world, out = info.rank, info.world_size, Path(out)
    total = N_STEPS + M_STEPS
    result = {}
    for scenario in SCENARIOS:
        cfg = replace(_cfg(tiny_lm_dir, scenario), engine="fsdp2")
        model, tok, batches = _model_and_batches(cfg, encoder_ckpt, meta=True)
        assert any(p.is_meta for p in model.parameters()), "the base must be meta-built"
        engine = build_engine(model, cfg, total_steps=total)
        assert isinstance(engine, FSDP2Engine)
        local = sum(p.to_local().numel() for p in engine.module.parameters())
        full = sum(p.numel() for p in engine.module.parameters())
        assert local < 0.6 * full, (local, full)  # every rank holds about half of every weight
        losses = _run_steps(engine, batches, range(N_STEPS), rank, world)
        engine.save(out / scenario / "resume", f"step-{N_STEPS}")
        losses.update(_run_steps(engine, batches, range(N_STEPS, total), rank, world))
        final = _trained(engine)
        ckpt_sd = engine.gathered_state_dict()
        if rank == 0:
            save_inference_checkpoint(engine.module, tok, {"shr6": 0}, cfg, out / scenario / "final", state_dict=ckpt_sd)

        # a fresh engine from the step-N checkpoint reruns the last M steps
        model, _, _ = _model_and_batches(cfg, encoder_ckpt, meta=True, seed=7)  # other init: the load must matter
        resumed = build_engine(model, cfg, total_steps=total)
        resumed.load(out / scenario / "resume", f"step-{N_STEPS}")
        again = _run_steps(resumed, batches, range(N_STEPS, total), rank, world)
        resumed_w = _trained(resumed)
        losses, again = _gather_losses(losses), _gather_losses(again)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in final.items()}, str(out / scenario / "weights.safetensors"))
            save_file({k: v.contiguous() for k, v in resumed_w.items()}, str(out / scenario / "resumed.safetensors"))
            result[scenario] = {"losses": losses, "resumed_losses": again}
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------
# The tests


@pytest.fixture(scope="module")
def two_process_run(tiny_lm_dir, stage1_ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(Path(__file__)), str(tiny_lm_dir), str(stage1_ckpts[0]), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads((out / "result.json").read_text())
    return out, {s: {k: {int(b): v for b, v in d.items()} for k, d in r.items()} for s, r in result.items()}


def _reference(tiny_lm_dir, encoder_ckpt, scenario):
    """One process, the torch engine, accumulation 2: per micro-batch losses and the trained weights."""
    from trainer.engines import build_engine

    cfg = replace(_cfg(tiny_lm_dir, scenario), engine="torch", optim={"gradient_accumulation_steps": ACCUM_1PROC})
    model, _, batches = _model_and_batches(cfg, encoder_ckpt, meta=False)
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    engine = build_engine(model, cfg, total_steps=N_STEPS + M_STEPS)
    losses = _run_steps(engine, batches, range(N_STEPS + M_STEPS), 0, 1)
    return losses, init, _trained(engine)


def _assert_weights(got: dict, want: dict, init: dict | None = None) -> None:
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))[:5]
    if init is not None:
        moved = max(float((want[n] - init[n]).abs().max()) for n in want)
        assert moved > 1e-3, "the updates must be visible above the tolerance"
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=2e-5, rtol=1e-4, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_fsdp2_processes_make_the_one_process_updates(scenario, two_process_run, tiny_lm_dir, stage1_ckpts, dist1):
    from safetensors.torch import load_file

    out, result = two_process_run
    want_losses, init, want = _reference(tiny_lm_dir, stage1_ckpts[0], scenario)
    got = result[scenario]
    assert sorted(got["losses"]) == sorted(want_losses)
    for b, loss in want_losses.items():
        assert got["losses"][b] == pytest.approx(loss, abs=1e-5), b
    _assert_weights(load_file(str(out / scenario / "weights.safetensors")), want, init)
    # N steps + a fresh engine loading the step-N checkpoint + M steps = N + M steps
    for b, loss in got["resumed_losses"].items():
        assert loss == pytest.approx(got["losses"][b], abs=1e-6), b
    _assert_weights(load_file(str(out / scenario / "resumed.safetensors")), load_file(str(out / scenario / "weights.safetensors")))


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_two_rank_checkpoint_resumes_on_one_rank(scenario, two_process_run, tiny_lm_dir, stage1_ckpts, dist1):
    """The 2-rank DCP checkpoint of step N, resharded onto 1 rank (accumulation 2), continues exactly."""
    from safetensors.torch import load_file

    from trainer.engines import build_engine

    out, result = two_process_run
    cfg = replace(_cfg(tiny_lm_dir, scenario), engine="fsdp2", optim={"gradient_accumulation_steps": ACCUM_1PROC})
    model, _, batches = _model_and_batches(cfg, stage1_ckpts[0], meta=True, seed=7)
    engine = build_engine(model, cfg, total_steps=N_STEPS + M_STEPS)
    engine.load(out / scenario / "resume", f"step-{N_STEPS}")
    losses = _run_steps(engine, batches, range(N_STEPS, N_STEPS + M_STEPS), 0, 1)
    for b, loss in losses.items():
        assert loss == pytest.approx(result[scenario]["losses"][b], abs=1e-5), b
    _assert_weights(_trained(engine), load_file(str(out / scenario / "weights.safetensors")))


@pytest.mark.slow
def test_inference_checkpoints_load_with_plain_peft_and_transformers(two_process_run, tiny_lm_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out, _ = two_process_run
    trained = load_file(str(out / "lora" / "weights.safetensors"))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir)), str(out / "lora" / "final"))
    lora = {n: p for n, p in peft.named_parameters() if "lora_" in n}
    assert lora and all(n.replace(".default", "") in {k.removeprefix("lm.").replace(".default", "") for k in trained}
                        for n in lora), sorted(lora)[:3]
    for n, p in lora.items():
        torch.testing.assert_close(p.detach().float(), trained["lm." + n], atol=0, rtol=0, msg=n)

    full = AutoModelForCausalLM.from_pretrained(str(out / "full" / "final"))
    trained = load_file(str(out / "full" / "weights.safetensors"))
    sd = full.state_dict()
    for k, v in trained.items():
        if k.startswith("lm."):
            torch.testing.assert_close(sd[k.removeprefix("lm.")].float(), v, atol=0, rtol=0, msg=k)
    assert (out / "full" / "final" / "stage2_prefix_modules.safetensors").is_file()
    assert (out / "lora" / "final" / "stage1_encoder_finetuned.safetensors").is_file()


@pytest.mark.slow
def test_trainer_fsdp2_run(shard_dir, tiny_lm_dir, tmp_path):
    """launch/train.sh --engine fsdp2, 2 processes, activation checkpointing on: it trains, writes
    sharded resume checkpoints and standard inference checkpoints, and says what it switched off."""
    from tests.test_train_e2e import base_flags, run_train, train_records

    out = tmp_path / "run"
    flags = base_flags(shard_dir, tiny_lm_dir, out, **{"engine": "fsdp2", "max-steps": 4, "save-steps": 2,
                                                      "gradient-checkpointing": True, "sample-log-steps": 2})
    proc = run_train(flags)
    logs = proc.stdout + proc.stderr
    assert "--sample-log-steps: off with --engine fsdp2" in logs and "flat LoRA packing off" in logs
    recs = train_records(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in recs)
    vals = train_records(out, "val")
    assert vals[-1]["val_loss"] < vals[0]["val_loss"], vals
    for step in (2, 4):
        ckpt = out / "resume" / f"step-{step}"
        assert (ckpt / "fsdp2_engine_state.json").is_file() and len(list((ckpt / "fsdp2_dcp").glob("*.distcp"))) == 2
    for ckpt in ("checkpoint-2", "final"):
        assert (out / ckpt / "adapter_model.safetensors").is_file() and (out / ckpt / "adapter_config.json").is_file()


def test_resume_on_another_world_size_keeps_the_epoch_fraction(tmp_path, dist1):
    """A reshardable engine's checkpoint of 2 ranks resumes on 1: same step and epoch, the epoch's
    position scaled by 2/1, the RNG states taken over, a warning; other engines refuse it."""
    from trainer.checkpoint import CheckpointError, TrainerState, load_resume_checkpoint, save_resume_checkpoint

    class Reshardable:
        reshardable, loaded = True, None

        def save(self, save_dir, tag, client_state=None):
            (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
            (Path(save_dir) / tag / "engine.bin").write_bytes(b"x")

        def load(self, load_dir, tag):
            self.loaded = tag

    engine = Reshardable()
    save_resume_checkpoint(engine, tmp_path, TrainerState(step=6, epoch=1, batches_in_epoch=5, world_size=2), True)
    marker = tmp_path / "resume" / "step-6" / "trainer_state.json"
    saved = json.loads(marker.read_text())
    marker.write_text(json.dumps({**saved, "rng": saved["rng"] * 2}))  # as 2 ranks write it
    warnings = []
    state = load_resume_checkpoint(engine, tmp_path, rank=0, world_size=1, warn=warnings.append)
    assert engine.loaded == "step-6"
    assert (state.step, state.epoch, state.batches_in_epoch, state.world_size) == (6, 1, 10, 1)
    assert any("written on 2 ranks, resuming on 1" in w for w in warnings), warnings
    engine.reshardable = False
    with pytest.raises(CheckpointError, match="needs the same world size"):
        load_resume_checkpoint(engine, tmp_path, rank=0, world_size=1)


def test_fsdp2_skips_a_non_finite_step(tiny_lm_dir, stage1_ckpts, dist1):
    """A NaN loss: step() returns False, no weight, optimizer state or LR moves, the skip is counted."""
    from trainer.engines import build_engine

    cfg = replace(_cfg(tiny_lm_dir, "lora"), engine="fsdp2")
    model, _, batches = _model_and_batches(cfg, stage1_ckpts[0], meta=True)
    engine = build_engine(model, cfg, total_steps=4)
    _, _, applied = _micro_step(engine, batches[0], seed=1)
    assert applied is True and engine.skipped_steps == 0
    before, lr = _trained(engine), engine.lr()
    state = {k: v.clone() for k, v in engine.optimizer.state[engine.params[0]].items()}
    _, _, applied = _micro_step(engine, batches[1], seed=2, nan=True)
    assert applied is False and engine.skipped_steps == 1 and engine.lr() == lr
    assert all(torch.equal(v, before[k]) for k, v in _trained(engine).items())
    assert all(torch.equal(v, state[k]) for k, v in engine.optimizer.state[engine.params[0]].items())
    _, _, applied = _micro_step(engine, batches[2], seed=3)
    assert applied is True and engine.lr() != lr


@pytest.mark.parametrize("mode,precision", [("lora", "bf16"), ("full", "fp32")])
def test_sharding_benchmark_smoke(mode, precision, dist1):
    """benchmarks/sharding.py on the tiny shape, in this process's 1-rank group: random shards made
    per rank (meta init), the engine's steps, and the figures it reports. bf16 on the CPU runs the
    mixed-precision path: fp32 trainable masters next to bf16 frozen base shards."""
    from benchmarks.sharding import ShardingBenchConfig, run

    r = run(ShardingBenchConfig(shape="tiny", mode=mode, precision=precision, steps=2, warmup_steps=1,
                                tokens_per_gpu=512, example_len=128, grad_accum=2, peak_tflops=1.0))
    assert r["engine"] == "fsdp2" and r["world_size"] == 1 and r["flops_per_token"] == ("6N" if mode == "full" else "4N")
    assert r["tokens_per_step_per_gpu"] == 2 * 512 and r["tokens_per_s_per_gpu"] > 0
    k = 6 if mode == "full" else 4
    assert r["mfu"] == pytest.approx(r["tokens_per_s_per_gpu"] * k * r["params"] / 1e12)
    assert r["mfu_with_attention"] > r["mfu"] > 0
    assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
    assert r["losses"][1] < r["losses"][0] + 0.5  # the same row again: training, not diverging


if __name__ == "__main__":
    worker(*sys.argv[1:4])


def test_meta_build_never_materialises_the_base_on_another_device(monkeypatch):
    """A meta build must leave the base weights on meta whatever device it is built for: a move of
    the model while PEFT's placeholders stand in for them would copy them into a whole model of real
    zeros (on a GPU), which no engine fills: training on an all-zero base, loss = ln(vocab). Here any
    Module.to copies every tensor, as a move to another device does."""
    from models.prefix_lm import ModelConfig, meta_prefix_lm
    from tiny_models.lm import tiny_mistral_config

    def move_copies(self, *args, **kwargs):
        return self._apply(lambda t: t.clone())

    monkeypatch.setattr(torch.nn.Module, "to", move_copies)
    cfg = ModelConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0, num_image_tokens=2)
    model = meta_prefix_lm(tiny_mistral_config(vocab_size=64), cfg, latent_dim=16, device="cpu")
    base = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert base and all(p.is_meta for n, p in model.named_parameters() if n in base), \
        [n for n, p in model.named_parameters() if n in base and not p.is_meta][:3]
    assert not any(p.is_meta for p in model.parameters() if p.requires_grad)  # LoRA + prefix are real


def test_sharding_benchmark_refuses_an_all_zero_base():
    from benchmarks.sharding import check_base_filled

    lm = torch.nn.Sequential(torch.nn.Linear(4, 4))
    check_base_filled(lm)
    with torch.no_grad():
        lm[0].weight.zero_()
        lm[0].bias.zero_()
    with pytest.raises(RuntimeError, match="base LM weight of this rank is zero"):
        check_base_filled(lm)


@pytest.mark.parametrize("engine,deepspeed", [("fsdp2", None), ("deepspeed", "ds_configs/zero3.json")])
def test_compile_is_refused_with_parameter_sharding_engines(engine, deepspeed):
    from trainer.train import build_model

    cfg = replace(TrainConfig(), engine=engine, model={"compile": "on"}, **({"deepspeed": deepspeed} if deepspeed else {}))
    with pytest.raises(ValueError, match="--compile on: compiled layers need an engine that keeps whole weights"):
        build_model(cfg, manifest=None, device=torch.device("cpu"))


def test_meta_build_refuses_a_base_materialised_on_the_way(monkeypatch):
    """The guard at the source: if anything inside the build moves the model while the placeholders
    stand in for the base, the build stops and says how many weights were materialised."""
    import models.prefix_lm as prefix_lm
    from tiny_models.lm import tiny_mistral_config

    placed = prefix_lm.wrap_lm
    monkeypatch.setattr(prefix_lm, "wrap_lm", lambda *a, **k: placed(*a, **{**k, "place": True}))
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self._apply(lambda t: t.clone()))
    cfg = prefix_lm.ModelConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0, num_image_tokens=2)
    with pytest.raises(RuntimeError, match=r"meta build: (\d+) of \1 base weights were materialised"):
        prefix_lm.meta_prefix_lm(tiny_mistral_config(vocab_size=64), cfg, latent_dim=16, device="cpu")
