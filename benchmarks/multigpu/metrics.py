"""Figures from the runs' `train_log.jsonl`: steady-state throughput, scaling efficiency, where the
extra time of N GPUs goes, loss agreement, and exactly-once sample coverage."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from transformers import AutoTokenizer

from data_prep.manifest import load_manifest
from trainer.config import parse_train_config
from trainer.data import TrainStream
from trainer.schedules import build_phases


def step_seconds(rec: dict) -> float:
    """A log window's duration: the trainer logs real_tokens and tokens_per_s = real_tokens / seconds."""
    return rec["real_tokens"] / rec["tokens_per_s"] if rec.get("tokens_per_s") else float("nan")


def steady_windows(records: Sequence[dict], warmup_steps: int) -> list[tuple[int, dict]]:
    """(steps in the window, record) for the log records whose window (the steps since the previous
    record) lies wholly after the warm-up, in step order."""
    out, prev = [], 0
    for r in sorted(records, key=lambda r: r["step"]):
        window, prev = r["step"] - prev, r["step"]
        if r["step"] - window >= warmup_steps:
            out.append((window, r))
    return out


def throughput(records: Sequence[dict], warmup_steps: int, num_gpus: int) -> dict:
    """Steady-state tokens/s (all ranks) and per GPU, over the steady log windows."""
    windows = steady_windows(records, warmup_steps)
    steady, steps = [r for _, r in windows], sum(w for w, _ in windows)
    if not steady:
        return {"steady_steps": 0}
    tokens = sum(r["real_tokens"] for r in steady)
    seconds = sum(step_seconds(r) for r in steady)
    tps = tokens / seconds
    return {"steady_steps": steps, "log_records": len(steady), "first_step": steady[0]["step"],
            "last_step": steady[-1]["step"], "real_tokens": tokens, "seconds": seconds, "tokens_per_s": tps,
            "tokens_per_s_per_gpu": tps / num_gpus, "ms_per_step": 1000 * seconds / steps,
            "tokens_per_step": tokens / steps}


def pooled_throughput(parts: Sequence[dict], num_gpus: int) -> dict:
    """Several runs' steady-state throughput as one: tokens and seconds summed."""
    parts = [p for p in parts if p.get("steady_steps")]
    if not parts:
        return {"steady_steps": 0}
    steps = sum(p["steady_steps"] for p in parts)
    tokens, seconds = sum(p["real_tokens"] for p in parts), sum(p["seconds"] for p in parts)
    return {"steady_steps": steps, "runs": len(parts), "real_tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "tokens_per_s_per_gpu": tokens / seconds / num_gpus,
            "ms_per_step": 1000 * seconds / steps, "tokens_per_step": tokens / steps}


def timed_windows(runs: Sequence[Sequence[dict]], warmup_steps: int):
    """(steps in the window, its `rank_ms_per_step`) over the steady windows of every run that logged them."""
    for records in runs:
        for window, r in steady_windows(records, warmup_steps):
            if r.get("rank_ms_per_step"):
                yield window, r["rank_ms_per_step"]


def rank_times(runs: Sequence[Sequence[dict]], warmup_steps: int) -> dict[str, list[float]]:
    """Each rank's ms per optimizer step by loop phase (the trainer's `rank_ms_per_step`: data wait,
    forward + backward issue, engine step, other), step-weighted over the steady log windows of
    one or more runs (each a list of train records)."""
    sums: dict[str, list[float]] = {}
    steps = 0
    for window, times in timed_windows(runs, warmup_steps):
        steps += window
        for phase, per_rank in times.items():
            acc = sums.setdefault(phase, [0.0] * len(per_rank))
            for i, ms in enumerate(per_rank):
                acc[i] += ms * window
    return {phase: [v / steps for v in acc] for phase, acc in sums.items()} if steps else {}


def slowdown_breakdown(runs_n: Sequence[Sequence[dict]], accum_n: int, times_1: dict[str, list[float]],
                       accum_1: int, warmup_steps: int) -> dict[str, float]:
    """Where N GPUs lose time against 1, in ms per micro-batch, from the per-rank phase times.

    In every log window all ranks take the same wall time T, and for the rank that issued its
    forward + backward slowest (r*): T = data* + fwd_bwd_max + step* + other*. So, exactly,
    T_N - T_1 = data (r*'s wait for batches beyond 1 GPU's)
              + host issue (the ranks' mean fwd_bwd beyond 1 GPU's: slower hosts, contention)
              + stragglers (fwd_bwd_max - the mean: the others wait for the slowest rank)
              + sync/step (r*'s engine step beyond 1 GPU's: gradient collectives, optimizer, and
                waits for a rank that was slower at another step of the same window)
              + other.
    `times_1`: the 1-GPU run's rank_times (one rank)."""
    base = {p: v[0] / accum_1 for p, v in times_1.items()}
    acc = {"data": 0.0, "host_issue": 0.0, "stragglers": 0.0, "sync_step": 0.0, "other": 0.0, "total": 0.0}
    steps = 0
    for window, t in timed_windows(runs_n, warmup_steps):
        fb = [v / accum_n for v in t["fwd_bwd"]]
        slow = max(range(len(fb)), key=fb.__getitem__)
        mean_fb = sum(fb) / len(fb)
        parts = {"data": t["data"][slow] / accum_n - base["data"], "host_issue": mean_fb - base["fwd_bwd"],
                 "stragglers": fb[slow] - mean_fb, "sync_step": t["step"][slow] / accum_n - base["step"],
                 "other": t["other"][slow] / accum_n - base["other"]}
        parts["total"] = sum(parts.values())
        for k, v in parts.items():
            acc[k] += v * window
        steps += window
    if not steps:
        return {}
    out = {k: v / steps for k, v in acc.items()}
    out["ms_per_micro_batch_1"] = sum(base.values())
    return out


def scaling_efficiency(results: dict[int, dict]) -> dict[int, float]:
    """tokens/s(N) / (N x tokens/s(1)), against the smallest N run when 1 is missing."""
    ok = {n: r["tokens_per_s"] for n, r in results.items() if r.get("tokens_per_s")}
    if not ok:
        return {}
    base = min(ok)
    return {n: (tps / n) / (ok[base] / base) for n, tps in ok.items()}


def loss_agreement(runs: dict[int, Sequence[dict]], last_k: int) -> dict:
    """|loss_N - loss_ref| at equal steps for every N against the first run."""
    if len(runs) < 2:
        return {}
    ref_n = next(iter(runs))
    ref = {r["step"]: r["loss"] for r in runs[ref_n]}
    out = {"reference_gpus": ref_n, "per_gpus": {}}
    for n, records in list(runs.items())[1:]:
        steps = sorted(set(ref) & {r["step"] for r in records})
        if not steps:
            continue
        mine = {r["step"]: r["loss"] for r in records}
        diff = [abs(mine[s] - ref[s]) for s in steps]
        last = steps[-last_k:]
        out["per_gpus"][n] = {
            "common_steps": len(steps), "max_abs_diff": max(diff), "max_abs_diff_step": steps[diff.index(max(diff))],
            "mean_abs_diff_last_k": sum(abs(mine[s] - ref[s]) for s in last) / len(last),
            "mean_loss_last_k": sum(mine[s] for s in last) / len(last),
            "ref_mean_loss_last_k": sum(ref[s] for s in last) / len(last), "k": len(last)}
    return out


def logged_example_counts(records: Sequence[dict], epochs: Sequence[dict] = ()) -> dict:
    """What the logs say about the samples consumed: examples trained (with loss), per task and in total;
    and the trainer's own `epoch` records (count + digest of the loss-weighted sample keys per epoch,
    checked against the manifest at each epoch's end; `complete: false` for an epoch cut by --max-steps)."""
    per_task = Counter()
    for r in records:
        per_task.update(r.get("task_mix") or {})
    return {"examples_trained": sum(per_task.values()), "per_task": dict(per_task),
            "epoch_records": [{k: e.get(k) for k in ("epoch", "complete", "count", "expected_count", "ok", "rank_counts")}
                              for e in epochs],
            "exactly_once_ok": (all(e.get("ok") for e in epochs if e.get("complete"))
                                if any(e.get("complete") for e in epochs) else None),
            "bad_samples": sum(int(r.get("bad_samples", 0)) for r in records),
            "pad_duplicates": sum(int(r.get("pad_duplicates", 0)) for r in records),
            "epochs_logged": sorted({r.get("epoch") for r in records if r.get("epoch") is not None})}


def epoch_coverage(flags: Sequence[str], world_size: int) -> dict:
    """Iterate the trainer's own data pipeline (with the run's flags) over epoch 0 for every rank of
    `world_size`; count how often each train sample comes with loss weight > 0."""
    tcfg = parse_train_config(list(flags))
    manifest = load_manifest(tcfg.data.shard_dir)
    tokenizer = AutoTokenizer.from_pretrained(tcfg.model.model_path)
    phases = build_phases(tcfg.schedule)
    seen: Counter = Counter()
    batches_per_rank, weight0 = [], 0
    for rank in range(world_size):
        stream = TrainStream(manifest, tcfg.data.shard_dir, tokenizer, tcfg.data, phases,
                             tcfg.model.num_image_tokens, rank, world_size, tcfg.seed)
        batches = 0
        for batch in stream.loader(0):
            batches += 1
            for key, weight in zip(batch["keys"], batch["loss_weights"]):
                if weight > 0:
                    seen[key] += 1
                else:
                    weight0 += 1
        batches_per_rank.append(batches)
    expected = manifest.num_samples("train")
    repeated = sorted(k for k, c in seen.items() if c > 1)
    return {"world_size": world_size, "train_samples": expected, "distinct_seen": len(seen),
            "missing": expected - len(seen), "repeated": len(repeated), "repeated_examples": repeated[:5],
            "loss_free_duplicates": weight0, "batches_per_rank": batches_per_rank,
            "equal_batches_per_rank": len(set(batches_per_rank)) == 1,
            "exactly_once": len(seen) == expected and not repeated}
