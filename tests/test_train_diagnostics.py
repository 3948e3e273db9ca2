"""trainer.train: warnings from the per-rank times of a log window."""

from __future__ import annotations

import logging

from trainer.metrics import RankTimeWarnings, diagnose_rank_times


def window(data, fwd_bwd, step=None, other=None):
    n = len(data)
    return {"data": data, "fwd_bwd": fwd_bwd, "step": step or [10.0] * n, "other": other or [1.0] * n}


def test_healthy_window_gives_no_warning():
    assert diagnose_rank_times(window([0.3, 0.4], [250.0, 262.0])) == {}
    assert diagnose_rank_times(window([0.3], [250.0])) == {}  # one rank: nothing to compare with


def test_a_data_bound_rank_is_named():
    warnings = diagnose_rank_times(window([2.0, 80.0], [250.0, 250.0], step=[90.0, 12.0]))
    assert list(warnings) == ["data"]
    assert warnings["data"].startswith("rank 1 waits 80 of") and "--num-workers" in warnings["data"]
    assert diagnose_rank_times(window([20.0], [250.0]), data_share=0.1) == {}  # 20 of 281 ms: under 10%


def test_a_slow_rank_is_named_against_the_others():
    times = window([0.3, 0.3, 0.3, 0.3], [250.0, 252.0, 310.0, 248.0], step=[70.0, 68.0, 10.0, 72.0])
    warnings = diagnose_rank_times(times)
    assert list(warnings) == ["straggler"]
    assert warnings["straggler"].startswith("rank 2 takes 310 ms") and "the others 250" in warnings["straggler"]
    assert diagnose_rank_times(times, slow_share=0.3) == {}


def test_each_kind_is_logged_at_most_once_per_interval(caplog):
    data_bound = window([80.0], [250.0])
    warn = RankTimeWarnings(enabled=True, every=3)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        for step in range(1, 8):
            warn.check(step * 10, data_bound)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["step 10", "step 40", "step 70"]
    caplog.clear()
    quiet = RankTimeWarnings(enabled=False)  # ranks other than 0
    with caplog.at_level(logging.WARNING, logger="trainer"):
        quiet.check(10, data_bound)
    assert not caplog.records
