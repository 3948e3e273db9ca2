"""Inference checkpoints (save, plain-PEFT load, load_inference_model, bad input) and resume bookkeeping."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from trainer.checkpoint import (
    CheckpointError,
    TrainerState,
    latest_resume_tag,
    load_inference_model,
    rng_state,
    save_inference_checkpoint,
    set_rng_state,
)
from trainer.config import TrainConfig, replace

COND_MAP = {"shr6": 0, "scp": 1}


def _batch(tokenizer, latent_dim, n=3):
    from models.collate import TrainItem, collate_train
    from models.tasks import build_prompt, tokenize_prompt

    rng = np.random.default_rng(1)
    items = []
    for i, task in zip(range(n), ["caption", "summary", "caption"]):
        p = build_prompt(task, cond_name="shr6", caption="Strong shear in the northwest. Storms form.",
                         global_summary="SUMMARY...Isolated severe storms possible.")
        items.append(TrainItem(tokenize_prompt(p, tokenizer, 256, 4), rng.standard_normal(latent_dim).astype(np.float32),
                               i % 2, key=f"k{i}"))
    return collate_train(items, tokenizer.pad_token_id, 4)


@pytest.fixture(scope="module")
def trained(tiny_lm_dir, tmp_path_factory):
    """A PrefixLM with non-trivial (randomised) LoRA/prefix weights saved as an inference checkpoint."""
    from models.prefix_lm import build_prefix_lm

    cfg = replace(TrainConfig(), model={"model_path": str(tiny_lm_dir), "precision": "fp32"})
    torch.manual_seed(0)
    model, tok = build_prefix_lm(cfg.model, latent_dim=32)
    with torch.no_grad():  # LoRA B starts at zero: make the adapter matter
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    out = tmp_path_factory.mktemp("ckpt") / "checkpoint-7"
    save_inference_checkpoint(model, tok, COND_MAP, cfg, out)
    return model, tok, out


def test_inference_checkpoint_contents(trained):
    _, _, ckpt = trained
    names = {p.name for p in ckpt.iterdir()}
    for f in ("adapter_config.json", "adapter_model.safetensors", "stage2_prefix_modules.safetensors",
              "prefix_config.json", "cond_name_to_id.json", "train_config.json", "tokenizer_config.json"):
        assert f in names, f
    assert json.loads((ckpt / "cond_name_to_id.json").read_text()) == COND_MAP
    assert not any(p.name.startswith(".tmp") for p in ckpt.parent.iterdir())


def test_adapter_loads_in_plain_peft_with_same_logits(trained, tiny_lm_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok, ckpt = trained
    base = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(ckpt)).eval()
    ids = torch.tensor([tok("The map shows strong shear over the northwest.")["input_ids"]])
    with torch.no_grad():
        want = model.lm(input_ids=ids).logits
        got = peft(input_ids=ids).logits
    assert torch.allclose(want, got, atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_lm_dir), dtype=torch.float32)
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids).logits, got, atol=1e-3)  # the adapter matters


def test_load_inference_model_gives_the_same_loss(trained):
    model, tok, ckpt = trained
    loaded, tok2, cond_map, train_cfg = load_inference_model(ckpt)
    assert cond_map == COND_MAP and isinstance(train_cfg, TrainConfig) and train_cfg.model.lora_r == 32
    batch = _batch(tok, 32)
    with torch.no_grad():
        assert torch.allclose(model(batch).loss, loaded(batch).loss, atol=1e-5)
    assert tok2("hello world")["input_ids"] == tok("hello world")["input_ids"]


def test_seed_file_names_are_accepted(trained, tmp_path):
    import shutil

    from safetensors.torch import load_file

    model, tok, ckpt = trained
    seed = tmp_path / "seed_ckpt"
    shutil.copytree(ckpt, seed)
    (seed / "train_config.json").unlink()
    torch.save(load_file(str(seed / "adapter_model.safetensors")), seed / "adapter_model.bin")
    (seed / "adapter_model.safetensors").unlink()
    torch.save(load_file(str(seed / "stage2_prefix_modules.safetensors")), seed / "stage2_prefix_modules.pt")
    (seed / "stage2_prefix_modules.safetensors").unlink()
    loaded, _, _, train_cfg = load_inference_model(seed)
    assert train_cfg is None  # the seed wrote no train_config.json
    batch = _batch(tok, 32)
    with torch.no_grad():
        assert torch.allclose(model(batch).loss, loaded(batch).loss, atol=1e-5)


def test_unknown_train_config_fields_are_ignored_on_load(trained, tmp_path):
    """A train_config.json with fields this TrainConfig lacks (another trainer version) still loads."""
    import shutil

    _, _, ckpt = trained
    other = tmp_path / "other_version"
    shutil.copytree(ckpt, other)
    saved = json.loads((other / "train_config.json").read_text())
    saved["model"]["a_removed_option"] = 1
    saved["a_removed_group"] = {"x": 2}
    (other / "train_config.json").write_text(json.dumps(saved))
    _, _, _, train_cfg = load_inference_model(other)
    assert train_cfg.model.lora_r == 32 and train_cfg.data.max_seq_len == saved["data"]["max_seq_len"]


@pytest.mark.parametrize("missing", ["adapter_model.safetensors", "stage2_prefix_modules.safetensors",
                                     "cond_name_to_id.json", "adapter_config.json"])
def test_missing_file_is_named(trained, tmp_path, missing):
    import shutil

    _, _, ckpt = trained
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / missing).unlink()
    with pytest.raises(CheckpointError, match=missing.split(".")[0]):
        load_inference_model(broken)


def test_adapter_for_another_base_model_is_a_clear_error(trained, tmp_path, synthetic_data):
    from tiny_models.lm import make_tiny_lm

    _, _, ckpt = trained
    other = make_tiny_lm(tmp_path / "other_lm", corpus_json=synthetic_data[0], hidden_size=48)
    with pytest.raises(CheckpointError, match="hidden size"):
        load_inference_model(ckpt, base_model_path=str(other))


def test_latest_pointer_ignores_an_incomplete_newer_checkpoint(tmp_path):
    root = tmp_path / "resume"
    (root / "step-2").mkdir(parents=True)
    (root / "step-2" / "trainer_state.json").write_text(json.dumps({"step": 2, "rng": []}))
    (root / "latest").write_text("step-2\n")
    (root / "step-4").mkdir()  # a save killed before trainer_state.json and `latest` were written
    assert latest_resume_tag(tmp_path) == "step-2"
    assert latest_resume_tag(tmp_path / "nothing") is None
    (root / "latest").write_text("step-4\n")  # a pointer to an incomplete save: the one before it
    assert latest_resume_tag(tmp_path) == "step-2"


# ------------------------------------------------------------------------------------------------
# Resume: the newest complete, intact checkpoint (resume/latest is a hint)


class FileEngine:
    """Stands in for an engine: one weights file per checkpoint, loaded back weights-only."""

    def __init__(self):
        self.loaded = None

    def save(self, root, tag, client_state=None):
        (root / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"tag": tag, "w": torch.randn(256)}, root / tag / "model_states.pt")

    def load(self, root, tag):
        self.loaded = torch.load(root / tag / "model_states.pt", weights_only=True)["tag"]


def _saved_run(tmp_path, steps=(2, 4, 6)):
    from trainer.checkpoint import save_resume_checkpoint

    for step in steps:
        save_resume_checkpoint(FileEngine(), tmp_path, TrainerState(step=step, epoch=step // 4), True, keep=10)
    return tmp_path / "resume"


def _resume(tmp_path):
    """(state, the tag the engine loaded, the warnings) of a --resume in `tmp_path`."""
    from trainer.checkpoint import load_resume_checkpoint

    engine, warnings = FileEngine(), []
    state = load_resume_checkpoint(engine, tmp_path, rank=0, world_size=1, warn=warnings.append)
    return state, engine.loaded, warnings


def test_resume_without_latest_continues_from_the_newest_complete_checkpoint(tmp_path):
    root = _saved_run(tmp_path)
    assert json.loads((root / "step-6" / "trainer_state.json").read_text())["files"] == {
        "model_states.pt": (root / "step-6" / "model_states.pt").stat().st_size}
    (root / "latest").unlink()
    (root / "step-8").mkdir()  # a save killed before its trainer_state.json
    FileEngine().save(root, "step-8")
    state, loaded, warnings = _resume(tmp_path)
    assert (state.step, state.epoch, loaded) == (6, 1, "step-6")
    assert any("step-8" in w and "incomplete" in w for w in warnings), warnings
    # A `latest` pointed back (a rewind) is followed: checkpoints newer than it were never committed.
    (root / "latest").write_text("step-4\n")
    assert _resume(tmp_path)[1] == "step-4"


def test_resume_with_a_garbage_latest_continues_from_the_newest_with_a_warning(tmp_path):
    root = _saved_run(tmp_path)
    (root / "latest").write_bytes(b"\xff\xfe\x00\x9cgarbage")
    state, loaded, warnings = _resume(tmp_path)
    assert (state.step, loaded) == (6, "step-6")
    assert any(str(root / "latest") in w for w in warnings), warnings


@pytest.mark.parametrize("damage", ["truncated", "missing", "state garbage", "state truncated"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, damage):
    root = _saved_run(tmp_path)
    weights, marker = root / "step-6" / "model_states.pt", root / "step-6" / "trainer_state.json"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "missing":
        weights.unlink()
    elif damage == "state garbage":
        marker.write_bytes(b"\x00\xff" * 10)
    else:
        marker.write_bytes(marker.read_bytes()[:50])
    state, loaded, warnings = _resume(tmp_path)
    assert (state.step, loaded) == (4, "step-4")
    named = weights if damage in ("truncated", "missing") else marker
    assert any(str(named) in w for w in warnings), warnings
    assert any("continuing from" in w and "step-4" in w for w in warnings), warnings


def test_resume_with_every_checkpoint_damaged_is_a_clear_error_naming_the_files(tmp_path):
    root = _saved_run(tmp_path, steps=(2, 4))
    (root / "step-4" / "model_states.pt").write_bytes(b"\x00" * 10)
    (root / "step-2" / "trainer_state.json").write_text("{")
    with pytest.raises(CheckpointError) as err:
        _resume(tmp_path)
    assert str(root / "step-4" / "model_states.pt") in str(err.value)
    assert str(root / "step-2" / "trainer_state.json") in str(err.value)
    # Nothing ever committed (a first save killed early): a fresh start, as before.
    fresh = tmp_path / "fresh"
    (fresh / "resume" / "step-2").mkdir(parents=True)
    state, loaded, warnings = _resume(fresh)
    assert state is None and loaded is None and any("incomplete" in w for w in warnings)


def test_a_failed_save_over_an_existing_step_leaves_it_incomplete_and_pruning_counts_complete_ones(tmp_path):
    from trainer.checkpoint import save_resume_checkpoint

    root = _saved_run(tmp_path, steps=(2, 4))

    class DiesWhileSaving(FileEngine):
        def save(self, root, tag, client_state=None):
            (root / tag / "model_states.pt").write_bytes(b"half")
            raise KeyboardInterrupt  # the job is killed mid-save

    with pytest.raises(KeyboardInterrupt):  # a resumed run saves step 4 again, and dies
        save_resume_checkpoint(DiesWhileSaving(), tmp_path, TrainerState(step=4), True, keep=10)
    assert not (root / "step-4" / "trainer_state.json").exists()
    assert _resume(tmp_path)[1] == "step-2"

    (root / "step-100").mkdir()  # left by a save that never finished
    save_resume_checkpoint(FileEngine(), tmp_path, TrainerState(step=6), True, keep=2)
    # the incomplete step-4 and step-100 are deleted, and do not count against keep=2
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-2", "step-6"]
    assert _resume(tmp_path)[1] == "step-6"


def test_rng_state_round_trip_through_json():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = json.loads(json.dumps(rng_state()))
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_trainer_state_defaults():
    s = TrainerState(world_size=2, seed=3)
    assert (s.step, s.epoch, s.batches_in_epoch, s.consecutive_nan) == (0, 0, 0, 0)


# --------------------------------------------------------------------------------------------
# Stage1 identity
# --------------------------------------------------------------------------------------------

STAGE1 = {"encoder_sha256": "e" * 64, "classifier_sha256": "c" * 64, "image_size": 32, "trainable_blocks": 0,
          "pooling": "mean", "latent_dim": 32, "frame": 0,
          "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}, "num_tokens": 0}


def test_stage1_identity_is_written_with_the_checkpoint_and_read_back(trained, tmp_path):
    from data_prep.manifest import Stage1Record
    from trainer.checkpoint import STAGE1_IDENTITY_FILE, load_stage1_identity

    model, tok, old = trained
    out = save_inference_checkpoint(model, tok, COND_MAP, TrainConfig(), tmp_path / "final",
                                    stage1=Stage1Record(**STAGE1))
    assert json.loads((out / STAGE1_IDENTITY_FILE).read_text()) == STAGE1  # the manifest's stage1 section
    assert load_stage1_identity(out) == Stage1Record(**STAGE1)
    assert load_stage1_identity(old) is None  # written without one (older checkpoints, the seed's)

    (out / STAGE1_IDENTITY_FILE).write_text('{"encoder_sha256": "e"}')
    with pytest.raises(CheckpointError, match=f"{STAGE1_IDENTITY_FILE}: missing field"):
        load_inference_model(out)
    (out / STAGE1_IDENTITY_FILE).write_text("{")
    with pytest.raises(CheckpointError, match=f"{STAGE1_IDENTITY_FILE}: not valid JSON"):
        load_stage1_identity(out)


def test_checkpointer_stores_the_stage1_identity_in_every_inference_checkpoint(trained, tmp_path, monkeypatch):
    """The trainer's checkpoint component passes the manifest's stage1 section on to every save."""
    from types import SimpleNamespace

    from data_prep.manifest import Stage1Record
    from trainer import checkpointer as checkpointer_mod
    from trainer.checkpoint import load_stage1_identity
    from trainer.distributed import DistInfo

    model, tok, _ = trained
    monkeypatch.setattr(checkpointer_mod, "save_resume_checkpoint", lambda *a, **k: None)  # engine state: not here
    cfg = replace(TrainConfig(), checkpoint={"output_dir": str(tmp_path / "run"), "save_steps": 2})
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    engine = SimpleNamespace(module=model, gathered_state_dict=lambda: None)  # replicated weights
    ckpt = checkpointer_mod.Checkpointer(cfg, dist, engine, tok, COND_MAP,
                                         stage1=Stage1Record(**STAGE1))
    skips = SimpleNamespace(check=lambda: None)
    ckpt.maybe_save(TrainerState(step=2), total_steps=4, skips=skips)
    ckpt.save(TrainerState(step=4), "final", skips)
    for tag in ("checkpoint-2", "final"):
        assert load_stage1_identity(tmp_path / "run" / tag) == Stage1Record(**STAGE1)
