"""Timing a step without syncing inside it: warm-up, timed steps between two device syncs, host issue
vs device time per phase, the matmul peak for MFU, a profile and the host<->device syncs."""

from __future__ import annotations

import collections
import gc
import statistics
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from benchmarks.throughput.config import BenchConfig
from benchmarks.throughput.workload import Example, doc_lengths
from common.io import atomic_write_text
from trainer.gc_steps import StepAlignedGC


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_tflops(device: torch.device) -> dict:
    """bf16 (CUDA) / fp32 (CPU) matmul peak measured now, as the MFU denominator."""
    n, dtype, iters = (8192, torch.bfloat16, 20) if device.type == "cuda" else (512, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    synchronize(device)
    t = time.perf_counter()
    for _ in range(iters):
        a @ b
    synchronize(device)
    dt = (time.perf_counter() - t) / iters
    return {"tflops": round(2 * n**3 / dt / 1e12, 3), "gemm": f"{n}^3 {str(dtype).split('.')[-1]}"}


def step_flops(lengths: list[int], n_params: int, layers: int, hidden: int, checkpointing: float) -> float:
    """`checkpointing`: the fraction of decoder layers recomputed in backward (bool = all/none)."""
    c = float(checkpointing)
    linear = (4 + 2 * c) * n_params * sum(lengths)
    attention = (6 + 2 * c) * layers * hidden * sum(n * n for n in lengths)
    return float(linear + attention)


FLOPS_FORMULA = ("model FLOPs/step = 4*N*real_tokens + 6*layers*hidden*sum(n_i^2) "
                 "((4+2c)*N and (6+2c)*... when a fraction c of the layers is recomputed in backward); N = all parameters incl. LoRA and "
                 "prefix, n_i = real tokens of example i; padding not counted")


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class PhaseTimer:
    """Where a step's time goes, without syncing: host time to issue each phase (perf_counter) and
    device time between the phase's markers (CUDA events, read after the final sync). The host may
    run ahead in one phase and spend its lead in the next (a full launch queue blocks it), so the
    step's totals decide: host below device = GPU-bound; equal = the GPU waited for the Python, or the
    step synchronises with the device (DeepSpeed's overflow check: its step phase then shows host time
    far above device time; `--sync-debug` lists such points). To tell those two apart, `issue` sums
    the phases that issue the model's work (forward, backward): host below device there, with the
    totals equal, means the host ran ahead of the device and then waited for it in the step."""

    PHASES = ("forward", "backward", "step")

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host = {p: [] for p in self.PHASES}
        self.events: list[list] = []
        self.enabled = False

    def mark(self):
        if not self.enabled:
            return None
        t = time.perf_counter()
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return t, e
        return t, None

    def add(self, marks: list) -> None:
        if not self.enabled:
            return
        for phase, (a, b) in zip(self.PHASES, zip(marks, marks[1:])):
            self.host[phase].append(1000 * (b[0] - a[0]))
        if self.cuda:
            self.events.append([m[1] for m in marks])

    def summary(self) -> dict:
        out = {}
        for i, phase in enumerate(self.PHASES):
            h = self.host[phase]
            if not h:
                continue
            row = {"host_ms": round(statistics.fmean(h), 2)}
            if self.events:
                row["device_ms"] = round(statistics.fmean(ev[i].elapsed_time(ev[i + 1]) for ev in self.events), 2)
            out[phase] = row
        if out and all("device_ms" in r for r in out.values()):
            # Per phase, the host may run ahead in one (forward) and spend the lead in the next; the
            # whole step says who waits: host below device = the GPU is the bottleneck.
            host, device = sum(r["host_ms"] for r in out.values()), sum(r["device_ms"] for r in out.values())
            out["step_total"] = {"host_ms": round(host, 2), "device_ms": round(device, 2),
                                 "gpu_bound": host < device}
            if "forward" in out and "backward" in out:
                host = out["forward"]["host_ms"] + out["backward"]["host_ms"]
                device = out["forward"]["device_ms"] + out["backward"]["device_ms"]
                out["issue"] = {"host_ms": round(host, 2), "device_ms": round(device, 2), "gpu_bound": host < device}
        return out


def bound_label(phases: dict) -> str:
    """Who waits, in words, from PhaseTimer.summary()."""
    total, issue = phases["step_total"], phases.get("issue")
    if total["gpu_bound"]:
        return "GPU-bound"
    if issue and issue["gpu_bound"]:
        wait = phases["step"]["host_ms"] - phases["step"]["device_ms"]
        return (f"GPU-bound while issuing (forward + backward: host {issue['host_ms']:.1f} < device "
                f"{issue['device_ms']:.1f} ms), then the step waits ~{wait:.0f} ms for the device (a sync in it)")
    return "host-bound"


def gpu_state(device: torch.device) -> dict | None:
    """SM clock, temperature and power of the GPU (NVML through torch; None where unavailable): a
    mode timed on a hot, clock-throttled GPU after a heavy one is slower for reasons of its own."""
    if device.type != "cuda":
        return None
    out = {}
    for key, fn in (("sm_clock_mhz", torch.cuda.clock_rate), ("temperature_c", torch.cuda.temperature),
                    ("power_w", lambda d: torch.cuda.power_draw(d) / 1000)):
        try:
            out[key] = round(float(fn(device)), 1)
        except Exception:  # noqa: BLE001 - pynvml missing or the query unsupported
            out[key] = None
    return out


def time_mode(step: Callable[[dict], torch.Tensor], batches: list[dict], groups: list[list[Example]],
              cfg: BenchConfig, device: torch.device, desc: str, timer: PhaseTimer | None = None) -> dict:
    """Warm-up steps, then timed steps between two device syncs. Batches are on the device
    already, so the time is the step's alone (the trainer's loader prefetches them too)."""
    w = cfg.warmup_steps
    step_gc = StepAlignedGC(cfg.gc_interval_steps)
    try:
        def gc_step(i: int, b: dict) -> torch.Tensor:
            loss = step(b)
            step_gc.step(i + 1)
            return loss

        for i, b in enumerate(tqdm(batches[:w], desc=f"{desc} warm-up", leave=False, disable=None)):
            gc_step(i, b)
        synchronize(device)
        gpu_before = gpu_state(device)
        if timer:
            timer.enabled = True
        t0 = time.perf_counter()
        losses = [gc_step(w + i, b) for i, b in enumerate(tqdm(batches[w:], desc=desc, leave=False, disable=None))]
        synchronize(device)
        seconds = time.perf_counter() - t0
        gpu_after = gpu_state(device)
    finally:
        step_gc.close()
        if timer:
            timer.enabled = False
    timed = groups[w:]
    n_img = cfg.model.num_image_tokens
    real = sum(sum(doc_lengths(g, n_img)) for g in timed)
    slots = sum(int(b["input_ids"].numel()) for b in batches[w:])
    return {"seconds": seconds, "ms_per_step": 1000 * seconds / len(timed), "real_tokens": real,
            "tokens_per_s": real / seconds, "pad_fraction": 1 - real / slots,
            "slots_per_step": slots / len(timed),
            "examples_per_step": statistics.fmean(len(g) for g in timed),
            "loss_last": float(losses[-1].float()), "loss_finite": all(bool(torch.isfinite(x)) for x in losses),
            **({"phases": timer.summary()} if timer else {}),
            **({"gpu_before": gpu_before, "gpu_after": gpu_after} if gpu_before is not None else {})}


def profile_steps(step: Callable[[dict], torch.Tensor], batches: list[dict], device: torch.device,
                  out: str = "") -> dict:
    """torch.profiler over a few steps: the top ops by self device time and by self host time, and
    how busy the device was (sum of kernel times / wall time; < 1 means it waited for the host)."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for b in batches:
            step(b)
        synchronize(device)
    wall_us = (time.perf_counter() - t0) * 1e6

    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    tables = f"# mode 4, {len(batches)} steps, sorted by {sort}\n{events.table(sort_by=sort, row_limit=30)}\n"
    if cuda:
        tables += f"\n# sorted by self_cpu_time_total (host work)\n{events.table(sort_by='self_cpu_time_total', row_limit=30)}\n"
    total = sum(getattr(e, sort) for e in events) or 1.0
    top = sorted(events, key=lambda e: getattr(e, sort), reverse=True)[:25]
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
    busy = (kernel_us / wall_us) if cuda else None  # kernels of one stream rarely overlap here
    path = (Path(out).with_suffix(".profile.txt") if out
            else Path(tempfile.gettempdir()) / "train_throughput.profile.txt")
    atomic_write_text(path, tables + (f"\ndevice busy: {busy:.1%} of {wall_us / 1000:.1f} ms wall (profiled)\n" if cuda else ""))
    return {"file": str(path), "sorted_by": sort, "steps": len(batches),
            "device_busy_fraction": None if busy is None else round(busy, 4),
            "top": [{"name": e.key, "self_ms": round(getattr(e, sort) / 1000 / len(batches), 3),
                     "share": round(getattr(e, sort) / total, 4), "calls": e.count} for e in top]}


def sync_points(step: Callable[[dict], torch.Tensor], batches: list[dict], device: torch.device,
                out: str = "") -> dict:
    """Every host<->device synchronisation inside a few steps, grouped by where the project's code
    (not torch's) issued it: torch reports each one as a warning in sync-debug mode."""
    if device.type != "cuda":
        return {"skipped": "sync debug mode needs CUDA"}
    seen: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "/torch/" not in f.filename and "/warnings.py" not in f.filename][-5:]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
        seen[(str(message).splitlines()[0][:100], where)] += 1

    synchronize(device)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # restored by catch_warnings
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for b in batches:
                step(b)
            synchronize(device)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    rows = [{"per_step": n / len(batches), "what": what, "where": where} for (what, where), n in seen.most_common()]
    path = (Path(out).with_suffix(".syncs.txt") if out
            else Path(tempfile.gettempdir()) / "train_throughput.syncs.txt")
    atomic_write_text(path, "".join(f"{r['per_step']:6.1f}/step  {r['what']}\n        {r['where']}\n" for r in rows))
    return {"file": str(path), "steps": len(batches), "per_step": sum(seen.values()) / len(batches), "points": rows}
