"""The synthetic generator: real layout, clean round trip, texts that follow the images, faults."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from data_prep.gemini import load_gemini_json, resolve_image_path
from data_prep.images import ImageDecodeError, decode_image, load_gif
from data_prep.synthetic import FAULT_KINDS, REGION_WORDS, generate, main
from models.cond_names import COND_NAMES, default_cond_name_to_id

COND_MAP = default_cond_name_to_id()
IMAGE_NAME = re.compile(r"md_image/(\d{4})/([a-z0-9_]+)/md\d{4}_(\d{4})\d{4}_\d{2}_([a-z0-9]+)\.gif$")


def raw_cases(json_paths) -> list[dict]:
    return [c for p in json_paths for c in json.loads(Path(p).read_text())]


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_layout_and_clean_round_trip(synthetic_data):
    json_paths, root = synthetic_data
    assert [p.name for p in json_paths] == ["gemini_element_captions_2014-2019.json",
                                            "gemini_element_captions_2020.json"]
    cases, report = load_gemini_json(json_paths, COND_MAP, strict=True)
    assert len(cases) == 24 and len(report) == 0 and report.notes == []
    assert len({c.case_id for c in cases}) == 24
    years = {c.source_file: set() for c in cases}
    for case in cases:
        assert [e.cond_name for e in case.elements] == list(COND_NAMES)
        for el in case.elements:
            m = IMAGE_NAME.search(el.image_rel_path)
            assert m, el.image_rel_path
            year, folder, date_year, param = m.groups()
            assert year == date_year and param == el.cond_name
            assert folder == {"rgnlrad": "rgnlrad_cropped", "bigsfc": "bigsfc_cropped"}.get(param, param)
            years[case.source_file].add(int(year))
        assert case.case_id == Path(case.elements[0].image_rel_path).stem.rsplit("_", 1)[0]
    assert years[str(json_paths[0])] <= set(range(2014, 2020)) and len(years[str(json_paths[0])]) >= 3
    assert years[str(json_paths[1])] == {2020}
    # Every image decodes (the 2020 file's paths carry a foreign prefix before md_image/).
    for case in cases[::6]:
        for el in case.elements:
            pixels = decode_image(resolve_image_path(root, el.image_rel_path), 32, mean=(0.5,) * 3, std=(0.5,) * 3)
            assert pixels.shape == (3, 32, 32) and -1 <= pixels.min() < pixels.max() <= 1


def test_some_gifs_have_two_frames(synthetic_data):
    json_paths, root = synthetic_data
    two = [e for c in raw_cases(json_paths) for e in c["elements"] if e["synthetic_factors"]["frames"] == 2]
    assert 0 < len(two) < 24 * 20 / 2
    path = resolve_image_path(root, two[0]["image_rel_path"])
    f0, f1 = np.asarray(load_gif(path), dtype=float), np.asarray(load_gif(path, frame=1), dtype=float)
    assert np.abs(f0 - f1).mean() > 1.0  # the blob moved
    with pytest.raises(ImageDecodeError):
        load_gif(path, frame=2)


def blob_stats(path: Path) -> tuple[str, float]:
    """(quadrant of the brightest area, its peak brightness), from the pixels alone."""
    value = np.asarray(load_gif(path), dtype=np.float32).max(axis=2) / 255  # HSV value
    smooth = sum(np.roll(np.roll(value, dy, 0), dx, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
    y, x = np.unravel_index(np.argmax(smooth), smooth.shape)
    h, w = smooth.shape
    return ("N" if y < h / 2 else "S") + ("W" if x < w / 2 else "E"), float(smooth.max())


def test_captions_follow_the_pixels(synthetic_data):
    """What a caption says about region and strength can be read off its image."""
    json_paths, root = synthetic_data
    peaks = {"weak": [], "moderate": [], "strong": []}
    for case in raw_cases(json_paths):
        for el in case["elements"]:
            quadrant, peak = blob_stats(resolve_image_path(root, el["image_rel_path"]))
            s1 = el["caption"].split(". ")[0]
            assert REGION_WORDS[quadrant] in s1, (quadrant, s1)
            strength = el["synthetic_factors"]["strength"]
            assert f"This {strength} signal" in el["caption"]
            peaks[strength].append(peak)
    # Brightness separates the strengths measurably (no overlap between neighbours).
    assert max(peaks["weak"]) < min(peaks["moderate"]) and max(peaks["moderate"]) < min(peaks["strong"])


def test_texts_vary_with_the_factors(synthetic_data):
    json_paths, _ = synthetic_data
    cases = raw_cases(json_paths)
    probability = re.compile(r"Probability of Watch Issuance\.\.\.(\d+) percent")
    for case in cases:
        f, text = case["synthetic_factors"], case["global_summary"]
        assert text.startswith("Areas affected...portions of ")
        assert "Concerning...Severe potential..." in text and "SUMMARY..." in text and "DISCUSSION..." in text
        assert int(probability.search(text).group(1)) == f["probability"]
        assert {"weak": "Watch unlikely", "moderate": "Watch possible", "strong": "Watch likely"}[f["strength"]] in text
        captions = [e["caption"] for e in case["elements"]]
        assert all(len(re.findall(r"[.!?](?:\s|$)", c)) == 4 for c in captions)
        assert len(set(captions)) == len(captions)
    assert len({c["synthetic_factors"]["region"] for c in cases}) == 4
    assert len({c["synthetic_factors"]["strength"] for c in cases}) == 3
    # Realistic, varied lengths: some summaries are longer than 256 tokens of any normal tokenizer.
    words = [len(c["global_summary"].split()) for c in cases]
    assert min(words) < 180 and max(words) > 256
    # Same cond_name, different strength -> different caption words.
    by_strength = {}
    for case in cases:
        el = case["elements"][0]
        by_strength.setdefault(el["synthetic_factors"]["strength"], set()).update(el["caption"].split())
    assert "strong" in by_strength and "weak" in by_strength
    assert by_strength["strong"] ^ by_strength["weak"]


def test_deterministic_given_seed(tmp_path):
    kw = dict(num_cases=4, num_files=2, elements_per_case=5, image_px=24)
    generate(tmp_path / "a", seed=3, **kw)
    generate(tmp_path / "b", seed=3, **kw)
    generate(tmp_path / "c", seed=4, **kw)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_injected_faults_are_reported_where_they_were_put(tmp_path):
    kw = dict(num_cases=6, num_files=2, elements_per_case=4, image_px=24, seed=1)
    clean_paths = generate(tmp_path / "clean", **kw)
    corrupt = {kind: 1 for kind in FAULT_KINDS} | {"missing_image": 2}
    paths = generate(tmp_path / "bad", corrupt=corrupt, **kw)
    injected = json.loads((tmp_path / "bad" / "injected_faults.json").read_text())
    assert sorted(r["kind"] for r in injected) == sorted(k for k, n in corrupt.items() for _ in range(n))
    targets = [(r["file"], r["case_index"], r["element_index"]) for r in injected]
    assert len(set(targets)) == len(targets)

    cases, report = load_gemini_json(paths, COND_MAP)
    json_faults = {(r["file"], r["case_index"], r["element_index"], r["expected_field"], r["expected_reason"])
                   for r in injected if r["kind"] in ("bad_cond_name", "missing_caption", "empty_summary")}
    assert {(s.file, s.case_index, s.element_index, s.field, s.reason) for s in report} == json_faults

    loaded = {(c.source_file, c.case_index, e.index): (c, e) for c in cases for e in c.elements}
    for r in injected:
        if r["kind"] not in ("missing_image", "empty_file", "corrupt_gif", "not_an_image"):
            continue
        case, el = loaded[(r["file"], r["case_index"], r["element_index"])]  # JSON itself is fine
        with pytest.raises(ImageDecodeError) as err:
            load_gif(resolve_image_path(tmp_path / "bad", el.image_rel_path))
        assert err.value.reason == r["expected_reason"]

    # Everything not targeted is identical to the clean generation.
    hit = {(Path(r["file"]).name, r["case_index"]) for r in injected}
    for clean, bad in zip(clean_paths, paths):
        for i, (c, b) in enumerate(zip(json.loads(clean.read_text()), json.loads(bad.read_text()))):
            assert c == b or (clean.name, i) in hit
    broken_images = {r["image_rel_path"] for r in injected if r["image_rel_path"]}
    for gif in (tmp_path / "clean").rglob("*.gif"):
        rel = str(gif.relative_to(tmp_path / "clean"))
        twin = tmp_path / "bad" / rel
        if not any(b.endswith(rel) for b in broken_images):
            assert twin.read_bytes() == gif.read_bytes()

    with pytest.raises(ValueError, match="unknown fault kind"):
        generate(tmp_path / "x", corrupt={"flood": 1}, **kw)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    paths = main(["--out", str(out), "--num-cases", "3", "--num-files", "1", "--seed", "2",
                  "--elements-per-case", "2", "--image-px", "16"])
    printed = capsys.readouterr().out
    assert [p.name for p in paths] == ["gemini_element_captions_2014-2020.json"]
    assert str(out.resolve()) in printed and paths[0].exists()
    cases, report = load_gemini_json(paths, COND_MAP)
    assert len(cases) == 3 and len(report) == 0 and all(len(c.elements) == 2 for c in cases)
    with pytest.raises(ValueError, match="num_files"):
        generate(tmp_path / "y", num_cases=10, num_files=9)
