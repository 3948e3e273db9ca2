"""Multi-GPU scaling of the real trainer (and of the shard builder) on one host.

    python -m benchmarks.scaling --shape 7b --gpus 1 2 --builder-gpus 1 2 --workdir /tmp/scaling
    python -m benchmarks.scaling --shape 7b --gpus 1 2 4 --engines deepspeed torch ddp --repeats 2   # engines side by side
    python -m benchmarks.scaling --shape 7b --gpus 1 2 4 --weak --engines ddp                        # weak scaling
    python -m benchmarks.scaling --shape tiny --gpus 1 2 --max-steps 4 --warmup-steps 1   # CPU smoke run

Training scaling (`--gpus 1 2 ...`):
1. Inputs: a synthetic dataset (`data_prep.synthetic`) built into shards in this process
   (`data_prep.build_shards.build`) with random Stage1 models, and a random LM directory
   (`benchmarks.make_random_model`): `--shape 7b` = the Mistral-7B shape + ViT-B/16 MAE and
   EfficientNet-B0 at 224 px, `tiny` = the test models. `--shard-dir` / `--model-path` use existing
   ones instead.
2. For each N: `launch/train.sh --num-gpus N -- <trainer flags>`, i.e. the real `trainer.train`
   under the DeepSpeed launcher (on a machine without CUDA: DS_ACCELERATOR=cpu, N processes). Every
   run gets the same shards, seed and `--max-steps`, and the same GLOBAL batch (examples per
   optimizer step): the per-GPU micro-batch `--batch-size` is fixed and the gradient accumulation is
   global_batch / (batch_size x N). With `--weak` the accumulation is fixed too (the smallest N's), so
   the global batch grows with N (weak scaling: the same work per GPU per step). Each run logs every
   `--log-steps` steps; validation, sample generation and periodic checkpoints are off, so the steps
   measure training only. `--engines deepspeed torch ddp` (or `deepspeed:<ds config>`) measures
   each engine at each N, interleaved (repeat, N, engine), and reports them side by side.
3. From each run's `train_log.jsonl`, over the steady-state steps (`--warmup-steps` first steps left
   out): tokens/s = sum of real (non-padding) tokens / sum of step times, all ranks together, and
   per GPU; scaling efficiency = tokens/s(N) / (N x tokens/s(1)) (against the smallest N when 1 is
   not run). Loss agreement against the first N: max |loss_N - loss_ref| over the common steps and
   the mean |difference| over the last `--last-k` steps. The ranks read different contiguous parts
   of the epoch (trainer/data.py), so the same step sees other samples at another N: the curves
   agree statistically, not bit for bit; over a whole epoch every run sees the same samples.
   Where the time goes: the trainer logs every rank's ms per step by loop phase (`rank_ms_per_step`);
   the report tabulates them and splits the extra time per micro-batch of N GPUs over the smallest
   run into data wait, host issue, stragglers, sync/step and other (`slowdown_breakdown`).
   `--repeats R` runs the GPU counts R times in turn and pools them (host speed drifts between runs).
4. Sample coverage: (a) from the logs, the examples trained per run and the trainer's own `epoch`
   records (count + digest of the loss-weighted sample keys, checked against the manifest at each
   epoch's end; trainer/exactly_once.py); (b) the trainer's own data pipeline (`trainer.data.TrainStream`,
   with the run's exact flags) iterated over one whole epoch for every rank of every N: every train
   sample must come exactly once with loss weight > 0 (rank-padding duplicates carry weight 0).

Builder scaling (`--builder-gpus 1 2`): `python -m data_prep.build_shards` with N processes, each
`--num-nodes N --node-rank r` (and `CUDA_VISIBLE_DEVICES=r` on a GPU machine), into a fresh
directory per N, over `--builder-images` synthetic images of `--builder-image-px` pixels. Reported:
images/s of the building itself (all images / the slowest process's build time, from the builder's
per-node records: model loading excluded) and end to end (wall time of the whole command), the
ratios against the first N, and whether every layout wrote identical shards (the builder's promise).

On the GPU machine (device tool, `kind: nvidia-h100-x2`, `carry: [".whl"]`; see benchmarks/README.md for
the wheel kit), keeping the 15 GB random 7B model out of $OUT:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:$PWD:$PYTHONPATH PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 \
      && python3 -m benchmarks.scaling --shape 7b --gpus 1 2 --builder-gpus 1 2 --max-steps 20 \
           --workdir /tmp/scaling --out $OUT/scaling.json; cp /tmp/scaling/*.log $OUT/

Expect about 1 minute to write the 7B model (bf16, initialised on the GPU), 1-2 minutes per training run
(7B load per rank, steps, final LoRA checkpoint) and under a minute per builder run.

Output: a Markdown report on stdout and in `<workdir>/scaling.md`, every number in
`<workdir>/scaling.json` (or `--out`), each run's log in `<workdir>/<run>/launcher.log`.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from benchmarks.multigpu.builder import builder_scaling
from benchmarks.multigpu.config import ScalingConfig, grad_accum_steps
from benchmarks.multigpu.inputs import Inputs, gpu_count, prepare_inputs
from benchmarks.multigpu.metrics import (
    epoch_coverage,
    logged_example_counts,
    loss_agreement,
    pooled_throughput,
    rank_times,
    scaling_efficiency,
    slowdown_breakdown,
    throughput,
)
from benchmarks.multigpu.report import environment, markdown_report
from benchmarks.multigpu.runs import RunResult, fault_drill, run_training, train_flags
from common.config import parse_config, print_config
from common.io import atomic_write_json, atomic_write_text
from common.log import setup_logging
from data_prep.manifest import load_manifest

COVERAGE_NOTE = ("Exactly-once is checked twice: by the run itself (trainer/exactly_once.py: each rank sums a digest "
                 "of the keys of the samples it trained with loss weight > 0, all-reduced and compared with the manifest's "
                 "train samples at each epoch's end: the `epoch` records of train_log.jsonl), and by replaying the data "
                 "plan above. Examples per step are not constant: --balance-window regroups each window of batches into "
                 "batches of ~equal TOKENS, longest examples first, so the first batches of a window hold fewer examples; "
                 "a run stopped inside windows (--max-steps) trains fewer examples than steps x global batch, and more "
                 "so with more ranks x workers cut mid-window (README.md, Multi-GPU). Over a whole epoch every N trains "
                 "every sample once.")


def training_scaling(cfg: ScalingConfig, work: Path, cuda: bool) -> dict:
    """Every --engines entry at every N, interleaved (repeat, N, engine), then one report section per
    engine; the first engine's section is also at the top level (the single-engine layout)."""
    inputs = prepare_inputs(cfg, work)
    accum = grad_accum_steps(cfg)
    repeats: dict[str, dict[int, list[RunResult]]] = {e: {n: [] for n in cfg.gpus} for e in cfg.engines}
    for i in range(cfg.repeats):  # in turn, so that drift of the machine meets every N and engine alike
        for n in cfg.gpus:
            for engine in cfg.engines:
                repeats[engine][n].append(run_training(cfg, inputs, n, accum[n], work, cuda, repeat=i, engine=engine))
    coverage = {}
    if cfg.check_coverage:  # the data plan depends on N and the batch size, not on the engine
        for n in cfg.gpus:
            print(f"[scaling] replaying one epoch of the data pipeline for {n} rank(s)", flush=True)
            coverage[n] = epoch_coverage(train_flags(cfg, inputs, accum[n], work / "coverage-unused"), n)
    per_engine = {e: engine_section(cfg, inputs, e, repeats[e], accum, coverage, work, cuda,
                                    drill=cfg.fault_drill and e == cfg.engines[0]) for e in cfg.engines}
    first = per_engine[cfg.engines[0]]
    return {"inputs": asdict(inputs), "global_batch": cfg.effective_global_batch, "weak": cfg.weak,
            "global_batch_per_gpus": {n: cfg.global_batch_of(n) for n in cfg.gpus},
            "train_samples": load_manifest(inputs.shard_dir).num_samples("train"), "coverage_note": COVERAGE_NOTE,
            "engines": list(cfg.engines), "per_engine": per_engine, "engine_comparison": engine_comparison(per_engine),
            **first}


def engine_section(cfg: ScalingConfig, inputs: Inputs, engine: str, repeats: dict[int, list[RunResult]],
                   accum: dict[int, int], coverage: dict[int, dict], work: Path, cuda: bool, drill: bool) -> dict:
    """One engine's runs at every N: throughput pooled over repeats, efficiency, where the time goes,
    loss agreement, samples (and the fault drill on the largest N when asked)."""
    results = {n: rs[0] for n, rs in repeats.items()}  # the first repeat: loss curves, coverage, drill
    runs = {}
    for n, r in results.items():
        per_repeat = [{"ok": x.ok, "wall_s": x.wall_s, "throughput": throughput(x.records, cfg.warmup_steps, n),
                       "rank_ms_per_step": rank_times([x.records], cfg.warmup_steps)} for x in repeats[n]]
        ok = all(x.ok for x in repeats[n])
        entry = {"grad_accum": r.grad_accum, "global_batch": cfg.global_batch_of(n), "ok": ok, "wall_s": r.wall_s,
                 "command": r.command, "log_file": r.log_file,
                 "error": "\n".join(x.error for x in repeats[n] if x.error), "start": r.start,
                 "throughput": (pooled_throughput([p["throughput"] for p in per_repeat], n) if cfg.repeats > 1
                                else per_repeat[0]["throughput"]),
                 "rank_ms_per_step": rank_times([x.records for x in repeats[n]], cfg.warmup_steps),
                 "repeats": per_repeat,
                 "logged_samples": logged_example_counts(r.records, r.epochs),
                 "steps": [{k: rec.get(k) for k in ("step", "loss", "real_tokens", "tokens_per_s", "lr", "rank_ms_per_step")}
                           for rec in r.records]}
        if n in coverage:
            entry["coverage"] = coverage[n]
        runs[n] = entry
    base = min(cfg.gpus)
    for n in cfg.gpus:
        if n != base and runs[base].get("rank_ms_per_step"):
            runs[n]["slowdown_ms_per_micro_batch"] = slowdown_breakdown(
                [x.records for x in repeats[n]], accum[n], runs[base]["rank_ms_per_step"], accum[base], cfg.warmup_steps)
    tps = {n: r["throughput"] for n, r in runs.items() if r["ok"]}
    fault = None
    if drill:
        n = max(cfg.gpus)
        fault = (fault_drill(cfg, inputs, n, accum[n], work, cuda, results[n]) if results[n].ok
                 else {"gpus": n, "ok": False, "error": f"the reference run on {n} GPU(s) failed"})
    per_repeat_eff = [scaling_efficiency({n: r["repeats"][i]["throughput"] for n, r in runs.items() if r["repeats"][i]["ok"]})
                      for i in range(cfg.repeats)]
    return {"engine": engine, "runs": runs, "efficiency": scaling_efficiency(tps), "efficiency_per_repeat": per_repeat_eff,
            "loss_agreement": loss_agreement({n: r.records for n, r in results.items() if r.records}, cfg.last_k),
            "fault_drill": fault}


def engine_comparison(per_engine: dict[str, dict]) -> dict[str, dict[int, dict]]:
    """{engine: {N: tokens/s, efficiency, tokens/s against the first engine at the same N}}."""
    first = next(iter(per_engine.values()))["runs"]
    out = {}
    for engine, sec in per_engine.items():
        out[engine] = {}
        for n, r in sec["runs"].items():
            tps = r["throughput"].get("tokens_per_s")
            ref = first.get(n, {}).get("throughput", {}).get("tokens_per_s")
            out[engine][n] = {"tokens_per_s": tps, "efficiency": sec["efficiency"].get(n),
                              "vs_first_engine": tps / ref if tps and ref else None, "ok": r["ok"]}
    return out


def run(cfg: ScalingConfig) -> dict:
    work = Path(cfg.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cuda_count = gpu_count()
    wanted = max(cfg.gpus + cfg.builder_gpus)
    if cuda_count and wanted > cuda_count:
        raise ValueError(f"asked for {wanted} GPUs, this machine has {cuda_count}")
    result: dict = {"config": asdict(cfg), "environment": environment()}
    if cfg.gpus:
        result["training"] = training_scaling(cfg, work, cuda_count > 0)
    if cfg.builder_gpus:
        result["builder"] = builder_scaling(cfg, work, cuda_count > 0)
    report = markdown_report(result)
    out = Path(cfg.out) if cfg.out else work / "scaling.json"
    atomic_write_json(out, result)
    atomic_write_text(out.with_suffix(".md"), report)
    print(report)
    print(f"[scaling] wrote {out} and {out.with_suffix('.md')}", flush=True)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_config(ScalingConfig, argv)
    setup_logging("benchmarks", rank=0)
    print_config(cfg)
    result = run(cfg)
    failed = [n for n, r in (result.get("training") or {}).get("runs", {}).items() if not r["ok"]]
    drill = (result.get("training") or {}).get("fault_drill")
    failed += ["fault drill"] if drill and not drill["ok"] else []
    failed += [r["processes"] for r in (result.get("builder") or {}).get("runs", []) if r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
