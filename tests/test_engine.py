"""The engines (DeepSpeed ZeRO-2 and the torch engine, one process on CPU) and the process-layout discovery.

The torch engine must make the DeepSpeed engine's updates (same model, same batches, gradient
accumulation and clipping active), skip a non-finite step without touching weights, optimizer
state or the LR schedule, and resume exactly from its checkpoints; the slow tests run it through
launch/train.sh in 2 processes (end to end, and N + resume + M steps = N + M steps).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from common.runtime import discover_layout, first_host
from trainer.config import TrainConfig, replace
from trainer.engines import build_ds_config, warmup_cosine


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
    assert p["lr"] == 1e-3 and p["weight_decay"] == 0.01 and p["torch_adam"] is True and p["fused"] is True
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


def _batch(tokenizer, n=3, latent_dim=32, with_tokens=None, seed=0):
    from models.collate import TrainItem, collate_train
    from models.tasks import build_prompt, tokenize_prompt

    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        p = build_prompt("caption", cond_name="shr6", caption="Strong shear over the northwest. It is moderate.")
        ex = tokenize_prompt(p, tokenizer, 256, 4)
        bt = None if with_tokens is None else rng.standard_normal(with_tokens).astype(np.float32)
        items.append(TrainItem(ex, rng.standard_normal(latent_dim).astype(np.float32), i, block_tokens=bt, key=f"k{i}"))
    return collate_train(items, tokenizer.pad_token_id, 4)


@pytest.fixture(scope="module")
def dist1():
    """A 1-process group for in-process engine tests. init_distributed exports RANK/MASTER_PORT/...;
    they are taken back afterwards so that later launched jobs never inherit a port still bound here."""
    from trainer.distributed import init_distributed

    saved = dict(os.environ)
    yield init_distributed(timeout_s=120)
    os.environ.clear()
    os.environ.update(saved)


def test_engine_step_two_lr_groups_and_nan_skip(tiny_lm_dir, stage1_ckpts, dist1):
    from models.prefix_lm import build_prefix_lm
    from models.stage1 import load_stage1_encoder
    from trainer.engines import build_engine

    torch.manual_seed(0)
    enc = load_stage1_encoder(stage1_ckpts[0])
    cfg = replace(_cfg(tiny_lm_dir), stage1={"stage1_trainable_blocks": 1})
    model, tok = build_prefix_lm(cfg.model, latent_dim=enc.latent_dim, tail=enc.tail(1))
    engine = build_engine(model, cfg, total_steps=10)
    assert engine.lr() == {"lora_and_prefix": pytest.approx(1e-3), "stage1_tail": pytest.approx(1e-4)}

    T = enc.num_tokens()
    batch = _batch(tok, latent_dim=enc.latent_dim, with_tokens=(T, enc.latent_dim))
    # the PEFT LoRA weights too: under models.flat_lora they are frozen views of the one trained tensor
    trainable = {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad or "lora_" in n}

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
    assert "flat_lora.flat" in moved
    assert losses[-1] < losses[0]
    assert engine.lr()["lora_and_prefix"] < 1e-3  # decaying after the 1-step warm-up


# ------------------------------------------------------------------------------------------------
# The torch engine


def _tail_cfg(tiny_lm_dir, **optim) -> TrainConfig:
    return replace(_cfg(tiny_lm_dir, **optim), stage1={"stage1_trainable_blocks": 1})


def _model(cfg, stage1_ckpts, seed=0):
    """The prefix-LM with a trainable Stage1 tail (two LR groups); same seed, same weights."""
    from models.prefix_lm import build_prefix_lm
    from models.stage1 import load_stage1_encoder

    enc = load_stage1_encoder(stage1_ckpts[0])
    torch.manual_seed(seed)
    model, tok = build_prefix_lm(cfg.model, latent_dim=enc.latent_dim, tail=enc.tail(1))
    with torch.no_grad():  # LoRA B starts at zero (and A's gradient with it): make every weight matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    batches = [_batch(tok, n=2 + i % 2, latent_dim=enc.latent_dim, with_tokens=(enc.num_tokens(), enc.latent_dim),
                      seed=i) for i in range(8)]
    return model, batches


def _micro_step(engine, batch, seed: int, nan: bool = False):
    torch.manual_seed(seed)  # the same LoRA dropout masks in every run
    out = engine.forward(batch)
    engine.backward(out.loss * float("nan") if nan else out.loss)
    boundary = engine.is_boundary()
    return float(out.loss.detach()), boundary, engine.step()


def _trainable(engine) -> dict[str, torch.Tensor]:
    """The trained weights, PEFT's LoRA weights included (frozen views of models.flat_lora's tensor)."""
    return {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad or "lora_" in n}


@pytest.mark.parametrize("ds_config", ["ds_configs/zero2.json", "ds_configs/zero1.json"])
def test_torch_engine_makes_the_deepspeed_updates(tiny_lm_dir, stage1_ckpts, dist1, ds_config):
    """3 optimizer steps of 2 micro-batches each, clipping active, two LR groups, weight decay; ZeRO-2
    and ZeRO-1 (which reduces the gradients once per step instead of after every micro-batch)."""
    from trainer.engines import DeepSpeedEngine, TorchEngine, build_engine

    cfg = replace(_tail_cfg(tiny_lm_dir, gradient_accumulation_steps=2, max_grad_norm=0.05, weight_decay=0.01),
                  deepspeed=ds_config)
    engines, norms, losses = {}, {}, {}
    for kind in ("deepspeed", "torch"):
        model, batches = _model(cfg, stage1_ckpts)
        engines[kind] = engine = build_engine(model, replace(cfg, engine=kind), total_steps=10)
        init = _trainable(engine)
        norms[kind], losses[kind] = [], []
        for i in range(6):
            loss, boundary, applied = _micro_step(engine, batches[i], seed=100 + i)
            assert boundary == (i % 2 == 1) and bool(applied)
            losses[kind].append(loss)
            if boundary:
                norms[kind].append(engine.grad_norm())
    assert isinstance(engines["deepspeed"], DeepSpeedEngine) and isinstance(engines["torch"], TorchEngine)
    assert engines["deepspeed"].ds.zero_optimization_stage() == int(ds_config[-6])
    assert losses["torch"] == pytest.approx(losses["deepspeed"], rel=1e-6)  # fp32 reassociation only
    assert norms["torch"] == pytest.approx(norms["deepspeed"], rel=1e-5)
    assert min(norms["torch"]) > 0.05, "clipping must be active for the test to mean something"
    assert engines["torch"].lr() == pytest.approx(engines["deepspeed"].lr(), rel=1e-6)
    want, got = _trainable(engines["deepspeed"]), _trainable(engines["torch"])
    assert set(got) == set(want)
    moved = max(float((got[n] - init[n]).abs().max()) for n in got)
    assert moved > 1e-3, "the updates must be visible above the tolerance"
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=0, msg=n)


def test_zero1_reduces_once_per_step_where_zero2_reduces_every_micro_batch(tiny_lm_dir, stage1_ckpts, dist1,
                                                                          monkeypatch):
    """Why ZeRO-2 syncs the ranks at every micro-batch: it keeps only its partition of the gradients,
    so each backward reduces them (DeepSpeed refuses no_sync() for stages 2 and 3); no ZeRO-2 setting
    (overlap_comm, contiguous_gradients, bucket sizes) changes that. ZeRO-1 keeps whole gradients and
    reduces at the accumulation boundary only (ds_configs/zero1.json). Counted collectives per
    micro-batch, accumulation 4; ZeRO-1 also skips a non-finite step."""
    import torch.distributed as tdist

    from trainer.engines import build_engine

    calls = []
    for name in ("all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor"):
        original = getattr(tdist, name)
        monkeypatch.setattr(tdist, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    per_micro = {}
    for ds_config in ("ds_configs/zero2.json", "ds_configs/zero1.json"):
        cfg = replace(_tail_cfg(tiny_lm_dir, gradient_accumulation_steps=4), deepspeed=ds_config)
        model, batches = _model(cfg, stage1_ckpts)
        engine = build_engine(model, cfg, total_steps=10)
        per_micro[ds_config] = []
        for i in range(4):
            calls.clear()
            _micro_step(engine, batches[i], seed=i, nan=ds_config.endswith("zero1.json") and i == 3)
            per_micro[ds_config].append(len(calls))
    assert all(n > 0 for n in per_micro["ds_configs/zero2.json"][:3]), per_micro
    assert per_micro["ds_configs/zero1.json"][:3] == [0, 0, 0] and per_micro["ds_configs/zero1.json"][3] > 0, per_micro
    assert engine.skipped_steps == 1


@pytest.mark.parametrize("kind", ["deepspeed", "torch"])
def test_flat_lora_trains_exactly_as_separate_lora_tensors(tiny_lm_dir, stage1_ckpts, dist1, tmp_path, kind):
    """models.flat_lora (the default) hands the engine ONE LoRA tensor instead of one per A/B:
    same losses and same LoRA weights as the separate tensors over 2 optimizer steps of 2 micro-batches,
    with clipping, two LR groups and activation checkpointing (recompute reads the same views); the
    PEFT adapter files written afterwards hold the trained values."""
    from safetensors.torch import load_file

    from models.prefix_lm import save_adapter
    from trainer.engines import build_engine

    base = _tail_cfg(tiny_lm_dir, gradient_accumulation_steps=2, max_grad_norm=0.05)
    runs = {}
    for flat in (False, True):
        cfg = replace(base, engine=kind, model={"flat_lora": flat, "gradient_checkpointing": True})
        model, batches = _model(cfg, stage1_ckpts)
        init = _trainable_lora(model)
        engine = build_engine(model, cfg, total_steps=10)
        losses = [_micro_step(engine, batches[i], seed=100 + i)[0] for i in range(4)]
        n_tensors = sum(p.requires_grad for p in engine.module.parameters())
        runs[flat] = losses, _trainable_lora(engine.module), n_tensors, engine
    n_lora = sum("lora_" in n for n in init)
    assert n_lora == 2 * 7 * 2  # 2 layers x 7 projections x (A, B)
    assert runs[False][2] - runs[True][2] == n_lora - 1, "the engine sees one LoRA tensor"
    assert runs[True][0] == pytest.approx(runs[False][0], abs=1e-6)
    want, got = runs[False][1], runs[True][1]
    assert max(float((got[n] - init[n]).abs().max()) for n in got) > 1e-3, "updates above the tolerance"
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=0, msg=n)

    engine = runs[True][3]
    assert engine.flat_lora.is_linked()
    save_adapter(engine.module, tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == n_lora
    for key, value in saved.items():  # PEFT names them without the adapter name
        name = next(n for n in got if n.replace(".default", "").endswith(key.replace("base_model.model.", "", 1)))
        torch.testing.assert_close(value, got[name], atol=0, rtol=0, msg=key)


def _trainable_lora(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_flat_lora_refuses_a_layer_the_fused_forward_does_not_run(tiny_lm_dir):
    from peft.tuners.lora import Linear

    from models.flat_lora import attach_flat_lora
    from models.prefix_lm import build_prefix_lm

    model, _ = build_prefix_lm(_cfg(tiny_lm_dir).model, latent_dim=32)
    layer_name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, Linear))
    layer.__class__ = Linear  # e.g. built with --no-fused-lora
    with pytest.raises(ValueError, match=layer_name.replace(".", r"\.") + ".*--no-flat-lora"):
        attach_flat_lora(model)
    assert not hasattr(model, "flat_lora") and all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_flat_lora_relink_drops_views_of_the_replaced_storage(tiny_lm_dir):
    """After an engine re-binds the flat tensor (relink), a no-grad forward must read the new values,
    not views published from the old storage."""
    from models.flat_lora import attach_flat_lora
    from models.lora_fused import fused_lora_linear_class
    from models.prefix_lm import build_prefix_lm

    model, _ = build_prefix_lm(_cfg(tiny_lm_dir).model, latent_dim=32)
    flat = attach_flat_lora(model)
    flat.publish()
    layer = next(m for m in model.modules() if type(m) is fused_lora_linear_class())
    x = torch.randn(3, layer.in_features)
    model.eval()  # no LoRA dropout: the formula below is exact
    with torch.no_grad():
        flat.flat.data = flat.flat.data + 0.5  # what an engine's re-binding does: new storage
        flat.relink()
        got = layer(x)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        want = layer.base_layer(x) + x @ a.t() @ b.t() * layer.scaling["default"]
    assert all(m._flat_lora is None for m in model.modules() if getattr(m, "_flat_lora_owner", False))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_flat_lora_layer_refuses_the_dtype_fallback(tiny_lm_dir):
    """PEFT's own forward (the fallback for mismatched dtypes) would use the frozen weights, so a
    flat-LoRA layer must raise instead of silently training nothing."""
    from models.flat_lora import attach_flat_lora
    from models.lora_fused import fused_lora_linear_class
    from models.prefix_lm import build_prefix_lm

    model, _ = build_prefix_lm(_cfg(tiny_lm_dir).model, latent_dim=32)
    flat = attach_flat_lora(model)
    flat.publish()
    layer = next(m for m in model.modules() if type(m) is fused_lora_linear_class())
    x = torch.randn(3, layer.in_features)
    layer(x)  # matching dtypes: fine
    layer._flat_lora = {k: (a.to(torch.float64), b.to(torch.float64)) for k, (a, b) in layer._flat_lora.items()}
    with pytest.raises(RuntimeError, match="flat LoRA: adapter dtype"):
        layer(x)


def _optimizer_state(engine) -> list[torch.Tensor]:
    return [v.detach().clone() for s in engine.optimizer.state.values() for v in s.values()
            if isinstance(v, torch.Tensor)]


def test_torch_engine_skips_a_nan_step_and_goes_on(tiny_lm_dir, stage1_ckpts):
    """A NaN step changes nothing (weights, AdamW moments and step count, LR schedule) and needs no
    host sync (step() returns a device bool); the run then equals one that never saw the NaN."""
    from trainer.engines import build_engine

    cfg = replace(_tail_cfg(tiny_lm_dir, max_grad_norm=1.0), engine="torch")
    model, batches = _model(cfg, stage1_ckpts)
    engine = build_engine(model, cfg, total_steps=10)
    _micro_step(engine, batches[0], seed=1)
    weights, state, lr = _trainable(engine), _optimizer_state(engine), engine.lr()

    _, boundary, applied = _micro_step(engine, batches[1], seed=2, nan=True)
    assert boundary and isinstance(applied, torch.Tensor) and applied.dtype == torch.bool and not bool(applied)
    assert engine.skipped_steps == 1 and engine.lr() == lr
    assert all(torch.equal(a, b) for a, b in zip(_optimizer_state(engine), state))
    now = _trainable(engine)
    assert all(torch.equal(now[n], weights[n]) for n in weights)
    assert all(bool(g.grad.eq(0).all()) for g in engine.groups), "the NaN gradients are dropped"

    _, _, applied = _micro_step(engine, batches[2], seed=3)
    assert bool(applied) and engine.skipped_steps == 1

    ref_model, _ = _model(cfg, stage1_ckpts)
    ref = build_engine(ref_model, cfg, total_steps=10)
    _micro_step(ref, batches[0], seed=1)
    _micro_step(ref, batches[2], seed=3)
    want, got = _trainable(ref), _trainable(engine)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert engine.lr() == ref.lr()


def test_torch_engine_save_load_round_trip(tiny_lm_dir, stage1_ckpts, tmp_path):
    from trainer.engines import TORCH_ENGINE_STATE, build_engine

    cfg = replace(_tail_cfg(tiny_lm_dir, gradient_accumulation_steps=2), engine="torch")
    model, batches = _model(cfg, stage1_ckpts)
    engine = build_engine(model, cfg, total_steps=10)
    for i in range(4):
        _micro_step(engine, batches[i], seed=i)
    engine.save(tmp_path, "step-2", client_state={"trainer_state": {"step": 2}})
    assert (tmp_path / "step-2" / TORCH_ENGINE_STATE).is_file()
    assert not [p for p in (tmp_path / "step-2").iterdir() if p.name.startswith(".")], "no temp file left"
    want = [_micro_step(engine, batches[i], seed=i)[0] for i in range(4, 8)]

    other, _ = _model(cfg, stage1_ckpts, seed=7)  # other initial weights: everything must come from the file
    resumed = build_engine(other, cfg, total_steps=10)
    assert resumed.load(tmp_path, "step-2") == {"trainer_state": {"step": 2}}
    got = [_micro_step(resumed, batches[i], seed=i)[0] for i in range(4, 8)]
    assert got == want
    a, b = _trainable(engine), _trainable(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a) and resumed.lr() == engine.lr()

    with pytest.raises(FileNotFoundError, match="not a --engine torch checkpoint"):
        resumed.load(tmp_path, "step-9")


def _plant_pickle(path, marker) -> None:
    """Replace a checkpoint file by a pickle that creates `marker` when unpickled, padded to the
    file's size (so that only loading it can tell)."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    data = pickle.dumps(Payload())
    path.write_bytes(data + b"\0" * (path.stat().st_size - len(data)))


def test_deepspeed_resume_is_weights_only_and_falls_back_past_a_truncated_checkpoint(tiny_lm_dir, stage1_ckpts,
                                                                                     dist1, tmp_path):
    import re

    from trainer.checkpoint import CheckpointError, TrainerState, load_resume_checkpoint, save_resume_checkpoint
    from trainer.engines import build_engine
    from trainer.engines.deepspeed_engine import ds_checkpoint_safe_globals

    cfg = _tail_cfg(tiny_lm_dir)
    model, batches = _model(cfg, stage1_ckpts)
    engine = build_engine(model, cfg, total_steps=10)
    saved = {}
    for step in (1, 2):
        _micro_step(engine, batches[step], seed=step)
        save_resume_checkpoint(engine, tmp_path, TrainerState(step=step), True, keep=10)
        saved[step] = _trainable(engine)
    root = tmp_path / "resume"
    # The classes a weights-only load allows are exactly those DeepSpeed's files hold besides tensors.
    needed = set()
    for f in root.rglob("*.pt"):
        needed |= set(torch.serialization.get_unsafe_globals_in_checkpoint(f))
    assert needed == {f"{c.__module__}.{c.__qualname__}" for c in ds_checkpoint_safe_globals()}

    # The newest checkpoint's model states are truncated: resume falls back to step 1, with a warning.
    states = root / "step-2" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    other, _ = _model(cfg, stage1_ckpts, seed=7)  # other initial weights: everything must come from the files
    resumed = build_engine(other, cfg, total_steps=10)
    warnings = []
    state = load_resume_checkpoint(resumed, tmp_path, 0, 1, warn=warnings.append)
    assert state.step == 1 and any(str(states) in w for w in warnings), warnings
    got = _trainable(resumed)
    assert all(torch.equal(got[n], saved[1][n]) for n in saved[1])

    # A pickle planted in place of a file runs nothing: resume stops with an error naming the file.
    marker = tmp_path / "planted-code-ran"
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        path = root / "step-1" / name
        original = path.read_bytes()
        _plant_pickle(path, marker)
        with pytest.raises(CheckpointError, match=re.escape(str(path)) + ": refused"):
            load_resume_checkpoint(resumed, tmp_path, 0, 1)
        assert not marker.exists()
        path.write_bytes(original)


def test_torch_engine_resume_refuses_a_planted_pickle(tiny_lm_dir, stage1_ckpts, tmp_path):
    import re

    from trainer.checkpoint import CheckpointError, TrainerState, load_resume_checkpoint, save_resume_checkpoint
    from trainer.engines import TORCH_ENGINE_STATE, build_engine

    cfg = replace(_tail_cfg(tiny_lm_dir), engine="torch")
    model, batches = _model(cfg, stage1_ckpts)
    engine = build_engine(model, cfg, total_steps=10)
    _micro_step(engine, batches[0], seed=0)
    save_resume_checkpoint(engine, tmp_path, TrainerState(step=1), True)
    path, marker = tmp_path / "resume" / "step-1" / TORCH_ENGINE_STATE, tmp_path / "planted-code-ran"
    _plant_pickle(path, marker)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ": cannot load: UnpicklingError"):
        load_resume_checkpoint(engine, tmp_path, 0, 1)
    assert not marker.exists()


def test_engine_flag_parses_and_is_checked():
    from trainer.config import parse_train_config

    base = ["--shard-dir", "s", "--model-path", "m"]
    assert parse_train_config(base).engine == "deepspeed"
    assert parse_train_config(base + ["--engine", "torch"]).engine == "torch"
    with pytest.raises(SystemExit):
        parse_train_config(base + ["--engine", "fsdp"])


# ------------------------------------------------------------------------------------------------
# The torch engine through launch/train.sh (2 CPU processes, gloo)


@pytest.fixture
def launcher_env(monkeypatch):
    """The `dist1` fixture's process group put its layout (MASTER_PORT, ...) into os.environ: the
    launched job must pick its own, not the port this process is listening on."""
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.slow
def test_two_process_torch_engine_run_learns_and_checkpoints(shard_dir, tiny_lm_dir, tmp_path, launcher_env):
    from tests.test_train_e2e import base_flags, run_train, train_records
    from trainer.engines import TORCH_ENGINE_STATE

    out = tmp_path / "run"
    run_train(base_flags(shard_dir, tiny_lm_dir, out, **{"engine": "torch", "max-steps": 8, "save-steps": 4,
                                                        "gradient-accumulation-steps": 2}))
    recs = train_records(out)
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert recs[-1]["loss"] < recs[0]["loss"], [r["loss"] for r in recs]
    for ckpt in ("checkpoint-4", "final"):
        assert (out / ckpt / "adapter_model.safetensors").is_file()
    assert (out / "resume" / "latest").read_text().strip() == "step-8"
    assert (out / "resume" / "step-8" / TORCH_ENGINE_STATE).is_file()


@pytest.mark.slow
def test_ddp_engine_resume_reproduces_the_uninterrupted_losses_and_epoch(small_shard_dir, tiny_lm_dir, tmp_path,
                                                                        launcher_env):
    """tests/test_resume.py with --engine ddp (and a NaN step inside the resumed part). The torch and
    ddp engines share their step and checkpoint file (trainer/engines/flat_adamw.py; the torch
    engine's round trip is test_torch_engine_save_load_round_trip). Epoch 0 ends inside the resumed
    part: the run's own exactly-once record (trainer/exactly_once.py) must say every train sample was
    trained once, in both runs, with the same digest."""
    from common.io import read_jsonl
    from data_prep.manifest import load_manifest
    from tests.test_train_e2e import base_flags, run_train

    # small_shard_dir: 200 train samples / 2 ranks / 16 per batch = 7 batches per epoch (as in tests/test_resume.py)
    out = tmp_path / "run"
    flags = base_flags(small_shard_dir, tiny_lm_dir, out, **{"engine": "ddp", "batch-size": 16, "num-epochs": 2,
                                                            "max-steps": 10, "save-steps": 3, "save-total-limit": 10,
                                                            "lora-dropout": 0.1, "debug-nan-at-steps": [8],
                                                            "strict-exactly-once": True})
    run_train(flags)
    first = read_jsonl(out / "train_log.jsonl")
    assert first[0]["steps_per_epoch"][0] == 7, first[0]  # the premise: steps 7..10 cross into epoch 1
    (out / "resume" / "latest").write_text("step-6\n")
    run_train(flags + ["--resume"])
    second = read_jsonl(out / "train_log.jsonl")[len(first):]
    assert second[0]["kind"] == "start" and second[0]["step"] == 6, second[0]

    def records(recs):
        return {r["step"]: r for r in recs if r["kind"] == "train" and r["step"] > 6}

    want, got = records(first), records(second)
    assert sorted(got) == sorted(want) == [7, 8, 9, 10]
    for step in want:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-5), step
        assert got[step]["nan_steps_total"] == want[step]["nan_steps_total"] == (0 if step < 8 else 1)

    n = load_manifest(small_shard_dir).num_samples("train")
    epochs = [[r for r in recs if r["kind"] == "epoch"] for recs in (first, second)]
    for recs in epochs:  # epoch 0 checked at its end (step 7), epoch 1 cut by --max-steps
        assert [(r["epoch"], r["complete"]) for r in recs] == [(0, True), (1, False)], recs
        assert recs[0]["ok"] and recs[0]["count"] == recs[0]["expected_count"] == n
        assert sum(recs[0]["rank_counts"]) == n and len(recs[0]["rank_counts"]) == 2
    assert epochs[1][0]["digest"] == epochs[0][0]["digest"] and epochs[1][1] == epochs[0][1]


def test_benchmark_mode4_steps_the_torch_engine(tmp_path, synthetic_data):
    """benchmarks/train_throughput.py --step-engine torch times the trainer's torch engine."""
    import json

    from benchmarks import train_throughput as tp

    json_paths, _ = synthetic_data
    out = tmp_path / "tp.json"
    rc = tp.main(["--shape", "tiny", "--device", "cpu", "--modes", "4", "--step-engine", "torch", "--steps", "2",
                  "--warmup-steps", "1", "--token-budget", "512", "--gemini-json", *map(str, json_paths),
                  "--out", str(out)])
    mode4 = json.loads(out.read_text())["modes"]["4"]
    assert rc == 0, mode4.get("error")
    assert mode4["step_engine"] == "torch" and "torch engine (the trainer's step)" in mode4["label"]
    assert mode4["loss_finite"] and mode4["tokens_per_s"] > 0


@pytest.mark.slow
def test_torch_engine_nan_streak_stops_the_run_at_the_next_log_step(shard_dir, tiny_lm_dir, tmp_path, launcher_env):
    """The torch engine's skip flags are read at log steps (no per-step sync): a streak longer than
    --max-nan-steps still stops the run, with the counters logged exactly, and no final checkpoint."""
    from tests.test_train_e2e import base_flags, run_train, train_records

    out = tmp_path / "nan"
    proc = run_train(base_flags(shard_dir, tiny_lm_dir, out, **{"engine": "torch", "max-steps": 9, "log-steps": 3,
                                                                "debug-nan-at-steps": [2, 5, 6, 7],
                                                                "max-nan-steps": 2}), num_procs=1, check=False)
    assert proc.returncode != 0
    assert "3 consecutive non-finite steps (> --max-nan-steps 2) at step 7" in proc.stderr + proc.stdout
    assert [(r["step"], r["nan_steps_total"]) for r in train_records(out)] == [(3, 1), (6, 3)]
    assert all(r["loss"] == r["loss"] for r in train_records(out))  # skipped steps do not poison the loss
    assert not (out / "final").exists()
