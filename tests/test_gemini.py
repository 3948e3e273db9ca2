"""Gemini JSON loading: accepted layouts, per-field validation and skips, strict mode, ids, splits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from data_prep.gemini import (
    Case,
    GeminiValidationError,
    Skip,
    SkipReport,
    assign_split,
    case_id_of,
    load_gemini_json,
    resolve_image_path,
)
from models.cond_names import COND_NAMES, default_cond_name_to_id

COND_MAP = default_cond_name_to_id()


def make_element(serial: int = 1, cond: str = "shr6", year: int = 2014, **extra) -> dict:
    return {"image_rel_path": f"data/WeatherQA/md_image/{year}/{cond}/md{serial:04d}_{year}0512_18_{cond}.gif",
            "cond_name": cond, "caption": f"Sentence one about {cond}. Two. Three. Four.", **extra}


def make_case(serial: int = 1, conds=("shr6", "scp", "rgnlrad"), year: int = 2014, **extra) -> dict:
    return {"global_summary": f"Areas affected...portions of OH {serial}. SUMMARY...storms.",
            "elements": [make_element(serial, c, year) for c in conds], **extra}


def write(tmp_path: Path, name: str, obj) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


# ----------------------------------------------------------------------------------------------
# Valid input


def test_loads_several_files_and_layouts_with_extra_fields(tmp_path):
    f1 = write(tmp_path, "a.json", [make_case(1, note="extra case field"),
                                    make_case(2, conds=("fzlv",), year=2015)])
    f1_data = json.loads(f1.read_text())
    f1_data[0]["elements"][0]["gemini_model"] = "extra element field"
    f1.write_text(json.dumps(f1_data))
    f2 = write(tmp_path, "b.json", {"version": 3, "cases": [make_case(3, year=2020)]})
    f3 = write(tmp_path, "c.json", {"data": [make_case(4, year=2020)]})

    cases, report = load_gemini_json([f1, f2, f3], COND_MAP)

    assert len(report) == 0 and report.notes == []
    assert [c.case_id for c in cases] == ["md0001_20140512_18", "md0002_20150512_18",
                                          "md0003_20200512_18", "md0004_20200512_18"]
    assert [(c.source_file, c.case_index) for c in cases] == [(str(f1), 0), (str(f1), 1), (str(f2), 0), (str(f3), 0)]
    first = cases[0]
    assert isinstance(first, Case) and first.split == ""
    assert [(e.index, e.cond_name, e.cond_id) for e in first.elements] == [
        (0, "shr6", COND_MAP["shr6"]), (1, "scp", COND_MAP["scp"]), (2, "rgnlrad", COND_MAP["rgnlrad"])]
    assert first.elements[0].caption.startswith("Sentence one about shr6.")


def test_dict_of_id_to_case(tmp_path):
    path = write(tmp_path, "ids.json", {"MD-17": make_case(17), "MD-18": make_case(18, case_id="explicit")})
    cases, report = load_gemini_json([path], COND_MAP)
    assert len(report) == 0
    assert [c.case_id for c in cases] == ["MD-17", "explicit"]  # an explicit id field wins over the key


def test_whitespace_is_stripped(tmp_path):
    case = make_case(1)
    case["global_summary"] = "  Areas affected...OH  \n"
    case["elements"][0]["caption"] = "\n Caption. "
    cases, _ = load_gemini_json([write(tmp_path, "a.json", [case])], COND_MAP)
    assert cases[0].global_summary == "Areas affected...OH"
    assert cases[0].elements[0].caption == "Caption."


# ----------------------------------------------------------------------------------------------
# Bad elements: skipped with file + case + element + field, or fatal in strict mode

BAD_ELEMENTS = [
    ("missing path", lambda e: e.pop("image_rel_path"), "image_rel_path", "missing"),
    ("empty path", lambda e: e.update(image_rel_path="   "), "image_rel_path", "empty"),
    ("path not a string", lambda e: e.update(image_rel_path=["a.gif"]), "image_rel_path", "wrong_type"),
    ("missing cond_name", lambda e: e.pop("cond_name"), "cond_name", "missing"),
    ("unknown cond_name", lambda e: e.update(cond_name="radar2"), "cond_name", "unknown_cond_name"),
    ("null caption", lambda e: e.update(caption=None), "caption", "missing"),
    ("empty caption", lambda e: e.update(caption=""), "caption", "empty"),
    ("numeric caption", lambda e: e.update(caption=5), "caption", "wrong_type"),
]


@pytest.mark.parametrize("name,mutate,field,reason", BAD_ELEMENTS, ids=[b[0] for b in BAD_ELEMENTS])
def test_bad_element_is_skipped_and_rest_of_case_kept(tmp_path, name, mutate, field, reason):
    cases_in = [make_case(1), make_case(2)]
    mutate(cases_in[1]["elements"][1])
    path = write(tmp_path, "a.json", cases_in)

    cases, report = load_gemini_json([path], COND_MAP)

    assert len(cases) == 2
    assert [e.index for e in cases[1].elements] == [0, 2]  # original indices kept
    assert len(report) == 1
    (skip,) = report.skips
    assert (skip.file, skip.case_index, skip.element_index, skip.field, skip.reason) == (str(path), 1, 1, field, reason)
    assert report.by_field() == {field: 1} and report.by_reason() == {reason: 1}

    with pytest.raises(GeminiValidationError) as err:
        load_gemini_json([path], COND_MAP, strict=True)
    msg = str(err.value)
    assert str(path) in msg and "case 1" in msg and "element 1" in msg and field in msg
    assert err.value.skip.reason == reason


def test_element_not_an_object(tmp_path):
    case = make_case(1)
    case["elements"].append("md0001.gif")
    cases, report = load_gemini_json([write(tmp_path, "a.json", [case])], COND_MAP)
    assert len(cases[0].elements) == 3
    assert [(s.element_index, s.field, s.reason) for s in report] == [(3, "element", "not_an_object")]


BAD_CASES = [
    ("missing summary", lambda c: c.pop("global_summary"), "global_summary", "missing"),
    ("empty summary", lambda c: c.update(global_summary=" \n "), "global_summary", "empty"),
    ("summary not a string", lambda c: c.update(global_summary={"text": "x"}), "global_summary", "wrong_type"),
    ("missing elements", lambda c: c.pop("elements"), "elements", "missing"),
    ("empty elements", lambda c: c.update(elements=[]), "elements", "empty"),
    ("elements not a list", lambda c: c.update(elements={"0": make_element()}), "elements", "wrong_type"),
]


@pytest.mark.parametrize("name,mutate,field,reason", BAD_CASES, ids=[b[0] for b in BAD_CASES])
def test_bad_case_is_skipped(tmp_path, name, mutate, field, reason):
    cases_in = [make_case(1), make_case(2), make_case(3)]
    mutate(cases_in[2])
    path = write(tmp_path, "a.json", cases_in)

    cases, report = load_gemini_json([path], COND_MAP)

    assert [c.case_index for c in cases] == [0, 1]
    (skip,) = report.skips
    assert (skip.file, skip.case_index, skip.element_index, skip.field, skip.reason) == (str(path), 2, None, field, reason)
    assert report.num_cases_skipped() == 1 and report.num_elements_skipped() == 0

    with pytest.raises(GeminiValidationError, match=rf"case 2: field {field!r}"):
        load_gemini_json([path], COND_MAP, strict=True)


def test_case_not_an_object_and_case_with_no_valid_element(tmp_path):
    bad = make_case(2, conds=("shr6", "scp"))
    for el in bad["elements"]:
        el["cond_name"] = "nope"
    path = write(tmp_path, "a.json", [make_case(1), "not a case", bad])
    cases, report = load_gemini_json([path], COND_MAP)
    assert [c.case_index for c in cases] == [0]
    assert [(s.case_index, s.element_index, s.field, s.reason) for s in report] == [
        (1, None, "case", "not_an_object"),
        (2, 0, "cond_name", "unknown_cond_name"),
        (2, 1, "cond_name", "unknown_cond_name"),
        (2, None, "elements", "no_valid_elements"),
    ]


def test_unknown_cond_name_never_gets_an_id(tmp_path):
    partial_map = {name: i for i, name in enumerate(COND_NAMES[:5])}  # a classifier that knows 5 types
    before = dict(partial_map)
    case = make_case(1, conds=(COND_NAMES[0], COND_NAMES[7], "made_up", COND_NAMES[4]))
    cases, report = load_gemini_json([write(tmp_path, "a.json", [case])], partial_map)
    assert partial_map == before  # the mapping is never extended
    assert [(e.cond_name, e.cond_id) for e in cases[0].elements] == [(COND_NAMES[0], 0), (COND_NAMES[4], 4)]
    assert sorted(s.element_index for s in report) == [1, 2]
    assert {s.reason for s in report} == {"unknown_cond_name"}


@pytest.mark.parametrize("content", ["{not json", "", "[1, 2,"])
def test_unparseable_file_is_fatal_and_named(tmp_path, content):
    good = write(tmp_path, "good.json", [make_case(1)])
    bad = tmp_path / "broken.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        load_gemini_json([good, bad], COND_MAP)


def test_wrong_top_level_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"top.json: expected a list of cases"):
        load_gemini_json([write(tmp_path, "top.json", "a string")], COND_MAP)
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_gemini_json([tmp_path / "nowhere.json"], COND_MAP)
    good = write(tmp_path, "good.json", [make_case(1)])
    with pytest.raises(ValueError, match="more than once"):
        load_gemini_json([good, str(good)], COND_MAP)


# ----------------------------------------------------------------------------------------------
# Case ids


def test_case_id_rules():
    assert case_id_of({"case_id": "abc", "id": "x"}, "f.json", 0) == "abc"
    assert case_id_of({"id": 42}, "f.json", 0) == "42"
    assert case_id_of({"md_id": "md1234_2016"}, "f.json", 0) == "md1234_2016"
    # A bare MD number restarts every year: the year comes from the first image name.
    assert case_id_of({"md_number": 57, **make_case(57, year=2016)}, "f.json", 0) == "md0057_2016"
    assert case_id_of({"md_number": "57", **make_case(57, year=2017)}, "f.json", 0) == "md0057_2017"
    # From the first (valid) image name; the date keeps the same serial apart across years.
    assert case_id_of(make_case(5, year=2014), "f.json", 0) == "md0005_20140512_18"
    assert case_id_of(make_case(5, year=2019), "f.json", 0) == "md0005_20190512_18"
    no_hour = {"global_summary": "x", "elements": [{"image_rel_path": "md_image/2014/shr6/MD0007_20140512_shr6.gif"}]}
    assert case_id_of(no_hour, "f.json", 0) == "md0007_20140512"
    # From the summary (whitespace-insensitive), else the file and position.
    odd = {"global_summary": "Areas affected...OH", "elements": [{"image_rel_path": "img_001.gif"}]}
    same = {"global_summary": "Areas  affected...OH\n", "elements": []}
    assert case_id_of(odd, "a.json", 0) == case_id_of(same, "b.json", 9)
    assert case_id_of(odd, "a.json", 0).startswith("case_")
    assert case_id_of({"elements": "bad"}, "dir/file.json", 3) == "file_000003"


def test_duplicate_ids_are_made_unique_deterministically(tmp_path):
    f1 = write(tmp_path, "a.json", [make_case(1), make_case(1)])
    f2 = write(tmp_path, "b.json", [make_case(1)])
    cases, report = load_gemini_json([f1, f2], COND_MAP)
    ids = [c.case_id for c in cases]
    assert ids == ["md0001_20140512_18", "md0001_20140512_18__dup1", "md0001_20140512_18__dup2"]
    assert len(report) == 0 and len(report.notes) == 2
    assert "b.json, case 0" in report.notes[1] and "__dup2" in report.notes[1]
    cases_again, _ = load_gemini_json([f1, f2], COND_MAP)
    assert [c.case_id for c in cases_again] == ids


# ----------------------------------------------------------------------------------------------
# Splits


def test_split_is_deterministic_by_case_and_near_the_fraction():
    ids = [f"md{i:04d}_2015{i % 12 + 1:02d}01_18" for i in range(2000)]
    splits = [assign_split(i, 0.1, seed=0) for i in ids]
    assert splits == [assign_split(i, 0.1, seed=0) for i in ids]  # reproducible
    assert set(splits) == {"train", "val"}
    assert 0.07 < splits.count("val") / len(ids) < 0.13
    assert splits != [assign_split(i, 0.1, seed=1) for i in ids]  # the seed matters
    assert {assign_split(i, 0.0) for i in ids} == {"train"}
    assert {assign_split(i, 1.0) for i in ids} == {"val"}
    # Growing the val fraction only moves cases train -> val (no reshuffle).
    small = {i for i in ids if assign_split(i, 0.1) == "val"}
    large = {i for i in ids if assign_split(i, 0.3) == "val"}
    assert small < large
    with pytest.raises(ValueError, match="val_fraction"):
        assign_split("x", 1.5)


# ----------------------------------------------------------------------------------------------
# Image paths


def test_resolve_image_path(tmp_path):
    root = tmp_path / "WeatherQA"
    expect = root / "md_image/2014/shr6/a.gif"
    assert resolve_image_path(root, "md_image/2014/shr6/a.gif") == expect
    assert resolve_image_path(root, "kse/ClimateToText/data/WeatherQA/md_image/2014/shr6/a.gif") == expect
    assert resolve_image_path(root, "/home/agi592/WeatherQA/md_image/2014/shr6/a.gif") == expect
    assert resolve_image_path(root, "C:\\data\\md_image\\2014\\shr6\\a.gif") == expect
    assert resolve_image_path(root / "md_image", "x/md_image/2014/shr6/a.gif") == expect  # root given as md_image
    assert resolve_image_path(root, "other/2014/a.gif") == root / "other/2014/a.gif"
    assert resolve_image_path(root, "/abs/elsewhere/a.gif") == Path("/abs/elsewhere/a.gif")


# ----------------------------------------------------------------------------------------------
# The skip report


def test_skip_report_counts_merge_and_save(tmp_path):
    a = SkipReport()
    a.add(Skip("f.json", 1, 2, "caption", "missing"))
    a.add(Skip("f.json", 3, None, "global_summary", "empty"))
    b = SkipReport()
    b.add(Skip("f.json", 4, 0, "image", "corrupt", path="md_image/x.gif", detail="truncated"))
    b.note("renamed a duplicate")
    merged = copy.deepcopy(a).merge(b)
    assert len(merged) == 3 and merged.notes == ["renamed a duplicate"]
    assert merged.by_reason() == {"corrupt": 1, "empty": 1, "missing": 1}
    assert merged.summary()["cases_skipped"] == 1 and merged.summary()["elements_skipped"] == 2

    out = tmp_path / "reports" / "skips.json"
    merged.save(out)
    on_disk = json.loads(out.read_text())
    assert on_disk["num_skipped"] == 3 and on_disk["by_field"] == {"caption": 1, "global_summary": 1, "image": 1}
    assert on_disk["skipped"][2]["path"] == "md_image/x.gif"
    assert SkipReport.load(out).to_dict() == merged.to_dict()
    assert "f.json, case 4, element 0: field 'image': corrupt (md_image/x.gif): truncated" == b.skips[0].message()


def test_report_counts_what_was_read_and_ranks_reasons(tmp_path):
    no_summary = make_case(2)
    no_summary["global_summary"] = ""
    two_bad = make_case(3)
    two_bad["elements"][0]["caption"] = ""
    two_bad["elements"][2]["caption"] = ""
    path = write(tmp_path, "a.json", [make_case(1), no_summary, "not a case", two_bad, {"global_summary": "x"}])
    cases, report = load_gemini_json([path], COND_MAP)
    # every case read, valid or not; a case without an elements list counts as one element
    assert (report.cases_read, report.elements_read) == (5, 3 + 3 + 1 + 3 + 1)
    assert report.summary()["elements_read"] == 11 and report.summary()["cases_read"] == 5
    top = report.top_reasons(2)
    assert [(f, r, is_case, n) for f, r, is_case, n, _ in top] == [("caption", "empty", False, 2),
                                                                  ("global_summary", "empty", True, 1)]
    assert (top[0][4].case_index, top[0][4].element_index) == (3, 0)  # the first of its group, as an example

    merged = copy.deepcopy(report).merge(report)
    assert (merged.cases_read, merged.elements_read) == (10, 22)
    report.save(tmp_path / "skips.json")
    assert SkipReport.load(tmp_path / "skips.json").to_dict() == report.to_dict()
