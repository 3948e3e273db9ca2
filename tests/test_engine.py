"""The DeepSpeed engine wrapper (one process, ZeRO-2 on CPU) and the process-layout discovery."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.config import TrainConfig, replace
from trainer.distributed import discover_layout, first_host
from trainer.engine import build_ds_config, warmup_cosine


def _cfg(model_path="", **optim) -> TrainConfig:
    return replace(TrainConfig(), model={"model_path": str(model_path), "precision": "fp32"},
                   optim={"lr": 1e-3, "encoder_lr": 1e-4, **optim})


def test_ds_config_auto_fields_are_filled():
    cfg = _cfg(gradient_accumulation_steps=3, max_grad_norm=0.5, weight_decay=0.01)
    ds = build_ds_config(cfg, "bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 1  # one packed row of --batch-size examples
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == 2
    p = ds["optimizer"]["params"]
    assert p["lr"] == 1e-3 and p["weight_decay"] == 0.01 and p["torch_adam"] is True
    assert "scheduler" not in ds and "auto" not in str(ds)
    assert build_ds_config(cfg, "fp32")["bf16"]["enabled"] is False
    offload = build_ds_config(replace(cfg, deepspeed="ds_configs/zero2_offload.json"), "fp32")
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_warmup_then_cosine():
    f = warmup_cosine(total_steps=100, warmup_ratio=0.1)
    assert [round(f(s), 6) for s in range(3)] == [0.1, 0.2, 0.3]
    assert f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert f(99) < 0.01 and all(f(s) >= f(s + 1) for s in range(10, 99))


def test_layout_from_slurm_and_torchrun_env():
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
             "SLURM_JOB_NODELIST": "gpu[07-08]"}
    lay = discover_layout(slurm)
    assert (lay["RANK"], lay["WORLD_SIZE"], lay["LOCAL_RANK"]) == ("3", "4", "1")
    assert lay["MASTER_PORT"] == str(20000 + 1234) and lay["MASTER_ADDR"].startswith("gpu07")
    tr = discover_layout({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "9"})
    assert tr == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "9"}
    assert discover_layout({})["WORLD_SIZE"] == "1"


def test_first_host_parsing(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # force the built-in parser (no scontrol)
    assert first_host("gpu[03-05,07],cpu1") == "gpu03"
    assert first_host("node12") == "node12"
    assert first_host("a-b[1,2]") == "a-b1"


def _batch(tokenizer, n=3, latent_dim=32, with_tokens=None):
    from trainer.collate import TrainItem, collate_train
    from trainer.tasks import build_prompt, tokenize_prompt

    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        p = build_prompt("caption", cond_name="shr6", caption="Strong shear over the northwest. It is moderate.")
        ex = tokenize_prompt(p, tokenizer, 256, 4)
        bt = None if with_tokens is None else rng.standard_normal(with_tokens).astype(np.float32)
        items.append(TrainItem(ex, rng.standard_normal(latent_dim).astype(np.float32), i, block_tokens=bt, key=f"k{i}"))
    return collate_train(items, tokenizer.pad_token_id, 4)


@pytest.fixture(scope="module")
def dist1():
    from trainer.distributed import init_distributed

    return init_distributed(timeout_s=120)


def test_engine_step_two_lr_groups_and_nan_skip(tiny_lm_dir, stage1_ckpts, dist1):
    from trainer.engine import build_engine
    from trainer.model import build_prefix_lm
    from trainer.stage1 import load_stage1_encoder

    torch.manual_seed(0)
    enc = load_stage1_encoder(stage1_ckpts[0])
    cfg = replace(_cfg(tiny_lm_dir), stage1={"stage1_trainable_blocks": 1})
    model, tok = build_prefix_lm(cfg.model, latent_dim=enc.latent_dim, tail=enc.tail(1))
    engine = build_engine(model, cfg, total_steps=10)
    assert engine.lr() == {"lora_and_prefix": pytest.approx(1e-3), "stage1_tail": pytest.approx(1e-4)}

    T = enc.num_tokens()
    batch = _batch(tok, latent_dim=enc.latent_dim, with_tokens=(T, enc.latent_dim))
    trainable = {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}

    def changed():
        now = dict(engine.module.named_parameters())
        return {n for n, v in trainable.items() if not torch.equal(now[n].detach(), v)}

    # A non-finite loss: ZeRO skips the update, nothing changes, the LR schedule does not advance.
    out = engine.forward(batch)
    engine.backward(out.loss * float("nan"))
    assert engine.is_boundary() and engine.step() is False
    assert engine.skipped_steps == 1 and not changed()

    losses = []
    for _ in range(3):
        out = engine.forward(batch)
        engine.backward(out.loss)
        assert engine.step() is True
        losses.append(float(out.loss.detach()))
    moved = changed()
    assert any(n.startswith("prefix.tail.") for n in moved), "the Stage1 tail must train"
    assert any("lora_B" in n for n in moved) and any(n.startswith("prefix.proj") for n in moved)
    assert losses[-1] < losses[0]
    assert engine.lr()["lora_and_prefix"] < 1e-3  # decaying after the 1-step warm-up
