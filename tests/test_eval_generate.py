"""Batched generation, resume, baseline, bad inputs, compare and ablation on tiny real models (CPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from common.io import read_jsonl
from eval.generate import InputConfig, load_cases, run_generation
from eval.generate import main as generate_main
from eval.inputs import load_shard_cases, select_cases
from eval.modeling import DecodingConfig, build_requests, generate_token_ids, load_checkpoint_model, target_losses

NUM_IMAGE_TOKENS = 2
SPLIT = "train"  # the tiny synthetic build has few val cases; any split exercises the same code


@pytest.fixture(scope="module")
def lm_dir(request, tmp_path_factory):
    """The session's tiny Mistral; a local stand-in until tiny_models.lm lands."""
    try:
        import tiny_models.lm  # noqa: F401

        return Path(request.getfixturevalue("tiny_lm_dir"))
    except ImportError:
        from tests.test_model import make_tiny_lm_dir

        return make_tiny_lm_dir(tmp_path_factory.mktemp("eval_tiny_lm"))


@pytest.fixture(scope="module")
def ckpt(lm_dir, shard_dir, tmp_path_factory):
    """A Stage2 inference checkpoint of the tiny LM with randomised LoRA and prefix weights."""
    from models.cond_names import default_cond_name_to_id
    from models.prefix_lm import ModelConfig, build_prefix_lm
    from trainer.checkpoint import save_inference_checkpoint

    latent_dim = load_shard_cases(shard_dir, SPLIT, max_cases=1)[0].latent.shape[-1]
    cfg = ModelConfig(model_path=str(lm_dir), num_image_tokens=NUM_IMAGE_TOKENS, lora_r=4, lora_alpha=8,
                      lora_dropout=0.0)
    torch.manual_seed(0)
    model, tok = build_prefix_lm(cfg, latent_dim=latent_dim, device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    train_cfg = {"model": {"model_path": str(lm_dir), "num_image_tokens": NUM_IMAGE_TOKENS},
                 "data": {"max_seq_len": 256}, "stage1": {"image_size": 32, "latent_pooling": "mean"}}
    out = tmp_path_factory.mktemp("ckpt") / "final"
    save_inference_checkpoint(model, tok, default_cond_name_to_id(), train_cfg, out)
    return out


@pytest.fixture(scope="module")
def ckpt_with_identity(ckpt, shard_dir, tmp_path_factory):
    """`ckpt` as the trainer writes checkpoints now: with the Stage1 identity of its training shards."""
    from dataclasses import asdict

    from data_prep.manifest import load_manifest
    from trainer.checkpoint import STAGE1_IDENTITY_FILE

    out = tmp_path_factory.mktemp("ckpt_identity") / "final"
    shutil.copytree(ckpt, out)
    (out / STAGE1_IDENTITY_FILE).write_text(json.dumps(asdict(load_manifest(shard_dir).stage1)))
    return out


@pytest.fixture(scope="module")
def model(ckpt, lm_dir):
    return load_checkpoint_model(str(ckpt), str(lm_dir), device="cpu", dtype="fp32", name="tiny")


@pytest.fixture(scope="module")
def cases(model, shard_dir):
    return select_cases(load_shard_cases(shard_dir, SPLIT, model.cond_map), 6, 1)


GREEDY = dict(max_new_tokens=8, min_new_tokens=8, no_repeat_ngram_size=0, repetition_penalty=1.0)


def test_batched_equals_one_at_a_time(model, cases):
    """Left padding + image prefix + KV cache: every row sees what it would see alone."""
    requests, _ = build_requests(cases, "cot", model, 512)
    lengths = {len(r.example.prompt_ids) for r in requests}
    assert len(requests) >= 4 and len(lengths) > 1, "need prompts of different lengths to test left padding"
    dec = DecodingConfig(batch_size=len(requests), **GREEDY)
    batched, batched_scores = generate_token_ids(model, requests, dec, return_scores=True)
    for i, r in enumerate(requests):
        single, single_scores = generate_token_ids(model, [r], dec, return_scores=True)
        assert batched[i].tolist() == single[0].tolist(), f"row {i} differs between batched and single"
        # Logits at every step, not only the argmax (a random tiny LM's argmax is rather flat).
        torch.testing.assert_close(batched_scores[i], single_scores[0], atol=1e-4, rtol=1e-4)
    # The image prefix is really used: zeroing it changes the logits.
    _, zero_scores = generate_token_ids(model, requests, dec, prefix_mode="zero", return_scores=True)
    finite = torch.isfinite(batched_scores)  # min_new_tokens masks EOS with -inf
    assert (zero_scores - batched_scores)[finite].abs().max() > 1e-4


def test_jsonl_resume(model, cases, tmp_path):
    out = tmp_path / "gen.jsonl"
    dec = DecodingConfig(batch_size=3, max_new_tokens=4)
    records, _ = run_generation(model, cases[:4], "summary", dec, out, progress=False)
    assert len(records) == 4 and len(read_jsonl(out)) == 4
    r0 = records[0]
    assert set(r0) >= {"case_id", "element", "model", "task", "prompt", "generation", "reference"}
    assert r0["model"] == "tiny" and r0["task"] == "summary" and r0["reference"]
    # Rerun: nothing new. Then simulate a killed run (2 records + a torn line) and resume.
    run_generation(model, cases[:4], "summary", dec, out, progress=False)
    assert len(read_jsonl(out)) == 4
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])
    out.write_text(out.read_text() + "\n")  # the next append starts on a fresh line
    with open(out, "a") as f:
        f.write("")
    records, _ = run_generation(model, cases[:4], "summary", dec, out, progress=False)
    keys = [(r["case_id"], r["element"]) for r in records]
    assert len(keys) == 4 and len(set(keys)) == 4


def test_pretrained_baseline_has_no_image_and_no_adapter(lm_dir, cases, tmp_path):
    from eval.modeling import load_pretrained_model

    base = load_pretrained_model(str(lm_dir), device="cpu", dtype="fp32")
    assert base.prefix_lm is None and base.num_image_tokens == 0
    assert not any("lora" in n for n, _ in base.lm.named_parameters())
    requests, _ = build_requests(cases[:3], "summary", base, 512)
    for r in requests:
        assert not r.example.uses_image and not r.prompt.uses_image
        assert f"({r.case.cond_name})" in r.prompt.text  # the image type, as text only
    records, _ = run_generation(base, cases[:3], "summary", DecodingConfig(max_new_tokens=4),
                                tmp_path / "pre.jsonl", progress=False)
    assert [r["model"] for r in records] == ["pretrained"] * 3


def test_cli_generate_from_json_and_images_matches_shard_latents(ckpt, lm_dir, synthetic_data, stage1_ckpts,
                                                                 shard_dir, model, tmp_path):
    json_paths, image_root = synthetic_data
    cfg = InputConfig(json_path=[str(p) for p in json_paths], image_root=str(image_root), num_samples=0,
                      elements_per_case=0, stage1_encoder_ckpt=str(stage1_ckpts[0]),
                      stage1_classifier_ckpt=str(stage1_ckpts[1]))
    from_json = {c.key: c for c in load_cases(cfg, model)}
    from_shards = load_shard_cases(shard_dir, SPLIT, model.cond_map)
    for c in from_shards[:10]:
        assert torch.allclose(torch.as_tensor(from_json[c.key].latent), torch.as_tensor(c.latent), atol=2e-2)

    out = tmp_path / "cli.jsonl"
    generate_main(["--checkpoint-dir", str(ckpt), "--base-model-path", str(lm_dir), "--json-path",
                   *map(str, json_paths), "--image-root", str(image_root), "--stage1-encoder-ckpt",
                   str(stage1_ckpts[0]), "--num-samples", "2", "--max-new-tokens", "3", "--output-path", str(out),
                   "--device", "cpu", "--model-name", "cli"])
    recs = read_jsonl(out)
    assert len(recs) == 2 and all(r["model"] == "cli" for r in recs)
    assert json.loads((tmp_path / "cli.config.json").read_text())["decoding"]["max_new_tokens"] == 3


def test_bad_inputs_are_clear_errors(ckpt, lm_dir, shard_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "adapter_config.json").unlink()
    with pytest.raises(Exception, match="adapter"):
        load_checkpoint_model(str(broken), str(lm_dir), device="cpu")

    # An adapter trained for another base model (other hidden size) is refused by name.
    from tiny_models.lm import make_tiny_lm

    other = make_tiny_lm(tmp_path / "other_lm", corpus_texts=["The image is a map."], hidden_size=32)
    with pytest.raises(Exception, match="hidden size"):
        load_checkpoint_model(str(ckpt), str(other), device="cpu")

    swapped = tmp_path / "swapped"
    shutil.copytree(ckpt, swapped)
    cmap = json.loads((swapped / "cond_name_to_id.json").read_text())
    cmap["shr6"], cmap["scp"] = cmap["scp"], cmap["shr6"]
    (swapped / "cond_name_to_id.json").write_text(json.dumps(cmap))
    m = load_checkpoint_model(str(swapped), str(lm_dir), device="cpu")
    with pytest.raises(ValueError, match="disagree"):
        load_cases(InputConfig(shard_dir=str(shard_dir), split=SPLIT), m)


def test_empty_reference_is_a_counted_skip(model, cases):
    import dataclasses

    bad = [dataclasses.replace(cases[0], global_summary="  "), cases[1]]
    requests, skips = build_requests(bad, "summary", model, 512)
    assert len(requests) == 1 and skips["empty_reference"] == 1


def test_target_loss_and_ablation(ckpt, lm_dir, shard_dir, model, cases, tmp_path):
    from eval.ablation import AblationConfig, run_ablation
    from eval.generate import ModelConfig

    true = target_losses(model, cases, "summary", 256)
    zero = target_losses(model, cases, "summary", 256, prefix_mode="zero")
    assert all(l == l and l > 0 for l in true) and true != zero

    cfg = AblationConfig(inputs=InputConfig(shard_dir=str(shard_dir), split=SPLIT, num_samples=4),
                         model_cfg=ModelConfig(checkpoint_dir=str(ckpt), base_model_path=str(lm_dir), device="cpu"),
                         decoding=DecodingConfig(max_new_tokens=4, batch_size=4), out_dir=str(tmp_path / "abl"),
                         num_bootstrap=200)
    cfg.validate()
    result = run_ablation(cfg)
    v = result["variants"]
    assert set(v) == {"true", "shuffled", "zero"}
    assert v["true"]["target_loss"]["n"] == 4 and v["zero"]["target_loss_diff_vs_true"]["n"] == 4
    assert v["shuffled"]["embedding"]["n"] == 4
    assert (tmp_path / "abl" / "ablation.md").exists() and (tmp_path / "abl" / "shuffled.jsonl").exists()


def test_compare_same_cases_for_every_model(ckpt, lm_dir, shard_dir, tmp_path):
    from eval.compare import main as compare_main

    out = tmp_path / "cmp"
    compare_main(["--base-model-path", str(lm_dir), "--shard-dir", str(shard_dir), "--split", SPLIT,
                  "--num-samples", "3", "--max-new-tokens", "3", "--checkpoint", f"uniform={ckpt}",
                  f"other={ckpt}", "--out-dir", str(out), "--device", "cpu"])
    keys = {n: {(r["case_id"], r["element"]) for r in read_jsonl(out / f"{n}.jsonl")}
            for n in ("pretrained", "uniform", "other")}
    assert len(keys["pretrained"]) == 3 and keys["pretrained"] == keys["uniform"] == keys["other"]


def test_local_hf_judge_runs_and_counts_garbage(lm_dir):
    from eval.judge import LocalHFJudge, judge_all

    judge = LocalHFJudge(str(lm_dir), max_new_tokens=4)
    scores, failures = judge_all(judge, ["severe storms"], ["hail in Kansas"], num_threads=1, progress=False)
    # A random tiny LM cannot follow the rubric: its reply is a counted parse failure, not a crash.
    assert (scores == [None] and failures == {"parse": 1}) or (scores[0] is not None and 1 <= scores[0] <= 10)


# ------------------------------------------------------------------------------ Stage1 identity
def test_json_input_with_another_stage1_is_refused(ckpt_with_identity, lm_dir, synthetic_data, stage1_ckpts,
                                                    shard_dir, tmp_path, capsys):
    from common.io import sha256_file
    from data_prep.manifest import load_manifest
    from tiny_models.stage1 import save_tiny_stage1
    from trainer.checkpoint import STAGE1_IDENTITY_FILE

    json_paths, image_root = synthetic_data
    other_encoder, other_classifier = save_tiny_stage1(tmp_path / "other_stage1", seed=1, encoder_pretrain_steps=0)
    trained = load_manifest(shard_dir).stage1
    out = tmp_path / "gen.jsonl"
    args = ["--checkpoint-dir", str(ckpt_with_identity), "--base-model-path", str(lm_dir), "--json-path",
            *map(str, json_paths), "--image-root", str(image_root), "--num-samples", "1", "--max-new-tokens", "1",
            "--output-path", str(out), "--device", "cpu"]
    ident = ckpt_with_identity / STAGE1_IDENTITY_FILE

    with pytest.raises(SystemExit) as exc:
        generate_main([*args, "--stage1-encoder-ckpt", str(other_encoder)])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert (f"stage1_encoder_ckpt (sha256): {ident} has '{trained.encoder_sha256}', {other_encoder} has "
            f"'{sha256_file(other_encoder)}'") in err
    assert "Traceback" not in err and not out.exists()

    with pytest.raises(SystemExit):
        generate_main([*args, "--stage1-encoder-ckpt", str(stage1_ckpts[0]),
                       "--stage1-classifier-ckpt", str(other_classifier)])
    err = capsys.readouterr().err
    assert (f"stage1_classifier_ckpt (sha256): {ident} has '{trained.classifier_sha256}', {other_classifier} has "
            f"'{sha256_file(other_classifier)}'") in err
    assert "stage1_encoder_ckpt" not in err  # the right encoder is not reported

    # An explicit setting that contradicts the checkpoint's would also give other latents.
    with pytest.raises(SystemExit):
        generate_main([*args, "--stage1-encoder-ckpt", str(stage1_ckpts[0]), "--latent-pooling", "cls"])
    assert f"latent_pooling: {ident} has 'mean', this run has 'cls'" in capsys.readouterr().err

    generate_main([*args, "--stage1-encoder-ckpt", str(stage1_ckpts[0]),
                   "--stage1-classifier-ckpt", str(stage1_ckpts[1])])
    assert len(read_jsonl(out)) == 1


def test_shards_of_another_stage1_are_refused(ckpt_with_identity, model, lm_dir, shard_dir, tmp_path, capsys):
    from data_prep.manifest import load_manifest
    from eval.generate import Stage1IdentityError
    from trainer.checkpoint import STAGE1_IDENTITY_FILE

    inputs = InputConfig(shard_dir=str(shard_dir), split=SPLIT, num_samples=2)
    right = load_checkpoint_model(str(ckpt_with_identity), str(lm_dir), device="cpu", dtype="fp32")
    assert len(load_cases(inputs, right)) == 2

    other = tmp_path / "other" / "final"
    shutil.copytree(ckpt_with_identity, other)
    identity = json.loads((other / STAGE1_IDENTITY_FILE).read_text())
    identity["encoder_sha256"] = "0" * 64
    (other / STAGE1_IDENTITY_FILE).write_text(json.dumps(identity))
    wrong = load_checkpoint_model(str(other), str(lm_dir), device="cpu", dtype="fp32")
    with pytest.raises(Stage1IdentityError) as exc:
        load_cases(inputs, wrong)
    shards = load_manifest(shard_dir)
    assert (f"stage1_encoder_ckpt (sha256): {other / STAGE1_IDENTITY_FILE} has '{'0' * 64}', "
            f"{shard_dir / 'manifest.json'} has '{shards.stage1.encoder_sha256}'") in str(exc.value)
    assert "classifier" not in str(exc.value)

    # A checkpoint without the file (written before it existed, the seed's) still works, with a warning.
    capsys.readouterr()
    assert len(load_cases(inputs, model)) == 2
    assert f"warning: {model.source} has no {STAGE1_IDENTITY_FILE}" in capsys.readouterr().err


# --------------------------------------------------------------------------- bad JSON-input elements
@pytest.fixture(scope="module")
def faulty_json(tmp_path_factory):
    """(json paths, image root, bad (case index, element index) -> (field, reason)): 4 cases x 3 elements
    with 3 unreadable images and 1 element without a caption."""
    from data_prep.synthetic import generate

    root = tmp_path_factory.mktemp("faulty_json")
    paths = generate(root, num_cases=4, num_files=1, elements_per_case=3, seed=3)
    cases = json.loads(paths[0].read_text())

    def image(c, e):
        rel = cases[c]["elements"][e]["image_rel_path"]
        return root / rel[rel.index("md_image/"):]

    image(0, 0).unlink()
    image(1, 1).write_bytes(image(1, 1).read_bytes()[:40])
    image(2, 2).write_text("<html>404</html>")
    del cases[3]["elements"][0]["caption"]
    paths[0].write_text(json.dumps(cases))
    bad = {(0, 0): ("image_rel_path", "missing"), (1, 1): ("image_rel_path", "corrupt"),
           (2, 2): ("image_rel_path", "not_an_image"), (3, 0): ("caption", "missing")}
    return [str(p) for p in paths], root, bad


def test_json_input_skips_bad_elements_as_the_shard_builder_does(ckpt_with_identity, lm_dir, faulty_json,
                                                                  stage1_ckpts, tmp_path, capsys):
    from dataclasses import asdict

    from data_prep.build_shards import BuildConfig, build
    from data_prep.gemini import SkipReport, load_gemini_json
    from models.cond_names import default_cond_name_to_id

    json_paths, root, bad = faulty_json
    out = tmp_path / "gen.jsonl"
    generate_main(["--checkpoint-dir", str(ckpt_with_identity), "--base-model-path", str(lm_dir), "--json-path",
                   *json_paths, "--image-root", str(root), "--stage1-encoder-ckpt", str(stage1_ckpts[0]),
                   "--num-samples", "0", "--elements-per-case", "0", "--max-new-tokens", "1",
                   "--output-path", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert (f"[inputs] 8 element(s) used; skipped 0 case(s) and 4 element(s) (corrupt: 1, missing: 2, "
            f"not_an_image: 1); details in {tmp_path / 'gen.skips.json'}") in printed
    report = SkipReport.load(tmp_path / "gen.skips.json")
    assert {(s.case_index, s.element_index): (s.field, s.reason) for s in report} == bad
    gemini, _ = load_gemini_json(json_paths, default_cond_name_to_id())
    usable = {(c.case_id, el.index) for c in gemini for el in c.elements if (c.case_index, el.index) not in bad}
    records = read_jsonl(out)
    assert len(records) == 8 and {(r["case_id"], r["element"]) for r in records} == usable

    # The shard builder reports the same input with the same records.
    build(BuildConfig(gemini_json=json_paths, image_root=str(root), stage1_encoder_ckpt=str(stage1_ckpts[0]),
                      stage1_classifier_ckpt=str(stage1_ckpts[1]), out=str(tmp_path / "shards"),
                      num_workers=0, image_size=32))
    built = SkipReport.load(tmp_path / "shards" / "skip_report.json")
    order = lambda s: (s["file"], s["case_index"], s["element_index"])  # noqa: E731
    assert sorted(map(asdict, report), key=order) == sorted(map(asdict, built), key=order)
    assert report.elements_read == built.elements_read == 12


def test_json_selection_counts_usable_elements_only(faulty_json):
    from data_prep.gemini import load_gemini_json
    from eval.inputs import load_json_inputs
    from models.cond_names import default_cond_name_to_id

    json_paths, root, bad = faulty_json
    cond_map = default_cond_name_to_id()
    cases, report = load_json_inputs(json_paths, cond_map, root, 32, num_samples=3, elements_per_case=1)
    gemini, _ = load_gemini_json(json_paths, cond_map)
    good = {c.case_id: [el for el in c.elements if (c.case_index, el.index) not in bad] for c in gemini}
    # Case 0's first image is missing: its second element stands in, as a shard eval would see it.
    assert [(c.case_id, c.element_index) for c in cases] == [(cid, els[0].index) for cid, els in good.items()][:3]
    assert cases[0].element_index == 1
    # The case's captions (task text_summary) are those of its usable elements, as in cases.jsonl.
    assert all(c.case_captions == [el.caption for el in good[c.case_id]] for c in cases)
    assert len(report) == 3 + 1  # the image skips of the 3 cases looked at, and the JSON's skip


def test_json_input_with_nothing_usable_fails_with_one_message(ckpt_with_identity, lm_dir, faulty_json,
                                                                stage1_ckpts, tmp_path, capsys):
    from data_prep.gemini import SkipReport

    json_paths, _, _ = faulty_json
    wrong_root = tmp_path / "not_the_image_root"
    wrong_root.mkdir()
    with pytest.raises(SystemExit) as exc:
        generate_main(["--checkpoint-dir", str(ckpt_with_identity), "--base-model-path", str(lm_dir),
                       "--json-path", *json_paths, "--image-root", str(wrong_root), "--stage1-encoder-ckpt",
                       str(stage1_ckpts[0]), "--num-samples", "2", "--output-path", str(tmp_path / "gen.jsonl"),
                       "--device", "cpu"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "no usable element in the Gemini JSON" in err and "all 12 element(s) of 4 case(s) skipped" in err
    assert "image_rel_path missing: 11 element(s)" in err and f"--image-root {wrong_root}" in err
    assert f"every skip: {tmp_path / 'gen.skips.json'}" in err and "Traceback" not in err
    assert SkipReport.load(tmp_path / "gen.skips.json").by_reason() == {"missing": 12}
    assert not (tmp_path / "gen.jsonl").exists()


def test_resume_after_a_torn_last_line_keeps_the_file_valid(model, cases, tmp_path, capsys):
    from common.io import read_jsonl_checked

    out = tmp_path / "gen.jsonl"
    dec = DecodingConfig(batch_size=4, max_new_tokens=2)
    run_generation(model, cases[:4], "summary", dec, out, progress=False)
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:15])  # killed mid-line, no newline
    records, _ = run_generation(model, cases[:4], "summary", dec, out, progress=False)
    assert f"{out}: line 3 was an incomplete record" in capsys.readouterr().err
    got = read_jsonl_checked(out)  # every line valid: the new records were not glued to the torn one
    assert got.torn_line is None and len(got.records) == 4
    assert {(r["case_id"], r["element"]) for r in got.records} == {(r["case_id"], r["element"]) for r in records}
