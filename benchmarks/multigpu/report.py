"""The results as Markdown, and the environment they were measured in."""

from __future__ import annotations

import math
import os
import sys

import torch

from benchmarks.multigpu.runs import subprocess_env


def _fmt(v, spec: str = ",.0f") -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _engine_lines(t: dict) -> list[str]:
    """One engine's tables: runs, where the time goes, loss agreement, samples, fault drill, failures."""
    lines = ["", "| GPUs | accum | global batch | steady steps | tokens/s | tokens/s/GPU | ms/step | efficiency | wall s | status |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for n, r in t["runs"].items():
        tp = r["throughput"]
        lines.append(f"| {n} | {r['grad_accum']} | {r.get('global_batch', '–')} | {tp.get('steady_steps', 0)} | "
                     f"{_fmt(tp.get('tokens_per_s'))} | {_fmt(tp.get('tokens_per_s_per_gpu'))} | {_fmt(tp.get('ms_per_step'), ',.1f')} | "
                     f"{_fmt(t['efficiency'].get(n), '.1%')} | {r['wall_s']:.0f} | {'ok' if r['ok'] else 'FAILED'} |")
    effs = t.get("efficiency_per_repeat") or []
    if len(effs) > 1:
        lines += ["", "Efficiency per repeat (run in turn: " + ", ".join(
            f"repeat {i + 1}: " + " / ".join(f"{n} GPUs {_fmt(e, '.1%')}" for n, e in eff.items())
            for i, eff in enumerate(effs)) + ")."]
    timed = {n: r for n, r in t["runs"].items() if r.get("rank_ms_per_step")}
    if timed:
        lines += ["", "Where each rank's time goes, ms per micro-batch (the trainer's per-rank `rank_ms_per_step` "
                  "÷ accumulation, steady windows): host clocks, so `fwd+bwd` is the time to issue them and waits "
                  "for the device or for the other ranks land in `step` (DeepSpeed syncs there) or `other` (the "
                  "torch engine syncs at log steps); a rank that waits less than the others is their straggler.", "",
                  "| GPUs | rank | data wait | fwd+bwd | step | other | total |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for n, r in timed.items():
            times, ga = r["rank_ms_per_step"], r["grad_accum"]
            for rank in range(len(times.get("fwd_bwd", []))):
                row = [times[p][rank] / ga for p in ("data", "fwd_bwd", "step", "other")]
                lines.append(f"| {n} | {rank} | " + " | ".join(f"{v:.1f}" for v in row) + f" | {sum(row):.1f} |")
    slow = {n: r["slowdown_ms_per_micro_batch"] for n, r in t["runs"].items() if r.get("slowdown_ms_per_micro_batch")}
    if slow:
        lines += ["", "What the extra GPUs cost, ms per micro-batch beyond the smallest run's (exact per log window, "
                  "read at the rank that issued its forward + backward slowest): `data` its wait for batches, "
                  "`host issue` the ranks' mean issue time (slower hosts), `stragglers` the slowest rank's issue "
                  "time beyond the mean (the others wait for it), `sync/step` its engine step (gradient "
                  "collectives, optimizer, waits for a rank slow at another step of the window), `other`.", "",
                  "| GPUs | base ms/micro-batch | extra | data | host issue | stragglers | sync/step | other |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n, b in slow.items():
            lines.append(f"| {n} | {b['ms_per_micro_batch_1']:.1f} | {b['total']:+.1f} | " + " | ".join(
                f"{b[k]:+.1f}" for k in ("data", "host_issue", "stragglers", "sync_step", "other")) + " |")
    agree = t.get("loss_agreement") or {}
    if agree.get("per_gpus"):
        lines += ["", f"Loss agreement against {agree['reference_gpus']} GPU(s) at equal steps (the ranks read other "
                  "parts of the epoch at another N, so the curves agree statistically, not bit for bit):", "",
                  "| GPUs | common steps | max abs diff (step) | mean abs diff, last k | mean loss last k (ref) |",
                  "|---:|---:|---:|---:|---:|"]
        for n, a in agree["per_gpus"].items():
            lines.append(f"| {n} | {a['common_steps']} | {a['max_abs_diff']:.4f} ({a['max_abs_diff_step']}) | "
                         f"{a['mean_abs_diff_last_k']:.4f} (k={a['k']}) | {a['mean_loss_last_k']:.4f} "
                         f"({a['ref_mean_loss_last_k']:.4f}) |")
    lines += ["", "Samples: examples trained per run from the logs, and the run's own `epoch` records (count of "
              "loss-weighted samples per epoch; at an epoch's end their digest is checked against the manifest, "
              "`partial` = an epoch cut by --max-steps, not checked); exactly-once per epoch also from the trainer's "
              "data pipeline replayed over a whole epoch for every rank with the run's flags:", "",
              "| GPUs | examples trained (logs) | run's epoch records | bad | exactly once (replay) | missing | repeated | "
              "loss-free dups | batches/rank |",
              "|---:|---:|---|---:|---|---:|---:|---:|---|"]
    for n, r in t["runs"].items():
        c, cov = r["logged_samples"], r.get("coverage") or {}
        epochs = "; ".join(f"{e['epoch']}: {e['count']} " + ("partial" if not e.get("complete") else
                                                              "ok" if e.get("ok") else "MISMATCH")
                           for e in c.get("epoch_records") or []) or "–"
        lines.append(f"| {n} | {c['examples_trained']} | {epochs} | {c['bad_samples']} | "
                     f"{'yes' if cov.get('exactly_once') else ('NO' if cov else '–')} | {cov.get('missing', '–')} | "
                     f"{cov.get('repeated', '–')} | {cov.get('loss_free_duplicates', '–')} | {cov.get('batches_per_rank', '–')} |")
    d = t.get("fault_drill")
    if d:
        lines += ["", f"Fault drill on {d['gpus']} GPU(s): rank {d.get('killed_rank')} SIGKILLed right after the "
                  f"step-{d.get('save_at_step')} resume checkpoint; job stopped in {d.get('stop_s', '–')} s (exit code "
                  f"{d.get('exit_code')}, {d.get('survivors', '–')} processes left); `--resume` started at step "
                  f"{d.get('resumed_at_step')}, trained {d.get('resumed_steps')} steps, same data position as the "
                  f"uninterrupted run: {'yes' if d.get('same_data_position') else 'NO'}, max |loss difference| "
                  f"{_fmt(d.get('max_abs_loss_diff'), '.2e')}: **{'ok' if d.get('ok') else 'FAILED'}**."]
        if d.get("error"):
            lines += ["```", d["error"], "```"]
    for n, r in t["runs"].items():
        if r.get("error"):
            lines += ["", f"Run on {n} GPU(s) failed:", "```", r["error"], "```"]
    return lines


def markdown_report(result: dict) -> str:
    cfg = result["config"]
    lines = [f"# Scaling on {result['environment']['device']}", ""]
    if result.get("training"):
        t = result["training"]
        batch = (f"global batch {t['global_batch']} examples/step" if not t.get("weak") else
                 "weak scaling: micro-batch and accumulation fixed, global batch " + ", ".join(
                     f"{b} at {n} GPU(s)" for n, b in (t.get("global_batch_per_gpus") or {}).items()))
        lines += [f"## Training (`trainer.train` via `launch/train.sh`, shape {cfg['shape']})", "",
                  f"Every run: {cfg['max_steps']} optimizer steps, {batch} "
                  f"(micro-batch {cfg['batch_size']} per GPU x accumulation x GPUs), seed {cfg['seed']}, "
                  f"max_seq_len {cfg['max_seq_len']}, {t['train_samples']} train samples. Throughput = real (non-padding) "
                  f"tokens / step time, summed over ranks, over steps > {cfg['warmup_steps']} (warm-up excluded)."]
        sections = t.get("per_engine") or {(cfg.get("engines") or ["deepspeed"])[0]: t}
        if len(sections) > 1:
            first = next(iter(sections))
            lines += ["", f"Engines side by side (run interleaved: for each repeat and N, every engine in turn); "
                      f"`vs {first}` = tokens/s over {first}'s at the same N:", "",
                      "| engine | GPUs | tokens/s | efficiency | vs " + first + " | status |", "|---|---:|---:|---:|---:|---|"]
            for engine, per_n in t["engine_comparison"].items():
                for n, c in per_n.items():
                    lines.append(f"| {engine} | {n} | {_fmt(c['tokens_per_s'])} | {_fmt(c['efficiency'], '.1%')} | "
                                 f"{_fmt(c['vs_first_engine'], '.3f')} | {'ok' if c['ok'] else 'FAILED'} |")
        for engine, sec in sections.items():
            lines += ["", f"### Engine `{engine}`"] if len(sections) > 1 else []
            lines += _engine_lines(sec)
        lines += ["", t["coverage_note"]]
    if result.get("builder"):
        b = result["builder"]
        lines += ["", "## Shard builder (`data_prep.build_shards`, one process per GPU, `--num-nodes N --node-rank r`)", "",
                  f"{b['runs'][0]['images'] if b['runs'] else 0} images, Stage1 at {b['image_size']} px, "
                  f"{b['samples_per_shard']} images per shard. Build images/s = all images / the slowest process's "
                  "build time (model loading excluded); end to end = / wall time of the whole command.", "",
                  "| processes | images | build s | images/s | speed-up | end-to-end images/s | speed-up | status |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in b["runs"]:
            lines.append(f"| {r['processes']} | {r['images']} | {r['build_s']:.1f} | {_fmt(r.get('images_per_s'), ',.1f')} | "
                         f"{_fmt(r.get('speedup'), '.2f')}x | {_fmt(r.get('images_per_s_end_to_end'), ',.1f')} | "
                         f"{_fmt(r.get('speedup_end_to_end'), '.2f')}x | {'ok' if r['ok'] else 'FAILED'} |")
        if b["identical_shards"] is not None:
            lines += ["", f"Identical shards (sha256) for every process count: {'yes' if b['identical_shards'] else 'NO'}."]
    return "\n".join(lines) + "\n"


def environment() -> dict:
    cuda = torch.cuda.is_available()
    return {"device": (f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if cuda
                       else f"CPU ({os.cpu_count()} cores; GPUs = processes)"),
            "torch": torch.__version__, "cuda": cuda, "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            # what each rank's intra-op thread pool starts from (the DeepSpeed launcher leaves it unset)
            "OMP_NUM_THREADS": subprocess_env(cuda).get("OMP_NUM_THREADS")}
