"""data_prep.build_shards on generated data with every kind of bad input, and tiny real Stage1 models.

What must hold: every valid element lands in exactly one shard of its case's split, with Stage1
outputs equal to running Stage1 directly; every bad input is a counted skip naming its path and
reason; the build is byte-reproducible across node layouts, reruns, repairs and a SIGKILL resume;
a build that keeps (nearly) nothing, or whose case ids collide as sample keys, fails with one message.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from common.io import read_jsonl, sha256_file
from data_prep.build_shards import BUILD_DIR, BuildConfig, BuildError, InputError, build, main, make_plan
from data_prep.gemini import assign_split, load_gemini_json, resolve_image_path
from data_prep.images import decode_image
from data_prep.manifest import ManifestMismatch, check_stage1_compatible, load_manifest
from data_prep.shard_format import decode_sample
from data_prep.synthetic import FAULT_KINDS, generate
from models.cond_names import default_cond_name_to_id
from models.stage1 import Stage1Settings, load_stage1_classifier, load_stage1_encoder

SAMPLES_PER_SHARD = 16
BATCH_SIZE = 6  # does not divide the shard size: partial Stage1 batches are exercised
VAL_FRACTION = 0.3
FP16_TOL = dict(rtol=2e-2, atol=2e-3)


# ----------------------------------------------------------------------------------------------
# helpers


def read_samples(path):
    import webdataset as wds

    return [decode_sample(raw) for raw in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)]


def dir_content(out: Path) -> dict[str, bytes]:
    """Every file of the shard directory (not the .build bookkeeping), leftover temp files included."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def is_image_fault(fault: dict) -> bool:
    return fault["expected_field"] in ("image", "image_rel_path")


def make_data(root: Path) -> tuple[list[Path], Path]:
    """12 cases x 10 images, one fault of every kind injected."""
    paths = generate(root, num_cases=12, num_files=2, seed=1, elements_per_case=10,
                     corrupt={kind: 1 for kind in FAULT_KINDS})
    return paths, root


def make_cfg(data, ckpts, out, **overrides) -> BuildConfig:
    json_paths, image_root = data
    kw = dict(gemini_json=[str(p) for p in json_paths], image_root=str(image_root),
              stage1_encoder_ckpt=str(ckpts[0]), stage1_classifier_ckpt=str(ckpts[1]), out=str(out),
              samples_per_shard=SAMPLES_PER_SHARD, batch_size=BATCH_SIZE, num_workers=0,
              stage1_trainable_blocks=0, image_size=32, val_fraction=VAL_FRACTION)
    kw.update(overrides)
    return BuildConfig(**kw)


@pytest.fixture(scope="module")
def faulty_data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("faulty_data"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, faulty_data, stage1_ckpts):
    """(shard dir, manifest) of a clean single-process build of `faulty_data`."""
    out = tmp_path_factory.mktemp("reference")
    manifest = build(make_cfg(faulty_data, stage1_ckpts, out))
    assert manifest is not None
    return out, manifest


# ----------------------------------------------------------------------------------------------
# content


def test_every_valid_element_once_in_its_cases_split(reference, faulty_data):
    out, manifest = reference
    json_paths, image_root = faulty_data
    faults = json.loads((image_root / "injected_faults.json").read_text())
    bad_images = {(f["file"], f["case_index"], f["element_index"]) for f in faults if is_image_fault(f)}
    cases, _ = load_gemini_json([str(p) for p in json_paths], default_cond_name_to_id())
    expected = {(c.case_id, el.index): c for c in cases for el in c.elements
                if (c.source_file, c.case_index, el.index) not in bad_images}

    seen, split_of_case = Counter(), {}
    for entry in manifest.shards:
        samples = read_samples(out / entry.name)
        assert len(samples) == entry.num_samples
        for s in samples:
            seen[(s.case_id, s.element_index)] += 1
            assert s.split == entry.split == assign_split(s.case_id, VAL_FRACTION, 0)
            assert split_of_case.setdefault(s.case_id, s.split) == s.split  # no case in two splits
            case = expected[(s.case_id, s.element_index)]
            el = next(e for e in case.elements if e.index == s.element_index)
            assert (s.caption, s.cond_name, s.cond_id, s.global_summary) == \
                (el.caption, el.cond_name, el.cond_id, case.global_summary)
            assert s.latent.dtype == np.float16 and s.block_tokens is None and s.image_bytes is None
    assert set(seen) == set(expected) and set(seen.values()) == {1}
    assert {"train", "val"} <= set(split_of_case.values())
    for split in ("train", "val"):
        n = sum(1 for s in split_of_case.values() if s == split)
        assert manifest.split_counts[split]["num_cases"] == n
        assert manifest.num_samples(split) == sum(1 for (cid, _) in seen if split_of_case[cid] == split)

    # task D's cases.jsonl: one line per case with its kept captions in element order
    lines = {r["case_id"]: r for r in read_jsonl(out / manifest.cases_file)}
    assert set(lines) == set(split_of_case)
    for cid, record in lines.items():
        kept = sorted(i for (c, i) in seen if c == cid)
        assert record["element_indices"] == kept and record["split"] == split_of_case[cid]
        case = next(c for c in cases if c.case_id == cid)
        assert record["captions"] == [e.caption for e in case.elements if e.index in kept]


def test_every_bad_input_is_a_counted_skip_with_path_and_reason(reference, faulty_data):
    out, manifest = reference
    faults = json.loads((faulty_data[1] / "injected_faults.json").read_text())
    report = json.loads((out / manifest.skip_report_file).read_text())
    skips = report["skipped"]
    assert len(skips) == len(faults) == manifest.skip_summary["num_skipped"]
    for f in faults:
        field = "image_rel_path" if is_image_fault(f) else f["expected_field"]
        match = [s for s in skips if (s["file"], s["case_index"], s["element_index"], s["field"]) ==
                 (f["file"], f["case_index"], f["element_index"], field)]
        assert len(match) == 1, (f, skips)
        assert match[0]["reason"] == f["expected_reason"]
        if is_image_fault(f):
            assert Path(match[0]["path"]).name == Path(f["image_rel_path"]).name
    assert manifest.skip_summary["by_reason"] == dict(Counter(s["reason"] for s in skips))


def test_latents_and_logits_equal_stage1_run_directly(reference, faulty_data, stage1_ckpts):
    out, manifest = reference
    encoder = load_stage1_encoder(stage1_ckpts[0], "mean").eval()
    classifier = load_stage1_classifier(stage1_ckpts[1]).eval()
    samples = [s for e in manifest.shards for s in read_samples(out / e.name)]
    pixels = torch.from_numpy(np.stack([
        decode_image(resolve_image_path(faulty_data[1], s.image_rel_path), 32) for s in samples]))
    with torch.inference_mode():
        latent = torch.cat([encoder.encode(p[None])[0] for p in pixels]).numpy()  # one image at a time
        logits = torch.cat([classifier(p[None]) for p in pixels]).numpy()
    np.testing.assert_allclose(np.stack([s.latent for s in samples]).astype(np.float32), latent, **FP16_TOL)
    np.testing.assert_allclose(np.stack([s.cls_logits for s in samples]).astype(np.float32), logits, **FP16_TOL)
    assert [s.pred_cond_id for s in samples] == [int(np.argmax(s.cls_logits)) for s in samples]
    assert manifest.stage1.latent_dim == latent.shape[1] and manifest.stage1.num_tokens == 0
    assert manifest.stage1.encoder_sha256 == sha256_file(stage1_ckpts[0])


def test_block_tokens_give_the_latent_through_the_encoder_tail(shard_dir_k1, stage1_ckpts):
    manifest = load_manifest(shard_dir_k1)
    assert manifest.stage1.trainable_blocks == 1
    samples = read_samples(manifest.shard_paths("train")[0])
    tokens = torch.from_numpy(np.stack([s.block_tokens for s in samples]).astype(np.float32))
    assert tokens.shape[1:] == (manifest.stage1.num_tokens, manifest.stage1.latent_dim)
    tail = load_stage1_encoder(stage1_ckpts[0], "mean").tail(1).eval()
    with torch.no_grad():
        through_tail = tail(tokens).numpy()
    np.testing.assert_allclose(np.stack([s.latent for s in samples]).astype(np.float32), through_tail,
                               rtol=5e-2, atol=5e-3)  # fp16 tokens in, fp16 latent out


def test_manifest_refuses_other_stage1_settings(reference, stage1_ckpts):
    out, _ = reference
    manifest = load_manifest(out)
    settings = Stage1Settings(str(stage1_ckpts[0]), str(stage1_ckpts[1]), image_size=32)
    check_stage1_compatible(manifest, settings, sha256_file(stage1_ckpts[0]), sha256_file(stage1_ckpts[1]))
    with pytest.raises(ManifestMismatch, match="stage1_trainable_blocks"):
        check_stage1_compatible(manifest, Stage1Settings(image_size=32, stage1_trainable_blocks=1))


def test_strict_stops_at_the_first_problem(tmp_path, faulty_data, stage1_ckpts):
    with pytest.raises(ValueError, match="gemini_element_captions"):
        build(make_cfg(faulty_data, stage1_ckpts, tmp_path / "out", strict=True))


# ----------------------------------------------------------------------------------------------
# builds that must fail: nearly nothing kept, colliding sample keys


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """4 clean cases x 3 images in one JSON file: 12 elements."""
    root = tmp_path_factory.mktemp("small_data")
    return generate(root, num_cases=4, num_files=1, seed=3, elements_per_case=3), root


def cli_args(cfg: BuildConfig) -> list[str]:
    return ["--gemini-json", *cfg.gemini_json, "--image-root", cfg.image_root,
            "--stage1-encoder-ckpt", cfg.stage1.stage1_encoder_ckpt,
            "--stage1-classifier-ckpt", cfg.stage1.stage1_classifier_ckpt, "--out", cfg.out,
            "--image-size", "32", "--samples-per-shard", str(SAMPLES_PER_SHARD), "--batch-size", str(BATCH_SIZE),
            "--num-workers", "0", "--val-fraction", str(VAL_FRACTION), "--gif-frame", str(cfg.stage1.gif_frame)]


def failing_cli(cfg: BuildConfig, capsys, monkeypatch) -> str:
    """Run the CLI in-process; it must exit 1 with one message (no exception escapes): its stderr."""
    # main() sets up logging on this test's captured stderr: undo it afterwards.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setattr(root, "_stage2_configured", False, raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(cli_args(cfg))
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "[build_shards] error: " in err and "Traceback" not in err, err
    return err


def test_wrong_image_root_fails_loudly_keeps_the_report_and_a_fixed_rerun_builds(tmp_path, small_data,
                                                                               stage1_ckpts, capsys, monkeypatch):
    out, wrong_root = tmp_path / "out", tmp_path / "not_the_image_root"
    err = failing_cli(make_cfg(small_data, stage1_ckpts, out, image_root=str(wrong_root)), capsys, monkeypatch)
    assert "0 of 12 input element(s)" in err and "12 skipped" in err and str(small_data[0][0]) in err
    assert "image_rel_path missing: 12 element(s)" in err and str(wrong_root / "md_image") in err  # an example
    assert "--max-skipped-fraction" in err
    assert not (out / "manifest.json").exists()
    report = json.loads((out / "skip_report.json").read_text())
    assert report["num_skipped"] == 12 and {s["reason"] for s in report["skipped"]} == {"missing"}
    assert list(out.glob("*.tar"))  # the shards written stay

    # The image root is not part of the plan: the shards whose images now resolve elsewhere are redone.
    manifest = build(make_cfg(small_data, stage1_ckpts, out))
    assert sum(e.num_samples for e in manifest.shards) == 12 and manifest.skip_summary["num_skipped"] == 0
    assert json.loads((out / "skip_report.json").read_text())["num_skipped"] == 0


def test_gif_frame_beyond_every_image_fails_unless_allowed(tmp_path, small_data, stage1_ckpts):
    out = tmp_path / "out"
    with pytest.raises(BuildError, match="(?s)0 of 12 input.*image_rel_path bad_frame: 12 .*--gif-frame 7"):
        build(make_cfg(small_data, stage1_ckpts, out, gif_frame=7))
    assert not (out / "manifest.json").exists() and (out / "skip_report.json").exists()
    before = _mtimes(out)
    # 1.0 accepts even an empty build; the flag does not change the plan, so the shards are kept.
    manifest = build(make_cfg(small_data, stage1_ckpts, out, gif_frame=7, max_skipped_fraction=1.0))
    assert manifest.num_samples("train") + manifest.num_samples("val") == 0
    assert _mtimes(out) == before and "max_skipped_fraction" not in manifest.builder


def test_json_without_a_valid_case_fails_before_stage1_runs(tmp_path, small_data, stage1_ckpts, capsys,
                                                           monkeypatch):
    raw = json.loads(small_data[0][0].read_text())
    for case in raw:
        case["global_summary"] = " "
    bad_json = tmp_path / "all_invalid.json"
    bad_json.write_text(json.dumps(raw))
    monkeypatch.setattr("data_prep.build_shards.Stage1Runner", None)  # calling it would escape main()
    out = tmp_path / "out"
    err = failing_cli(make_cfg(([bad_json], small_data[1]), stage1_ckpts, out), capsys, monkeypatch)
    assert "before decoding any image" in err and "0 of 12 input element(s) (from 4 case(s))" in err
    assert str(bad_json) in err and "global_summary empty: 4 case(s)" in err and "case 0: field 'global_summary'" in err
    assert json.loads((out / "skip_report.json").read_text())["cases_skipped"] == 4
    assert not list(out.glob("*.tar")) and not (out / "manifest.json").exists()

    empty_json = tmp_path / "empty.json"
    empty_json.write_text("[]")
    with pytest.raises(BuildError, match="holds no case"):
        build(make_cfg(([empty_json], small_data[1]), stage1_ckpts, tmp_path / "out_empty"))


def test_more_than_the_allowed_fraction_skipped_fails_without_touching_the_shards(tmp_path, reference,
                                                                                  faulty_data, stage1_ckpts):
    ref_out, ref_manifest = reference
    out = tmp_path / "copy"
    shutil.copytree(ref_out, out)
    before = _mtimes(out)
    kept = sum(e.num_samples for e in ref_manifest.shards)
    skipped = 120 - kept  # 12 cases x 10 elements; one fault of each kind, one of them a whole case
    assert ref_manifest.skip_summary["elements_read"] == 120 and 0.1 < skipped / 120 < 0.2
    with pytest.raises(BuildError, match=rf"{kept} of 120 input element\(s\) .*kept, {skipped} skipped .*"
                                         r"> --max-skipped-fraction 0.1\)"):
        build(make_cfg(faulty_data, stage1_ckpts, out, max_skipped_fraction=0.1))
    assert not (out / "manifest.json").exists() and _mtimes(out) == before
    build(make_cfg(faulty_data, stage1_ckpts, out, max_skipped_fraction=0.2))
    assert dir_content(out) == dir_content(ref_out)  # the same manifest: the threshold is not recorded


def test_a_node_without_shards_is_not_a_failure(tmp_path, small_data, stage1_ckpts):
    out = tmp_path / "out"
    cfg = make_cfg(small_data, stage1_ckpts, out)
    cases, _ = load_gemini_json(cfg.gemini_json, default_cond_name_to_id())
    for c in cases:
        c.split = assign_split(c.case_id, VAL_FRACTION, 0)
    num_nodes = len(make_plan(cases, SAMPLES_PER_SHARD)) + 1  # the last node has no shard
    idle = make_cfg(small_data, stage1_ckpts, out, num_nodes=num_nodes, node_rank=num_nodes - 1)
    assert build(idle) is None  # the others have not built yet: not a failure either
    for rank in range(num_nodes - 1):
        manifest = build(make_cfg(small_data, stage1_ckpts, out, num_nodes=num_nodes, node_rank=rank))
    assert manifest is not None and sum(e.num_samples for e in manifest.shards) == 12
    assert build(idle) == manifest  # finishing last with no shard of its own: finalizes, passes


def test_case_ids_that_collide_as_sample_keys_fail_before_anything_is_written(tmp_path, small_data, stage1_ckpts,
                                                                             capsys, monkeypatch):
    raw = json.loads(small_data[0][0].read_text())
    raw[1]["case_id"] = "2018.md0101"
    first = tmp_path / "a.json"
    first.write_text(json.dumps(raw[:2]))
    raw[3]["case_id"] = "2018_md0101"
    second = tmp_path / "b.json"
    second.write_text(json.dumps(raw[2:]))
    out = tmp_path / "out"
    cfg = make_cfg(([first, second], small_data[1]), stage1_ckpts, out)
    err = failing_cli(cfg, capsys, monkeypatch)
    assert "case id '2018.md0101' (" + str(first) + ", case 1)" in err
    assert "case id '2018_md0101' (" + str(second) + ", case 1)" in err and "'2018_md0101__e00'" in err
    assert not list(out.glob("*.tar")) and not list((out / BUILD_DIR).glob("*.tar.json"))
    with pytest.raises(InputError, match="collide as sample keys"):
        build(cfg)


# ----------------------------------------------------------------------------------------------
# reproducibility: reruns, repairs, node layouts


def _mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in [*out.glob("*.tar"), *(out / BUILD_DIR).glob("*.tar.json")]}


def test_rerun_is_a_no_op_and_a_broken_shard_is_rebuilt(tmp_path, reference, faulty_data, stage1_ckpts):
    ref_out, _ = reference
    out = tmp_path / "copy"
    shutil.copytree(ref_out, out)
    before = _mtimes(out)
    build(make_cfg(faulty_data, stage1_ckpts, out))
    assert _mtimes(out) == before and dir_content(out) == dir_content(ref_out)

    truncated, flipped = out / "train-000001.tar", out / "train-000002.tar"
    truncated.write_bytes(truncated.read_bytes()[:5000])
    data = bytearray(flipped.read_bytes())
    data[700] ^= 0xFF  # same size, other bytes: only the sha256 check sees it
    flipped.write_bytes(bytes(data))
    build(make_cfg(faulty_data, stage1_ckpts, out))
    after = _mtimes(out)
    assert {n for n in after if after[n] != before[n]} == {
        "train-000001.tar", "train-000002.tar", "train-000001.tar.json", "train-000002.tar.json"}
    assert dir_content(out) == dir_content(ref_out)


def test_two_nodes_build_the_same_bytes_as_one(tmp_path, reference, faulty_data, stage1_ckpts):
    ref_out, ref_manifest = reference
    out = tmp_path / "two_nodes"
    # node 0 decodes in worker processes, node 1 in-process: the bytes must not depend on it either
    assert build(make_cfg(faulty_data, stage1_ckpts, out, num_nodes=2, node_rank=0, num_workers=2)) is None
    assert not (out / "manifest.json").exists()
    with pytest.raises(RuntimeError, match="train-000001.tar"):
        build(make_cfg(faulty_data, stage1_ckpts, out, finalize_only=True))
    manifest = build(make_cfg(faulty_data, stage1_ckpts, out, num_nodes=2, node_rank=1))
    assert manifest == ref_manifest
    assert dir_content(out) == dir_content(ref_out)


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_clean_build(tmp_path, stage1_ckpts):
    """Kill a CLI build (SIGKILL) while it is blocked mid-shard, rerun, compare with a clean build.

    The build is made to stop at a known point without any test hook in the builder: one image of
    the third shard is replaced by a FIFO, whose read blocks until the test kills the process.
    """
    data = make_data(tmp_path / "data")
    cfg = make_cfg(data, stage1_ckpts, tmp_path / "resumed")
    cases, _ = load_gemini_json(cfg.gemini_json, default_cond_name_to_id())
    for c in cases:
        c.split = assign_split(c.case_id, VAL_FRACTION, 0)
    plan = make_plan(cases, SAMPLES_PER_SHARD)
    victim = plan[2].batches(BATCH_SIZE)[1]
    image = next(p for p in (resolve_image_path(data[1], el.image_rel_path) for _, el in victim)
                 if p.exists() and p.stat().st_size > 0 and p.read_bytes().startswith(b"GIF"))
    original = image.read_bytes()
    image.unlink()
    os.mkfifo(image)

    args = [sys.executable, "-m", "data_prep.build_shards", "--gemini-json", *cfg.gemini_json,
            "--image-root", cfg.image_root, "--stage1-encoder-ckpt", str(stage1_ckpts[0]),
            "--stage1-classifier-ckpt", str(stage1_ckpts[1]), "--out", cfg.out, "--image-size", "32",
            "--samples-per-shard", str(SAMPLES_PER_SHARD), "--batch-size", str(BATCH_SIZE),
            "--num-workers", "0", "--val-fraction", str(VAL_FRACTION)]
    out = Path(cfg.out)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (list(out.glob(f".{plan[2].name}.*.tmp")) and (out / BUILD_DIR / f"{plan[1].name}.json").exists()):
            assert proc.poll() is None, f"the build ended before it was killed:\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "the build did not reach the blocked shard"
            time.sleep(0.1)
        time.sleep(0.3)  # let it settle on the blocking read
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists() and not (out / plan[2].name).exists()
    image.unlink()
    image.write_bytes(original)

    assert subprocess.run(args, capture_output=True, timeout=300).returncode == 0
    clean = tmp_path / "clean"
    build(make_cfg(data, stage1_ckpts, clean))
    assert dir_content(out) == dir_content(clean)
