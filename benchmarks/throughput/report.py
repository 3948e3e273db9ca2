"""The results as a table: ratios between modes, the markdown table, the environment."""

from __future__ import annotations

import importlib
import os
import sys

import torch

from benchmarks.throughput.config import MODE_NAMES
from benchmarks.throughput.timing import FLOPS_FORMULA, bound_label


def environment(device: torch.device) -> dict:
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "device": str(device),
           "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    for mod in ("transformers", "peft", "liger_kernel", "flash_attn", "triton"):
        try:
            env[mod] = getattr(importlib.import_module(mod), "__version__", "yes")
        except Exception as e:  # noqa: BLE001 - report, whatever the reason
            env[mod] = f"no ({type(e).__name__})"
    return env


def ratios(results: dict) -> dict:
    ok = {m: r for m, r in results.items() if "tokens_per_s" in r}
    return {f"4/{b}": ok[4]["tokens_per_s"] / ok[b]["tokens_per_s"] for b in (1, 2, 3) if 4 in ok and b in ok}


def markdown_table(results: dict, ratio: dict, peak: dict) -> str:
    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    lines = ["| mode | configuration | ex/step | ms/step | real tok/s | pad % | TFLOP/s | MFU | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in sorted(results):
        r = results[m]
        if "error" in r:
            lines.append(f"| {m} {MODE_NAMES[m]} | FAILED: {r['error'][:120]} | | | | | | | |")
            continue
        lines.append(f"| {m} {MODE_NAMES[m]} | {r['label']} | {r['examples_per_step']:.1f} | "
                     f"{r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | {100 * r['pad_fraction']:.0f} | "
                     f"{r['tflops']:.4g} | {100 * r['mfu']:.1f}% | {f(r['peak_gib'], '.1f')} |")
    lines.append("")
    for m in sorted(results):
        phases = results[m].get("phases")
        if phases:
            lines.append(f"mode {m} per step, host time to issue / device time between markers (ms): " + ", ".join(
                f"{k} {v['host_ms']:.1f}" + (f" / {v['device_ms']:.1f}" if "device_ms" in v else "")
                for k, v in phases.items() if k != "issue") + (
                f" -> {bound_label(phases)}" if "step_total" in phases else ""))
        if results[m].get("gpu_after"):
            b, a = results[m]["gpu_before"], results[m]["gpu_after"]
            lines.append(f"mode {m} GPU before / after the timed steps: SM {b['sm_clock_mhz']} / {a['sm_clock_mhz']} MHz, "
                         f"{b['temperature_c']} / {a['temperature_c']} C, {b['power_w']} / {a['power_w']} W")
        busy = results[m].get("profile", {}).get("device_busy_fraction")
        if busy is not None:
            lines.append(f"mode {m} device busy (profiled steps): {100 * busy:.1f}%")
    lines.append("ratios (real tokens/s): " + (", ".join(f"{k} = {v:.2f}x" for k, v in ratio.items()) or "–"))
    lines.append(f"MFU against the measured matmul peak: {peak['tflops']:.4g} TFLOP/s ({peak['gemm']})")
    lines.append(FLOPS_FORMULA)
    return "\n".join(lines)
