"""ZeRO-3 (`--deepspeed ds_configs/zero3.json`): parameter-partitioned training on CPU (gloo).

- Two ranks with ZeRO-3 make the updates of one process (the ZeRO-2 engine with 2 accumulation
  steps over the same micro-batches): same losses, same trained weights (fp32), for LoRA and for
  full fine-tuning; the inference checkpoint, gathered from the partitions, loads with plain PEFT /
  `AutoModelForCausalLM.from_pretrained`.
- The trainer end to end: N steps + resume + M steps = N + M steps, sample generations (every rank
  decodes in lockstep), the inference checkpoints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.zero3_steps import run_steps, steps_config
from trainer.config import TrainConfig, replace
from trainer.engines import build_ds_config

ZERO3 = "ds_configs/zero3.json"


def test_zero3_config_fills_its_bucket_sizes_from_the_hidden_size(tiny_lm_dir):
    cfg = replace(TrainConfig(), deepspeed=ZERO3, model={"model_path": str(tiny_lm_dir)})
    ds = build_ds_config(cfg, "bf16", hidden_size=4096)  # Mistral-7B
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and ds["bf16"]["enabled"] is True and "auto" not in json.dumps(ds)
    assert (z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"], z["stage3_param_persistence_threshold"]) == (
        4096 ** 2, int(0.9 * 4096 ** 2), 40960)
    assert z["stage3_gather_16bit_weights_on_model_save"] is False  # the trainer gathers what it saves itself
    hidden = json.loads((tiny_lm_dir / "config.json").read_text())["hidden_size"]
    assert build_ds_config(cfg, "fp32")["zero_optimization"]["reduce_bucket_size"] == hidden ** 2  # from --model-path
    offload = build_ds_config(replace(cfg, deepspeed="ds_configs/zero3_offload.json"), "bf16", hidden_size=8192)
    assert offload["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert offload["zero_optimization"]["reduce_bucket_size"] == 8192 ** 2


@pytest.fixture(scope="module")
def dist_one():
    """A 1-process group for the in-process reference; the launcher variables it exports are taken back."""
    from trainer.distributed import init_distributed

    saved = dict(os.environ)
    yield init_distributed(timeout_s=120)
    os.environ.clear()
    os.environ.update(saved)


def _launch_two_ranks(args: list[str]) -> None:
    from common.runtime import free_port
    from tests.test_train_e2e import REPO, run_env

    env = {**run_env(), "DS_ACCELERATOR": "cpu"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "tests.zero3_steps", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _safetensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
@pytest.mark.parametrize("use_lora", [True, False], ids=["lora", "full"])
def test_two_zero3_ranks_make_the_one_process_updates(use_lora, tiny_lm_dir, tmp_path, dist_one):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    two = tmp_path / "zero3_2ranks"
    _launch_two_ranks([str(tiny_lm_dir), str(two), ZERO3] + ([] if use_lora else ["--full"]))
    got_losses = json.loads((two / "losses.json").read_text())

    one = tmp_path / "zero2_1rank"
    cfg = steps_config(str(tiny_lm_dir), "ds_configs/zero2.json", use_lora, grad_accum=2)
    want_losses = run_steps(cfg, one / "ckpt", rank=0, world=1, is_main=True)
    assert len(got_losses) == len(want_losses) == 6
    assert got_losses == pytest.approx(want_losses, rel=1e-5, abs=1e-6)

    weights = "adapter_model.safetensors" if use_lora else "model.safetensors"
    want, got = _safetensors(one / "ckpt" / weights), _safetensors(two / "ckpt" / weights)
    assert sorted(got) == sorted(want) and all(v.numel() > 0 for v in got.values())
    base = _safetensors(next(tiny_lm_dir.glob("*.safetensors"))) if not use_lora else None
    moved = max(float((want[k] - (base[k] if base is not None and k in base else 0)).abs().max()) for k in want)
    assert moved > 1e-3, "the updates must be visible above the tolerance"
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-6, rtol=1e-5, msg=k)
    prefix_want, prefix_got = (_safetensors(d / "ckpt" / "stage2_prefix_modules.safetensors") for d in (one, two))
    for k in prefix_want:
        torch.testing.assert_close(prefix_got[k], prefix_want[k], atol=2e-6, rtol=1e-5, msg=k)

    # The gathered checkpoint is a standard one: plain PEFT / transformers load it.
    if use_lora:
        lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir)), str(two / "ckpt"))
        loaded = {k: v for k, v in lm.state_dict().items() if "lora_" in k}
        assert len(loaded) == len(got)
    else:
        lm = AutoModelForCausalLM.from_pretrained(str(two / "ckpt"))
        sd = lm.state_dict()
        for k in got:
            torch.testing.assert_close(sd[k], got[k], atol=0, rtol=0, msg=k)
