"""benchmarks/scaling.py (multi-GPU scaling driver) and benchmarks/make_random_model.py.

The end-to-end tests run the real trainer through launch/train.sh with 1 and 2 CPU processes
(DS_ACCELERATOR=cpu) and the real shard builder with 1 and 2 processes.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.multigpu.config import ScalingConfig, grad_accum_steps
from benchmarks.multigpu.inputs import Inputs
from benchmarks.multigpu.metrics import epoch_coverage, loss_agreement, scaling_efficiency, throughput
from benchmarks.multigpu.runs import train_flags

# ------------------------------------------------------------------------------------------------
# Pure parts


def test_grad_accum_keeps_the_global_batch_equal():
    cfg = ScalingConfig(gpus=[1, 2, 4, 8], batch_size=4)
    accum = grad_accum_steps(cfg)
    assert {n: cfg.batch_size * a * n for n, a in accum.items()} == {n: 32 for n in (1, 2, 4, 8)}
    assert accum[8] == 1
    with pytest.raises(ValueError, match="multiple of 12"):
        grad_accum_steps(ScalingConfig(gpus=[1, 2, 3], batch_size=2, global_batch=8))


def test_config_rejects_bad_step_counts():
    with pytest.raises(ValueError, match="warmup"):
        ScalingConfig(max_steps=3, warmup_steps=3).validate()
    with pytest.raises(ValueError, match="distinct"):
        ScalingConfig(gpus=[2, 2]).validate()


def _records(step_seconds: list[float], tokens: int, losses=None) -> list[dict]:
    return [{"step": i + 1, "real_tokens": tokens, "tokens_per_s": tokens / s,
             "loss": (losses[i] if losses else 1.0)} for i, s in enumerate(step_seconds)]


def test_throughput_skips_warmup_and_weights_by_time():
    recs = _records([10.0, 1.0, 2.0, 1.0], tokens=1000)  # step 1 is a slow warm-up step
    tp = throughput(recs, warmup_steps=1, num_gpus=2)
    assert tp["steady_steps"] == 3 and tp["first_step"] == 2
    assert tp["tokens_per_s"] == pytest.approx(3000 / 4.0)  # total tokens / total time, not a mean of rates
    assert tp["tokens_per_s_per_gpu"] == pytest.approx(3000 / 4.0 / 2)
    assert tp["ms_per_step"] == pytest.approx(4000 / 3)


def test_throughput_of_log_windows_counts_steps_not_records():
    # --log-steps 5: records at steps 5, 10, 15, each covering 5 steps; the first window is warm-up.
    recs = [{"step": st, "real_tokens": 5000, "tokens_per_s": 5000 / sec, "loss": 1.0}
            for st, sec in ((5, 50.0), (10, 5.0), (15, 10.0))]
    tp = throughput(recs, warmup_steps=5, num_gpus=1)
    assert (tp["steady_steps"], tp["log_records"], tp["first_step"]) == (10, 2, 10)
    assert tp["tokens_per_s"] == pytest.approx(10000 / 15.0)
    assert tp["ms_per_step"] == pytest.approx(1500.0) and tp["tokens_per_step"] == pytest.approx(1000.0)
    # A warm-up that ends inside a window leaves that whole window out.
    assert throughput(recs, warmup_steps=7, num_gpus=1)["steady_steps"] == 5


def test_scaling_efficiency_against_the_smallest_run():
    eff = scaling_efficiency({1: {"tokens_per_s": 100.0}, 2: {"tokens_per_s": 180.0}, 4: {"tokens_per_s": 300.0}})
    assert eff == pytest.approx({1: 1.0, 2: 0.9, 4: 0.75})
    eff = scaling_efficiency({2: {"tokens_per_s": 200.0}, 4: {"tokens_per_s": 360.0}})  # no 1-GPU run
    assert eff == pytest.approx({2: 1.0, 4: 0.9})


def test_rank_times_are_step_weighted_over_steady_windows_of_every_run():
    from benchmarks.multigpu.metrics import rank_times

    def rec(step, data, fwd):
        return {"step": step, "rank_ms_per_step": {"data": data, "fwd_bwd": fwd}}

    run_a = [rec(10, [100.0, 100.0], [1.0, 1.0]), rec(20, [1.0, 3.0], [10.0, 20.0]), rec(30, [3.0, 5.0], [30.0, 40.0])]
    run_b = [rec(20, [5.0, 7.0], [50.0, 60.0])]  # one window of 20 steps, all after the warm-up of 0
    assert rank_times([run_a], warmup_steps=10) == {"data": [2.0, 4.0], "fwd_bwd": [20.0, 30.0]}
    pooled = rank_times([run_a, run_b], warmup_steps=0)  # 30 + 20 steps
    assert pooled["data"] == pytest.approx([(1000 + 10 + 30 + 100) / 50, (1000 + 30 + 50 + 140) / 50])
    assert rank_times([[{"step": 10}]], warmup_steps=0) == {}  # an older log without the field


def test_slowdown_breakdown_adds_up_to_the_extra_time_per_micro_batch():
    from benchmarks.multigpu.metrics import slowdown_breakdown

    # 1 GPU, accumulation 2: per step 2 x (1 data + 100 issue) + 6 step + 2 other = 210 ms -> 105 per micro-batch
    one = {"data": [2.0], "fwd_bwd": [200.0], "step": [6.0], "other": [2.0]}
    # 2 GPUs, accumulation 1: both ranks take the same wall time per window
    w1 = {"step": 10, "rank_ms_per_step": {"data": [1.0, 1.0], "fwd_bwd": [100.0, 110.0], "step": [16.0, 6.0], "other": [1.0, 1.0]}}
    w2 = {"step": 30, "rank_ms_per_step": {"data": [1.0, 2.0], "fwd_bwd": [104.0, 100.0], "step": [5.0, 8.0], "other": [1.0, 1.0]}}
    b = slowdown_breakdown([[w1, w2]], 1, one, 2, warmup_steps=0)
    assert b["ms_per_micro_batch_1"] == pytest.approx(105.0)
    # window 1 (10 steps): slow rank 1: data 0, issue +5, stragglers +5, step +3, other 0 -> 118 - 105 = +13
    # window 2 (20 steps): slow rank 0: data 0, issue +2, stragglers +2, step +2, other 0 -> 111 - 105 = +6
    expect = {"data": 0.0, "host_issue": (5 * 10 + 2 * 20) / 30, "stragglers": (5 * 10 + 2 * 20) / 30,
              "sync_step": (3 * 10 + 2 * 20) / 30, "other": 0.0}
    for k, v in expect.items():
        assert b[k] == pytest.approx(v), k
    assert b["total"] == pytest.approx((13 * 10 + 6 * 20) / 30)
    assert b["total"] == pytest.approx(sum(expect.values()))
    assert slowdown_breakdown([[w1]], 1, one, 2, warmup_steps=10) == {}  # all windows in the warm-up


def test_pooled_throughput_sums_tokens_and_seconds():
    from benchmarks.multigpu.metrics import pooled_throughput

    a = {"steady_steps": 100, "real_tokens": 1000, "seconds": 10.0}
    b = {"steady_steps": 100, "real_tokens": 1000, "seconds": 30.0}
    p = pooled_throughput([a, b, {"steady_steps": 0}], num_gpus=2)
    assert p["tokens_per_s"] == 2000 / 40 and p["tokens_per_s_per_gpu"] == 25 and p["runs"] == 2
    assert p["ms_per_step"] == 1000 * 40 / 200
    assert pooled_throughput([], 1) == {"steady_steps": 0}


def test_loss_agreement_at_equal_steps():
    ref = _records([1.0] * 5, 10, losses=[5.0, 4.0, 3.0, 2.5, 2.0])
    other = _records([1.0] * 4, 10, losses=[5.0, 4.5, 3.1, 2.4])  # one step shorter
    a = loss_agreement({1: ref, 2: other}, last_k=2)["per_gpus"][2]
    assert a["common_steps"] == 4 and a["max_abs_diff"] == pytest.approx(0.5) and a["max_abs_diff_step"] == 2
    assert a["mean_abs_diff_last_k"] == pytest.approx((0.1 + 0.1) / 2)
    assert loss_agreement({1: ref}, last_k=2) == {}


@pytest.mark.parametrize("world_size", [1, 3])
def test_epoch_coverage_replays_the_trainers_data_plan(shard_dir, tiny_lm_dir, tmp_path, world_size):
    """Every train sample exactly once per epoch; with N % W != 0 the short ranks get loss-free copies."""
    from data_prep.manifest import load_manifest

    cfg = ScalingConfig(gpus=[world_size], batch_size=3, num_workers=0, max_steps=2, warmup_steps=0)
    flags = train_flags(cfg, Inputs(shard_dir=str(shard_dir), model_path=str(tiny_lm_dir)), 1, tmp_path / "run")
    cov = epoch_coverage(flags, world_size)
    n = load_manifest(shard_dir).num_samples("train")
    assert cov["train_samples"] == n and cov["exactly_once"], cov
    assert cov["loss_free_duplicates"] == math.ceil(n / world_size) * world_size - n
    assert cov["equal_batches_per_rank"]


# ------------------------------------------------------------------------------------------------
# make_random_model


def test_make_random_model_tiny_loads_like_a_real_model(tmp_path, synthetic_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.make_random_model import main
    from models.stage1 import load_stage1_classifier, load_stage1_encoder

    json_paths, _ = synthetic_data
    out = main(["--shape", "tiny", "--out", str(tmp_path / "lm"), "--stage1-out", str(tmp_path / "s1"),
                "--gemini-json", *map(str, json_paths)])
    tok = AutoTokenizer.from_pretrained(out["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(out["model_dir"])
    ids = tok("Areas affected...portions of southeast OH", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tok.bos_token_id and ids.max().item() < model.config.vocab_size
    assert torch.isfinite(model(ids).logits).all()
    assert load_stage1_encoder(out["stage1_encoder_ckpt"]).latent_dim > 0
    assert load_stage1_classifier(out["stage1_classifier_ckpt"]).num_classes == 20


def test_write_random_lm_sharded_bf16_with_a_larger_vocab(tmp_path):
    """The 7b path at toy width: bf16 safetensors in several shards + index, vocab > tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.make_random_model import write_random_lm
    from tiny_models.lm import tiny_mistral_config, train_tokenizer

    tokenizer = train_tokenizer(["The image is a map of the southern plains."] * 4, vocab_size=300)
    config = tiny_mistral_config(vocab_size=4096, hidden_size=64, num_layers=2)
    out = write_random_lm(tmp_path / "lm", config, tokenizer, seed=3, device="cpu", max_shard_size="200KB")
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and model.config.vocab_size == 4096
    assert model.config.pad_token_id == AutoTokenizer.from_pretrained(out).pad_token_id
    again = write_random_lm(tmp_path / "lm2", tiny_mistral_config(vocab_size=4096), tokenizer, seed=3, device="cpu")
    w1 = AutoModelForCausalLM.from_pretrained(out).model.embed_tokens.weight
    assert torch.equal(w1, AutoModelForCausalLM.from_pretrained(again).model.embed_tokens.weight)  # seeded


def test_write_random_lm_refuses_a_vocab_smaller_than_the_tokenizer(tmp_path):
    from benchmarks.make_random_model import write_random_lm
    from tiny_models.lm import tiny_mistral_config, train_tokenizer

    tokenizer = train_tokenizer(["a b c d e f g"] * 4, vocab_size=300)
    with pytest.raises(ValueError, match="embedding rows"):
        write_random_lm(tmp_path / "lm", tiny_mistral_config(vocab_size=100), tokenizer, device="cpu")


@pytest.mark.slow
def test_vit_b_stage1_checkpoints_are_the_real_sizes(tmp_path):
    from benchmarks.make_random_model import write_stage1
    from models.stage1 import load_stage1_classifier, load_stage1_encoder

    enc, cls = write_stage1(tmp_path, "vit-b")
    encoder, classifier = load_stage1_encoder(enc), load_stage1_classifier(cls)
    assert (encoder.config.image_size, encoder.num_layers, encoder.latent_dim) == (224, 12, 768)
    assert 3.5e6 < sum(p.numel() for p in classifier.parameters()) < 5e6  # B0 with 20 classes (~4.0M)
    with torch.no_grad():
        latent, _ = encoder.encode(torch.randn(1, 3, 224, 224))
    assert latent.shape == (1, 768)


# ------------------------------------------------------------------------------------------------
# End to end (real launcher, real trainer, CPU processes)


@pytest.mark.slow
def test_scaling_end_to_end_on_cpu(shard_dir, tiny_lm_dir, tmp_path):
    from benchmarks.scaling import main

    work = tmp_path / "scaling"
    # Log records every 2 steps (the trainer's --log-steps), as the GPU runs log every 10. The session's
    # shards and tiny LM stand in for the ones the benchmark would make (test_builder_scaling_on_cpu
    # runs its builder).
    code = main(["--shape", "tiny", "--gpus", "1", "2", "--max-steps", "4", "--warmup-steps", "2", "--last-k", "2",
                 "--log-steps", "2", "--batch-size", "2", "--num-workers", "0", "--fault-drill",
                 "--fault-stop-timeout-s", "120", "--workdir", str(work), "--shard-dir", str(shard_dir),
                 "--model-path", str(tiny_lm_dir)])
    result = json.loads((work / "scaling.json").read_text())
    assert result["environment"]["OMP_NUM_THREADS"] == "1"  # CPU ranks share the cores (recorded for GPU runs too)
    runs = result["training"]["runs"]
    assert code == 0, {n: r["error"] for n, r in runs.items()}
    assert [runs[n]["grad_accum"] for n in ("1", "2")] == [2, 1]
    for n in ("1", "2"):
        r = runs[n]
        assert r["start"]["world_size"] == int(n) and [s["step"] for s in r["steps"]] == [2, 4]
        assert r["throughput"]["steady_steps"] == 2 and r["throughput"]["log_records"] == 1
        assert r["throughput"]["tokens_per_s"] > 0
        assert r["coverage"]["exactly_once"], r["coverage"]
        assert r["logged_samples"]["examples_trained"] == 4 * 4  # 4 steps x global batch 4
        assert [len(v) for v in r["rank_ms_per_step"].values()] == [int(n)] * 4, r["rank_ms_per_step"]
        assert min(r["rank_ms_per_step"]["fwd_bwd"]) > 0 and len(r["repeats"]) == 1
    assert result["training"]["efficiency"]["1"] == pytest.approx(1.0)
    agree = result["training"]["loss_agreement"]["per_gpus"]["2"]
    # Same model and data, but each GPU count sees the epoch's examples in another order, so with
    # 4 tiny steps the per-step losses agree only statistically (the GPU run, hundreds of steps,
    # is where agreement is judged); here: the comparison is computed over every common step.
    assert agree["common_steps"] == 2 and math.isfinite(agree["max_abs_diff"])
    assert agree["mean_abs_diff_last_k"] <= agree["max_abs_diff"]
    report = (work / "scaling.md").read_text()
    assert "| 2 | 1 | 4 | 2 |" in report and "exactly once" in report and "Where each rank's time goes" in report
    # Fault drill: rank 1 of the 2-process run SIGKILLed after the step-2 checkpoint; the launcher
    # stops the job (no process left), and --resume trains steps 3-4 exactly as the uninterrupted run
    # (one log record, step 4, covering both).
    drill = result["training"]["fault_drill"]
    assert drill["ok"], drill
    assert drill["checkpoint"] == "step-2" and drill["survivors"] == 0 and drill["exit_code"] != 0
    # The launcher names the first rank it sees exit: the killed one (-9) or the survivor, whose
    # collective failed when its peer died (return code 1): which comes first is a race.
    assert drill["stop_s"] < 120 and any("exits with return code" in line for line in drill["stop_message"]), \
        drill["stop_message"]
    assert drill["resumed_at_step"] == 2 and drill["compared_steps"] == 1 and drill["same_data_position"]
    assert drill["max_abs_loss_diff"] < 1e-5  # fp32 on CPU: the resumed steps are the same computation
    assert "Fault drill on 2 GPU(s)" in report


@pytest.mark.slow
def test_builder_scaling_on_cpu(tmp_path):
    from benchmarks.scaling import main

    work = tmp_path / "scaling"
    # An empty --gpus (no training runs) is given through a config file: argparse wants >= 1 value.
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({"gpus": [], "builder_gpus": [1, 2], "builder_images": 80, "builder_image_px": 32,
                                    "builder_num_workers": 0, "shape": "tiny", "workdir": str(work)}))
    code = main(["--config", str(cfg_file)])
    b = json.loads((work / "scaling.json").read_text())["builder"]
    assert code == 0, [r.get("error") for r in b["runs"]]
    assert [r["processes"] for r in b["runs"]] == [1, 2]
    assert all(r["images"] == 80 and r["images_per_s"] > 0 for r in b["runs"])
    assert [len(r["nodes"]) for r in b["runs"]] == [1, 2]  # both processes built shards
    assert b["identical_shards"] is True
    assert b["runs"][1]["speedup"] > 0


# ------------------------------------------------------------------------------------------------
# Several engines, weak scaling (the runs themselves faked: the plumbing and the report)


def test_engine_entries_and_weak_accumulation():
    from benchmarks.multigpu.config import engine_flags

    assert engine_flags("ddp") == ["--engine", "ddp"]
    assert engine_flags("deepspeed:ds_configs/zero1.json") == ["--engine", "deepspeed", "--deepspeed", "ds_configs/zero1.json"]
    for bad in ("fsdp", "torch:x.json", "deepspeed:"):
        with pytest.raises(ValueError, match="--engines"):
            engine_flags(bad)
    weak = ScalingConfig(gpus=[1, 2, 4], batch_size=4, global_batch=8, weak=True)
    assert grad_accum_steps(weak) == {1: 2, 2: 2, 4: 2}
    assert {n: weak.global_batch_of(n) for n in (1, 2, 4)} == {1: 8, 2: 16, 4: 32} and weak.largest_global_batch == 32
    strong = ScalingConfig(gpus=[1, 2, 4], batch_size=4)
    assert {n: strong.global_batch_of(n) for n in (1, 2, 4)} == {1: 16, 2: 16, 4: 16}


def test_several_engines_are_run_interleaved_and_reported_side_by_side(monkeypatch, shard_dir, tmp_path):
    from benchmarks import scaling

    calls = []

    def fake_run(cfg, inputs, n, accum, work, cuda, repeat=0, engine=""):
        calls.append((repeat, n, engine))
        ms = {"deepspeed": 100.0, "ddp": 80.0}[engine] * (1.1 if n == 2 else 1.0)  # ddp faster; 2 GPUs at 90.9%
        recs = [{"step": s, "real_tokens": 1000 * n, "tokens_per_s": 1000 * n / (ms / 1000), "loss": 1.0,
                 "task_mix": {"caption": 4 * n}} for s in (1, 2, 3)]
        epochs = [{"kind": "epoch", "epoch": 0, "complete": False, "count": 12 * n}]
        return scaling.RunResult(n, accum, "cmd", 1.0, True, "log", records=recs, epochs=epochs)

    monkeypatch.setattr(scaling, "run_training", fake_run)
    monkeypatch.setattr(scaling, "prepare_inputs", lambda cfg, work: Inputs(shard_dir=str(shard_dir), model_path=""))
    cfg = ScalingConfig(gpus=[1, 2], engines=["deepspeed", "ddp"], repeats=2, batch_size=2, weak=True,
                        max_steps=3, warmup_steps=1, check_coverage=False, workdir=str(tmp_path))
    result = scaling.run(cfg)
    assert calls == [(r, n, e) for r in (0, 1) for n in (1, 2) for e in ("deepspeed", "ddp")]
    t = result["training"]
    assert t["engines"] == ["deepspeed", "ddp"] and t["runs"] is t["per_engine"]["deepspeed"]["runs"]
    assert t["global_batch_per_gpus"] == {1: 2, 2: 4} and t["per_engine"]["ddp"]["runs"][2]["global_batch"] == 4
    cmp = t["engine_comparison"]
    assert cmp["ddp"][2]["efficiency"] == pytest.approx(1 / 1.1) and cmp["ddp"][1]["vs_first_engine"] == pytest.approx(1.25)
    assert t["per_engine"]["ddp"]["runs"][1]["throughput"]["runs"] == 2  # pooled over the repeats
    assert t["per_engine"]["ddp"]["runs"][2]["logged_samples"]["epoch_records"][0]["count"] == 24
    report = (tmp_path / "scaling.md").read_text()
    assert "### Engine `ddp`" in report and "| ddp | 2 |" in report and "weak scaling" in report
    assert "0: 24 partial" in report
