"""`--engine ddp` (trainer/engines/ddp_engine.py): DistributedDataParallel in 2 CPU processes (gloo).

Reference: ONE process with the torch engine and twice the accumulation, over the same
micro-batches (same dropout seeds). Two ranks with half the accumulation see the same gradient
per optimizer step (the mean over ranks of their window sums), so in fp32 the losses and weights
must match the reference to reassociation noise, for DDP and the torch engine alike; a resume from
a DDP checkpoint continues bit for bit, and the torch engine resumes from the same file.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.test_engine import _batch, _micro_step, _model, _tail_cfg, _trainable
from trainer.config import replace

STEPS, ACCUM_1 = 3, 4  # optimizer steps; accumulation of the 1-process reference
SAVE_AT = 2  # the ranks save after this many steps, then a fresh engine resumes from it


def _cfg(tiny_lm_dir, accum: int, engine: str):
    return replace(_tail_cfg(tiny_lm_dir, gradient_accumulation_steps=accum, max_grad_norm=0.05, weight_decay=0.01),
                   engine=engine)


def _data(cfg, stage1_ckpts, seed=0):
    """The model (seeded) and STEPS x ACCUM_1 micro-batches of 2-3 examples each."""
    from models.prefix_lm import load_tokenizer
    from models.stage1 import load_stage1_encoder

    model, _ = _model(cfg, stage1_ckpts, seed=seed)
    enc = load_stage1_encoder(stage1_ckpts[0])
    tok = load_tokenizer(cfg.model.model_path)
    batches = [_batch(tok, n=2 + i % 2, latent_dim=enc.latent_dim, with_tokens=(enc.num_tokens(), enc.latent_dim),
                      seed=i) for i in range(STEPS * ACCUM_1)]
    return model, batches


def _run(engine, batches, steps: range, rank: int, world: int) -> list[float]:
    """Optimizer steps `steps`; rank r takes micro-batches r*A .. r*A + A - 1 of each step's ACCUM_1."""
    accum = ACCUM_1 // world
    losses = []
    for s in steps:
        for m in range(accum):
            i = s * ACCUM_1 + rank * accum + m
            loss, boundary, applied = _micro_step(engine, batches[i], seed=100 + i)
            assert boundary == (m == accum - 1) and bool(applied)
            losses.append(loss)
    return losses


def _worker(rank: int, world: int, init_file: str, tiny_lm_dir: str, stage1_ckpts, out_dir: str) -> None:
    from trainer.engines import DDPEngine, build_engine

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = _cfg(tiny_lm_dir, ACCUM_1 // world, "ddp")
        model, batches = _data(cfg, stage1_ckpts)
        engine = build_engine(model, cfg, total_steps=10)
        assert isinstance(engine, DDPEngine) and engine.ddp is not None
        losses = _run(engine, batches, range(SAVE_AT), rank, world)
        engine.save(out_dir, "ckpt", client_state={"at": SAVE_AT})
        dist.barrier()  # rank 0 wrote the file
        losses += _run(engine, batches, range(SAVE_AT, STEPS), rank, world)
        out = {"ddp": {"losses": losses, "weights": _trainable(engine), "lr": engine.lr()}}
        # Resume into a fresh engine (other initial weights: everything must come from the file).
        model, batches = _data(cfg, stage1_ckpts, seed=7)
        engine = build_engine(model, cfg, total_steps=10)
        assert engine.load(out_dir, "ckpt") == {"at": SAVE_AT}
        out["resumed"] = {"losses": _run(engine, batches, range(SAVE_AT, STEPS), rank, world),
                          "weights": _trainable(engine), "lr": engine.lr()}
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_reproduces_one_process_and_resumes(tiny_lm_dir, stage1_ckpts, tmp_path):
    from trainer.engines import TorchEngine, build_engine

    mp.start_processes(_worker, args=(2, str(tmp_path / "rendezvous"), str(tiny_lm_dir), tuple(map(str, stage1_ckpts)),
                                      str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # The reference: one process, the torch engine, the whole accumulation window.
    cfg = _cfg(tiny_lm_dir, ACCUM_1, "torch")
    model, batches = _data(cfg, stage1_ckpts)
    engine = build_engine(model, cfg, total_steps=10)
    init = _trainable(engine)
    ref_losses = _run(engine, batches, range(STEPS), 0, 1)
    ref, ref_lr = _trainable(engine), engine.lr()
    assert max(float((ref[n] - init[n]).abs().max()) for n in ref) > 1e-3, "updates above the tolerance"

    # rank r's micro-batches are the reference's 2r, 2r + 1 of every step
    got = [ranks[r]["ddp"]["losses"][2 * s + m] for s in range(STEPS) for r in range(2) for m in range(2)]
    assert got == pytest.approx(ref_losses, abs=1e-5)
    for r in range(2):
        assert ranks[r]["ddp"]["lr"] == pytest.approx(ref_lr, rel=1e-6)
        for n, want in ref.items():
            torch.testing.assert_close(ranks[r]["ddp"]["weights"][n], want, atol=2e-6, rtol=0, msg=f"rank {r} {n}")
            assert torch.equal(ranks[r]["ddp"]["weights"][n], ranks[0]["ddp"]["weights"][n]), "ranks identical"
        # Resume: from the checkpoint on, the same computation as the uninterrupted run, bit for bit.
        want, resumed = ranks[r]["ddp"], ranks[r]["resumed"]
        assert resumed["losses"] == want["losses"][2 * SAVE_AT:] and resumed["lr"] == want["lr"]
        assert all(torch.equal(resumed["weights"][n], want["weights"][n]) for n in ref)

    # The DDP checkpoint resumes under the torch engine too (one file format, same masters layout).
    model, batches = _data(cfg, stage1_ckpts, seed=7)
    engine = build_engine(model, cfg, total_steps=10)
    assert isinstance(engine, TorchEngine) and engine.load(tmp_path, "ckpt") == {"at": SAVE_AT}
    assert _run(engine, batches, range(SAVE_AT, STEPS), 0, 1) == pytest.approx(ref_losses[ACCUM_1 * SAVE_AT:], abs=1e-5)
    for n, w in _trainable(engine).items():
        torch.testing.assert_close(w, ref[n], atol=2e-6, rtol=0, msg=n)


def test_ddp_engine_one_process_equals_the_torch_engine(tiny_lm_dir, stage1_ckpts):
    """World of one: no DDP wrapper, the torch engine's step over unpacked parameters: same updates."""
    from trainer.engines import DDPEngine, build_engine

    runs = {}
    for kind in ("ddp", "torch"):
        cfg = _cfg(tiny_lm_dir, 2, kind)
        model, batches = _data(cfg, stage1_ckpts)
        engine = build_engine(model, cfg, total_steps=10)
        runs[kind] = [_micro_step(engine, batches[i], seed=i)[0] for i in range(4)], _trainable(engine), engine
    assert isinstance(runs["ddp"][2], DDPEngine) and runs["ddp"][2].ddp is None
    assert runs["ddp"][0] == pytest.approx(runs["torch"][0], abs=1e-6)
    for n, want in runs["torch"][1].items():
        torch.testing.assert_close(runs["ddp"][1][n], want, atol=1e-6, rtol=0, msg=n)



def test_ddp_looks_for_unused_parameters_only_when_a_batch_may_have_no_image():
    """find_unused_parameters costs a graph walk per reducing backward: only with task D
    (text_summary, no image prefix), where a batch of only D examples leaves the prefix unused."""
    from trainer.engines.ddp_engine import may_skip_prefix

    cfg = _cfg("m", 1, "ddp")
    assert not may_skip_prefix(cfg)
    assert may_skip_prefix(replace(cfg, schedule={"text_summary": True}))
    assert not may_skip_prefix(replace(cfg, schedule={"schedule": "summary_centric"}))
    assert may_skip_prefix(replace(cfg, schedule={"schedule": "summary_centric", "text_summary": True,
                                                  "prob_text_summary": 0.1, "prob_summary": 0.6}))
