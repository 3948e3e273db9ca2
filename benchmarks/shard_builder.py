"""Shard builder throughput: the real builder vs a naive one-image-at-a-time loop, same data, one process.

    python -m benchmarks.shard_builder --num-images 2000 --model vit-b --device cuda --num-workers 8
    python -m benchmarks.shard_builder --num-images 300 --model tiny --device cpu       # CPU smoke run

Naive (what a first script does): for each element, decode its GIF, run the encoder and the
classifier on a batch of 1 in fp32, write the sample. Builder: `data_prep.build_shards.build`
(decoding in `--num-workers` processes, batched Stage1 under inference_mode with bf16 autocast on
GPU, shard writes). Both exclude model loading; both write real shards with the same sample format.

Models: `tiny` (the test models, 32 px) or `vit-b` (an MAE ViT-B/16 + EfficientNet-B0 at 224 px with
random weights built from their configs and saved as checkpoint files, so the same loaders run).
Data: the synthetic generator's GIFs at `--image-px` (WeatherQA's GIFs are a few hundred pixels).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
import webdataset as wds
from tqdm import tqdm

from benchmarks.make_random_model import save_vit_b_stage1
from common.config import parse_config, print_config
from common.runtime import resolve_device
from data_prep.build_shards import BuildConfig, build
from data_prep.gemini import assign_split, load_gemini_json, resolve_image_path
from data_prep.images import ImageDecodeError, decode_image
from data_prep.shard_format import ElementSample, encode_sample
from data_prep.synthetic import generate
from models.cond_names import default_cond_name_to_id
from models.stage1 import load_stage1_classifier, load_stage1_encoder
from tiny_models.stage1 import save_tiny_stage1


@dataclass
class BenchConfig:
    """Shard builder vs a naive one-image-at-a-time loop (images/s)."""

    num_images: int = field(default=1000, metadata={"help": "images to build (rounded up to whole cases of 20)"})
    naive_images: int = field(default=0, metadata={"help": "images for the naive loop (0 = --num-images; it is slow)"})
    model: Literal["tiny", "vit-b"] = field(default="tiny", metadata={"help": "tiny test models (32 px) or ViT-B/16 MAE + EfficientNet-B0 (224 px)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    num_workers: int = field(default=4, metadata={"help": "builder decode processes"})
    batch_size: int = field(default=64, metadata={"help": "builder Stage1 batch"})
    image_px: int = field(default=256, metadata={"help": "side of the generated GIFs"})
    trainable_blocks: int = field(default=0, metadata={"help": "K (cache block tokens when > 0)"})
    workdir: str = field(default="", metadata={"help": "where data/models/shards go ('' = a temp dir, deleted)"})
    json_out: str = field(default="", metadata={"help": "also write the results as JSON here"})


def naive_build(cfg: BuildConfig, device: torch.device, limit: int) -> tuple[int, float]:
    """One image at a time: decode, encode (batch 1, fp32), classify, write. Returns (images, seconds)."""
    cases, _ = load_gemini_json(cfg.gemini_json, default_cond_name_to_id())
    items = [(c, el) for c in cases for el in c.elements][:limit]
    encoder = load_stage1_encoder(cfg.stage1.stage1_encoder_ckpt, cfg.stage1.latent_pooling).to(device).eval()
    classifier = load_stage1_classifier(cfg.stage1.stage1_classifier_ckpt).to(device).eval()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with wds.TarWriter(str(out / "naive-000000.tar"), encoder=False) as tar, torch.no_grad():
        for case, el in tqdm(items, desc="naive", unit="img"):
            try:
                pixels = decode_image(resolve_image_path(cfg.image_root, el.image_rel_path), cfg.stage1.image_size)
            except ImageDecodeError:
                continue
            x = torch.from_numpy(pixels)[None].to(device)
            latent, tokens = encoder.encode(x, cfg.stage1.stage1_trainable_blocks)
            logits = classifier(x)
            tar.write(encode_sample(ElementSample(
                case.case_id, el.index, assign_split(case.case_id), el.cond_name, el.cond_id, el.caption,
                case.global_summary, latent[0].cpu().numpy(), logits[0].cpu().numpy(),
                pred_cond_id=int(logits[0].argmax()),
                block_tokens=None if tokens is None else tokens[0].cpu().numpy())))
    sync()
    return len(items), time.perf_counter() - start


def run(bench: BenchConfig, work: Path) -> dict:
    device = resolve_device(bench.device)
    image_size = 32 if bench.model == "tiny" else 224
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    enc, cls = save_tiny_stage1(models, image_size) if bench.model == "tiny" else save_vit_b_stage1(models)  # benchmarks.make_random_model: ViT-B/16 MAE + EfficientNet-B0
    num_cases = max(2, math.ceil(bench.num_images / 20))
    print(f"[bench] generating {num_cases} cases x 20 GIFs of {bench.image_px} px ...", flush=True)
    json_paths = generate(work / "data", num_cases=num_cases, num_files=2, seed=0, image_px=bench.image_px,
                          progress=True)

    def cfg(out: str, **kw) -> BuildConfig:
        return BuildConfig(gemini_json=[str(p) for p in json_paths], image_root=str(work / "data"),
                           out=str(work / out), stage1_encoder_ckpt=str(enc), stage1_classifier_ckpt=str(cls),
                           image_size=image_size, stage1_trainable_blocks=bench.trainable_blocks,
                           device=str(device), **kw)

    naive_n, naive_s = naive_build(cfg("naive"), device, bench.naive_images or bench.num_images)
    build(cfg("shards", num_workers=bench.num_workers, batch_size=bench.batch_size, samples_per_shard=1000))
    record = json.loads((work / "shards" / ".build" / "node-0-of-1.json").read_text())
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": bench.model, "image_size": image_size, "image_px": bench.image_px,
        "num_workers": bench.num_workers, "batch_size": bench.batch_size,
        "naive_images": naive_n, "naive_images_per_s": naive_n / naive_s,
        "builder_images": record["images"], "builder_images_per_s": record["images_per_s"],
    }
    result["speedup"] = result["builder_images_per_s"] / result["naive_images_per_s"]
    return result


def main(argv: Optional[Sequence[str]] = None) -> dict:
    bench = parse_config(BenchConfig, argv)
    print_config(bench)
    if bench.workdir:
        result = run(bench, Path(bench.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="shard_bench_") as tmp:
            result = run(bench, Path(tmp))
    print(f"\n[bench] {result['device']}, {bench.model}, {bench.num_workers} workers, batch {bench.batch_size}")
    print(f"[bench] naive   : {result['naive_images_per_s']:9.1f} images/s ({result['naive_images']} images)")
    print(f"[bench] builder : {result['builder_images_per_s']:9.1f} images/s ({result['builder_images']} images)")
    print(f"[bench] speedup : {result['speedup']:9.2f}x")
    if bench.json_out:
        Path(bench.json_out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
