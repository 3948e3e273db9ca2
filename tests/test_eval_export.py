"""eval.export + models.exported on tiny real models (CPU, fp32): the export generates what the checkpoint does."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from eval.export import main as export_main
from eval.inputs import load_shard_cases, select_cases
from eval.modeling import DecodingConfig, build_requests, generate_token_ids, load_checkpoint_model
from models.exported import EXPORT_INFO_FILE, EXPORT_PREFIX_DIR, EXPORT_STAGE1_FILE, generate_ids, load_exported

NUM_IMAGE_TOKENS = 2
PROMPT_LEN = 1024  # cot prompts of the tiny data are 530-704 tokens: rows of different lengths
GREEDY = dict(max_new_tokens=10, min_new_tokens=10, no_repeat_ngram_size=0, repetition_penalty=1.0)


def _make_checkpoint(out: Path, lm_dir: Path, encoder_ckpt: Path, use_lora: bool, tail_blocks: int) -> Path:
    """A Stage2 inference checkpoint with randomised LoRA/LM, prefix and (K > 0) Stage1 tail weights."""
    from models.cond_names import default_cond_name_to_id
    from models.prefix_lm import ModelConfig, build_prefix_lm
    from models.stage1 import load_stage1_encoder
    from trainer.checkpoint import save_inference_checkpoint

    encoder = load_stage1_encoder(encoder_ckpt)
    tail = encoder.tail(tail_blocks) if tail_blocks else None
    cfg = ModelConfig(model_path=str(lm_dir), num_image_tokens=NUM_IMAGE_TOKENS, lora_r=4, lora_alpha=8,
                      lora_dropout=0.0, use_lora=use_lora)
    torch.manual_seed(0)
    model, tok = build_prefix_lm(cfg, latent_dim=encoder.latent_dim, tail=tail, device="cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith("prefix.tail.") or (not use_lora and "mlp" in name):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    train_cfg = {"model": {"model_path": str(lm_dir), "num_image_tokens": NUM_IMAGE_TOKENS, "use_lora": use_lora},
                 "data": {"max_seq_len": 256},
                 "stage1": {"image_size": 32, "latent_pooling": "mean", "stage1_trainable_blocks": tail_blocks,
                            "stage1_encoder_ckpt": str(encoder_ckpt)}}
    return save_inference_checkpoint(model, tok, default_cond_name_to_id(), train_cfg, out)


@pytest.fixture(scope="module")
def cases(shard_dir_k1):
    split = "val" if len(load_shard_cases(shard_dir_k1, "val", max_cases=4)) >= 4 else "train"
    return select_cases(load_shard_cases(shard_dir_k1, split, max_cases=6), 5, 1)


def _assert_same_generations(ckpt: Path, export: Path, lm_dir: Path, cases, task: str = "cot") -> None:
    model = load_checkpoint_model(str(ckpt), str(lm_dir), device="cpu", dtype="fp32")
    requests, _ = build_requests(cases, task, model, PROMPT_LEN)
    assert len(requests) >= 3
    if task == "cot":  # prompts of different lengths: left padding is exercised
        assert len({len(r.example.prompt_ids) for r in requests}) > 1
    want = generate_token_ids(model, requests, DecodingConfig(batch_size=len(requests), **GREEDY))

    lm, tok, prefix, cond_map = load_exported(export)
    assert cond_map == model.cond_map
    got = generate_ids(lm, tok, prefix, [r.prompt for r in requests], latents=[r.case.latent for r in requests],
                       cond_ids=[r.case.cond_id for r in requests],
                       block_tokens=[r.case.block_tokens for r in requests], max_prompt_len=PROMPT_LEN, **GREEDY)
    assert got.tolist() == want.tolist()
    # One prompt at a time through the single-prompt form gives the same tokens as its batched row.
    r = requests[0]
    one = generate_ids(lm, tok, prefix, r.prompt, r.case.latent, r.case.cond_id, r.case.block_tokens,
                       max_prompt_len=PROMPT_LEN, **GREEDY)
    assert one[0].tolist() == want[0].tolist()


def test_lora_export_generates_like_the_checkpoint(tiny_lm_dir, stage1_ckpts, shard_dir_k1, synthetic_data,
                                                   cases, tmp_path):
    lm_dir = Path(tiny_lm_dir)
    ckpt = _make_checkpoint(tmp_path / "run" / "final", lm_dir, stage1_ckpts[0], use_lora=True, tail_blocks=1)
    manifest_stage1 = json.loads((shard_dir_k1 / "manifest.json").read_text())["stage1"]
    (ckpt / "stage1_identity.json").write_text(json.dumps(manifest_stage1))  # trainer.checkpoint STAGE1_IDENTITY_FILE
    out = tmp_path / "exported"
    export_main(["--checkpoint-dir", str(ckpt), "--out", str(out), "--dtype", "fp32"])

    # A plain Hugging Face LM directory, LoRA folded in; the prefix (with its tail) beside it.
    lm, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert not any("lora" in n for n, _ in lm.named_parameters())
    assert (out / "generation_config.json").is_file() and (out / "cond_name_to_id.json").is_file()
    assert sorted(p.name for p in (out / EXPORT_PREFIX_DIR).iterdir()) == [
        "prefix_config.json", "stage1_encoder_finetuned.safetensors", "stage2_prefix_modules.safetensors"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    stage1 = json.loads((out / EXPORT_STAGE1_FILE).read_text())
    assert stage1["source"].startswith("stage1_identity.json")
    assert stage1["encoder_sha256"] == manifest_stage1["encoder_sha256"] and stage1["image_size"] == 32
    assert json.loads((out / EXPORT_INFO_FILE).read_text())["lora_merged"] is True
    assert not list(tmp_path.glob(".tmp-*"))

    _assert_same_generations(ckpt, out, lm_dir, cases)

    # The README's snippet runs as written (paths swapped for the test's files).
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    gif = next(Path(synthetic_data[1]).rglob("*.gif"))
    code = (code.replace('"exported"', repr(str(out))).replace('"stage1_mae_encoder.pt"', repr(str(stage1_ckpts[0])))
            .replace('"map.gif"', repr(str(gif)))
            .replace("print(generate_from_latent(", "text = (generate_from_latent("))
    namespace: dict = {}
    exec(compile(code, "README snippet", "exec"), namespace)
    assert isinstance(namespace["text"], str)


def test_full_lm_export_and_overwrite_refused(tiny_lm_dir, stage1_ckpts, cases, tmp_path, capsys):
    """A --no-use-lora checkpoint is exported as its LM; an existing --out needs --force."""
    lm_dir = Path(tiny_lm_dir)
    ckpt = _make_checkpoint(tmp_path / "run" / "final", lm_dir, stage1_ckpts[0], use_lora=False, tail_blocks=0)
    out = tmp_path / "exported"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        export_main(["--checkpoint-dir", str(ckpt), "--out", str(out)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and "Traceback" not in err
    assert (out / "keep.txt").read_text() == "mine"

    # Even --force never replaces the checkpoint it reads.
    with pytest.raises(SystemExit):
        export_main(["--checkpoint-dir", str(ckpt), "--out", str(ckpt.parent), "--force"])
    assert (ckpt / "train_config.json").is_file()

    export_main(["--checkpoint-dir", str(ckpt), "--out", str(out), "--force"])
    assert not (out / "keep.txt").exists()
    info = json.loads((out / EXPORT_INFO_FILE).read_text())
    assert info["lora_merged"] is False and info["has_stage1_tail"] is False and info["dtype"] == "fp32"
    stage1 = json.loads((out / EXPORT_STAGE1_FILE).read_text())
    assert stage1["source"].startswith("train_config.json") and stage1["image_size"] == 32
    assert stage1["trainable_blocks"] == 0 and stage1["encoder_ckpt"] == str(stage1_ckpts[0])
    _assert_same_generations(ckpt, out, lm_dir, cases, task="summary")
