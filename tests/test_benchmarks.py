"""The training-throughput benchmark: end-to-end on CPU with the tiny shape, plus its data helpers.

The end-to-end run is the same program the lead runs on the H100 (`--shape 7b`), only smaller; the
packed-vs-padded checks prove that the packed modes (stock HF off-the-shelf and the project's
path) do not attend across example boundaries, so their speed is not bought with wrong math.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import train_throughput as tp
from benchmarks.throughput.config import BenchConfig
from benchmarks.throughput.models import build_baseline, build_project, lm_config
from benchmarks.throughput.timing import PhaseTimer, bound_label
from benchmarks.throughput.workload import (
    baseline_batch,
    doc_lengths,
    example_stream,
    examples_from_lengths_file,
    length_stats,
    load_examples,
    pack_groups,
    project_batch,
    write_lengths_file,
)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, synthetic_data):
    """(config, example pool, model dir, tokenizer) from the synthetic data, fp32 CPU."""
    json_paths, _ = synthetic_data
    cfg = BenchConfig(shape="tiny", gemini_json=[str(p) for p in json_paths], device="cpu")
    pool, model_dir, tokenizer = load_examples(cfg, tmp_path_factory.mktemp("bench"))
    return cfg, pool, model_dir, tokenizer


def test_examples_have_a_realistic_mixed_length_mix(tiny_setup):
    cfg, pool, _, _ = tiny_setup
    stats = length_stats(pool, cfg.model.num_image_tokens)
    assert stats["max"] <= cfg.max_seq_len
    assert stats["p10"] < stats["p90"], "lengths should be mixed, not constant"
    assert sum(stats["tasks"][t] > 0 for t in ("caption", "summary", "cot")) == 3
    assert stats["tasks"]["text_summary"] == 0  # weight 0 in the default mix


def test_pack_groups_respects_budget_and_order(tiny_setup):
    cfg, pool, _, _ = tiny_setup
    stream = example_stream(pool, 200, seed=1)
    n_img = cfg.model.num_image_tokens
    groups = pack_groups(stream, 5, n_img, token_budget=512, batch_size=0)
    flat = [e for g in groups for e in g]
    assert flat == stream[:len(flat)]  # consumed from the start, in order
    assert all(sum(doc_lengths(g, n_img)) <= 512 for g in groups)
    fixed = pack_groups(stream, 3, n_img, token_budget=0, batch_size=7)
    assert [len(g) for g in fixed] == [7, 7, 7]


def test_baseline_batch_layout(tiny_setup):
    cfg, pool, _, tok = tiny_setup
    n_img = cfg.model.num_image_tokens
    group = pool[:3]
    packed = baseline_batch(group, tok.pad_token_id, n_img, packed=True)
    padded = baseline_batch(group, tok.pad_token_id, n_img, packed=False, pad_to=cfg.max_seq_len)
    lengths = doc_lengths(group, n_img)
    assert packed["input_ids"].shape == (1, sum(lengths)) and packed["attention_mask"] is None
    assert padded["input_ids"].shape == (3, cfg.max_seq_len)
    assert padded["attention_mask"].sum(1).tolist() == lengths
    # positions restart at 0 at every example of the packed row
    assert (packed["position_ids"][0] == 0).nonzero().flatten().tolist() == [0, lengths[0], lengths[0] + lengths[1]]
    n_prefix = sum(cfg.model.num_image_tokens + 1 for e in group if e.tok.uses_image)
    assert int(packed["prefix_mask"].sum()) == int(padded["prefix_mask"].sum()) == n_prefix
    assert int((packed["labels"] != -100).sum()) == sum(len(e.tok.target_ids) for e in group)


def test_offshelf_packed_loss_equals_padded_loss(tiny_setup):
    """Mode 3's stock HF packing (document mask from position_ids, use_cache=False) is exact."""
    cfg, pool, model_dir, tok = tiny_setup
    hf_config = lm_config("tiny", model_dir)
    model = build_baseline(cfg, hf_config, "sdpa", torch.device("cpu"), torch.float32, liger=False).eval()
    group = pool[:4]
    n_img = cfg.model.num_image_tokens
    with torch.no_grad():
        packed = model(baseline_batch(group, tok.pad_token_id, n_img, packed=True))
        padded = model(baseline_batch(group, tok.pad_token_id, n_img, packed=False))
    assert abs(float(packed) - float(padded)) < 1e-5


def test_project_model_builds_from_config_alone(tiny_setup, tmp_path):
    """The 7B path: `build_prefix_lm` on a model dir without weights gets random ones from the config."""
    import shutil

    cfg, pool, model_dir, tok = tiny_setup
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    for f in bare.glob("*.safetensors"):
        f.unlink()
    model, _ = build_project(cfg, bare, torch.device("cpu"))
    batch = project_batch(pool[:2], tok.pad_token_id, cfg.model.num_image_tokens)
    assert torch.isfinite(model(batch).loss)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


@pytest.mark.parametrize("shape,model_type,cls", [("llama3-8b", "llama", "LlamaForCausalLM"),
                                                   ("qwen2.5-7b", "qwen2", "Qwen2ForCausalLM")])
def test_llama_and_qwen2_shapes_build_from_config_alone(shape, model_type, cls, tiny_setup, tmp_path):
    """--shape llama3-8b / qwen2.5-7b: the shape's config (here shrunk to toy width, same architecture)
    in a weightless model dir gives the project model of that architecture."""
    import shutil

    from common.config import parse_config

    assert parse_config(BenchConfig, ["--shape", shape]).shape == shape
    cfg, pool, model_dir, tok = tiny_setup
    real = lm_config(shape, model_dir)
    assert real.model_type == model_type and real.vocab_size >= len(tok)
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    for f in bare.glob("*.safetensors"):
        f.unlink()
    fields = {k: v for k, v in real.to_dict().items() if k != "layer_types"}  # per layer: rebuilt for 1 layer
    small = type(real)(**{**fields, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": len(tok)})
    small.save_pretrained(bare)
    model, _ = build_project(cfg, bare, torch.device("cpu"))
    assert type(model.base_lm).__name__ == cls
    batch = project_batch(pool[:2], tok.pad_token_id, cfg.model.num_image_tokens)
    assert torch.isfinite(model(batch).loss)


def test_lengths_file_round_trip_and_errors(tiny_setup, tmp_path):
    cfg, pool, _, _ = tiny_setup
    path = tmp_path / "lengths.json"
    write_lengths_file(str(path), pool)
    back = examples_from_lengths_file(str(path), vocab_size=500, bos_id=1, seed=0)
    n_img = cfg.model.num_image_tokens
    assert [e.length(n_img) for e in back] == [e.length(n_img) for e in pool]
    assert [e.tok.task for e in back] == [e.tok.task for e in pool]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"examples": [{"task": "caption", "uses_image": True}]}))
    with pytest.raises(ValueError, match=r"bad\.json.*examples\[0\]"):
        examples_from_lengths_file(str(bad), vocab_size=500, bos_id=1, seed=0)


def test_config_validation():
    with pytest.raises(ValueError, match="--modes"):
        BenchConfig(modes=[5]).validate()
    with pytest.raises(ValueError, match="at most one"):
        BenchConfig(shard_dir="x", lengths_file="y").validate()
    with pytest.raises(ValueError, match="unknown task"):
        BenchConfig(task_mix="caption:1,poem:1").validate()


@pytest.mark.slow
def test_benchmark_end_to_end_tiny_cpu(tmp_path, synthetic_data):
    """All four modes run on CPU and the JSON holds every field the report needs."""
    json_paths, _ = synthetic_data
    out = tmp_path / "throughput.json"
    rc = tp.main(["--shape", "tiny", "--device", "cpu", "--steps", "2", "--warmup-steps", "1",
                  "--padded-batch-sizes", "2", "4", "--token-budget", "512", "--profile",
                  "--gemini-json", *map(str, json_paths), "--out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0, {m: r.get("error") for m, r in report["modes"].items()}
    assert set(report["modes"]) == {"1", "2", "3", "4"}
    for m, r in report["modes"].items():
        for key in ("tokens_per_s", "tflops", "mfu", "ms_per_step", "real_tokens", "pad_fraction",
                    "examples_per_step", "params", "label"):
            assert key in r, (m, key)
        assert r["tokens_per_s"] > 0 and r["tflops"] > 0 and 0 < r["mfu"]
        assert r["loss_finite"]
        assert r["peak_gib"] is None  # CPU: no device memory to report
    modes = report["modes"]
    assert modes["1"]["examples_per_step"] == 1 and modes["1"]["slots_per_step"] == 256
    assert [t["batch_size"] for t in modes["2"]["tries"]] == [2, 4]
    assert modes["3"]["liger"] is False and "WITHOUT Liger" in modes["3"]["label"]
    assert modes["3"]["pad_fraction"] == 0 and modes["4"]["pad_fraction"] == 0
    assert modes["4"]["packed_vs_padded_loss_diff"] < 1e-4  # fp32: packing is exact
    # same examples, same order: the packed modes process the same real tokens
    assert modes["3"]["real_tokens"] == modes["4"]["real_tokens"]
    assert set(report["ratios"]) == {"4/1", "4/2", "4/3"}
    assert report["peak_matmul"]["tflops"] > 0 and "4*N" in report["flops_formula"]
    assert modes["4"]["profile"]["top"]
    assert (tmp_path / "throughput.profile.txt").exists()
    assert "| mode |" in report["markdown"] and "4/1" in report["markdown"]


def test_mode4_in_a_fresh_process_reports_phases_and_accumulation(tmp_path, synthetic_data):
    """--isolate-modes on runs the mode in a spawned process; the JSON carries where the step's time
    went (host time to issue forward/backward/step) and the accumulation it ran with."""
    json_paths, _ = synthetic_data
    out = tmp_path / "tp.json"
    rc = tp.main(["--shape", "tiny", "--device", "cpu", "--modes", "4", "--steps", "4", "--warmup-steps", "1",
                  "--token-budget", "512", "--grad-accum", "2", "--step-engine", "torch", "--isolate-modes", "on",
                  "--gemini-json", *map(str, json_paths), "--out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0, report["modes"]["4"].get("error")
    r = report["modes"]["4"]
    assert set(r["phases"]) == {"forward", "backward", "step"}
    assert all(p["host_ms"] > 0 and "device_ms" not in p for p in r["phases"].values())  # CPU: no events
    assert "2 micro-batches per optimizer step" in r["label"] and r["step_engine"] == "torch"
    assert "gpu_before" not in r
    assert "host time to issue" in report["markdown"]


def test_phase_timer_tells_gpu_bound_host_bound_and_a_sync_in_the_step_apart():
    class Event:  # what summary() reads of a CUDA event: the device ms to a later one
        def __init__(self, t):
            self.t = t

        def elapsed_time(self, other):
            return other.t - self.t

    def timer(host_ms, device_ms):
        t = PhaseTimer(torch.device("cpu"))
        for phase, ms in zip(t.PHASES, host_ms):
            t.host[phase].append(ms)
        marks = [0.0]
        for ms in device_ms:
            marks.append(marks[-1] + ms)
        t.events.append([Event(m) for m in marks])
        return t.summary()

    ahead = timer([100, 150, 2], [120, 140, 3])  # the forward's lead spent in the backward
    assert ahead["backward"]["host_ms"] > ahead["backward"]["device_ms"]
    assert ahead["step_total"] == {"host_ms": 252, "device_ms": 263, "gpu_bound": True}
    assert bound_label(ahead) == "GPU-bound"
    paced = timer([120, 140, 3], [120, 140, 3])
    assert paced["step_total"]["gpu_bound"] is False and bound_label(paced) == "host-bound"
    # the host ran 60 ms ahead through forward + backward, then a sync in the step spent that lead
    synced = timer([100, 140, 66], [120, 140, 6])
    assert synced["step_total"]["gpu_bound"] is False
    assert synced["issue"] == {"host_ms": 240, "device_ms": 260, "gpu_bound": True}
    assert bound_label(synced).startswith("GPU-bound while issuing") and "waits ~60 ms" in bound_label(synced)
