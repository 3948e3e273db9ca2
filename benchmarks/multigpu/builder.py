"""Shard-builder scaling: `python -m data_prep.build_shards` on N processes (one GPU each), same images,
identical shards expected."""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.multigpu.config import ScalingConfig
from benchmarks.multigpu.inputs import random_stage1, synthetic_data
from benchmarks.multigpu.runs import REPO_ROOT, subprocess_env
from data_prep.build_shards import BUILD_DIR
from models.stage1 import load_stage1_encoder

log = logging.getLogger(__name__)


def run_builder(cfg: ScalingConfig, n: int, data: tuple[list[str], Path], stage1: tuple[str, str], image_size: int,
                samples_per_shard: int, work: Path, cuda: bool) -> dict:
    """N build_shards processes (one per GPU) into a fresh directory; their per-node records + wall time."""
    json_paths, image_root = data
    out = work / f"build-procs{n}"
    shutil.rmtree(out, ignore_errors=True)
    base = [sys.executable, "-m", "data_prep.build_shards", "--gemini-json", *json_paths, "--image-root", str(image_root),
            "--stage1-encoder-ckpt", stage1[0], "--stage1-classifier-ckpt", stage1[1], "--image-size", str(image_size),
            "--out", str(out), "--samples-per-shard", str(samples_per_shard), "--batch-size", str(cfg.builder_batch_size),
            "--num-workers", str(cfg.builder_num_workers), "--num-nodes", str(n)]
    print(f"[scaling] shard builder with {n} process(es), {samples_per_shard} images per shard -> {out}", flush=True)
    env = subprocess_env(cuda)
    out.mkdir(parents=True)
    start = time.perf_counter()
    procs = []
    for rank in range(n):
        penv = {**env, **({"CUDA_VISIBLE_DEVICES": str(rank)} if cuda else {})}
        f = open(work / f"build-procs{n}-rank{rank}.log", "w")
        procs.append((subprocess.Popen([*base, "--node-rank", str(rank)], cwd=REPO_ROOT, env=penv, stdout=f,
                                       stderr=subprocess.STDOUT), f))
    codes = []
    for p, f in procs:
        try:
            codes.append(p.wait(timeout=cfg.run_timeout_s))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
        f.close()
    wall = time.perf_counter() - start
    result = {"processes": n, "wall_s": wall, "ok": all(c == 0 for c in codes), "exit_codes": codes,
              "out": str(out), "logs": [str(work / f"build-procs{n}-rank{r}.log") for r in range(n)]}
    nodes = [json.loads((out / BUILD_DIR / f"node-{r}-of-{n}.json").read_text())
             for r in range(n) if (out / BUILD_DIR / f"node-{r}-of-{n}.json").is_file()]
    result["nodes"] = nodes
    images = sum(nd["images"] for nd in nodes)
    slowest = max((nd["seconds"] for nd in nodes), default=0.0)
    result.update(images=images, build_s=slowest,
                  images_per_s=images / slowest if slowest else None,
                  images_per_s_end_to_end=images / wall if wall else None)
    manifest = out / "manifest.json"
    result["shard_sha256"] = ({s["name"]: s["sha256"] for s in json.loads(manifest.read_text())["shards"]}
                              if manifest.is_file() else {})
    if not result["ok"] or not result["shard_sha256"]:
        result["error"] = f"exit codes {codes}; manifest {'present' if manifest.is_file() else 'missing'}; see {result['logs']}"
        print(f"[scaling] builder with {n} process(es) FAILED: {result['error']}", flush=True)
    return result


def builder_scaling(cfg: ScalingConfig, work: Path, cuda: bool) -> dict:
    data_dir = work / "builder-data"
    if not (data_dir / "md_image").is_dir():
        log.info("generating ~%d synthetic %d px images for the builder runs", cfg.builder_images, cfg.builder_image_px)
    json_paths = synthetic_data(data_dir, cfg.builder_images, cfg.builder_image_px, seed=1)
    stage1 = random_stage1(cfg, work)
    image_size = load_stage1_encoder(stage1[0]).config.image_size
    # Several shards per process, so that no process idles while another builds its last shard.
    samples_per_shard = max(1, math.ceil(cfg.builder_images / (4 * max(cfg.builder_gpus))))
    runs = [run_builder(cfg, n, (json_paths, data_dir), stage1, image_size, samples_per_shard, work, cuda)
            for n in cfg.builder_gpus]
    base = next((r for r in runs if r.get("images_per_s")), None)
    for r in runs:
        if base and r.get("images_per_s"):
            r["speedup"] = r["images_per_s"] / base["images_per_s"]
            r["speedup_end_to_end"] = r["images_per_s_end_to_end"] / base["images_per_s_end_to_end"]
    shas = [r["shard_sha256"] for r in runs if r["shard_sha256"]]
    return {"runs": runs, "stage1": stage1, "image_size": image_size, "samples_per_shard": samples_per_shard,
            "identical_shards": all(s == shas[0] for s in shas) if len(shas) > 1 else None}
