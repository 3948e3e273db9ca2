"""LLM judge against a real local HTTP server speaking /v1/chat/completions, failures included."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from common.io import read_jsonl_checked
from eval.judge import JudgeCache, JudgeResult, JudgeUnreachable, OpenAIJudge, judge_all, parse_judge_reply


class FakeJudgeServer:
    """Replies per candidate text: 'ok:N' -> score N, 'slow' -> sleeps past the timeout once,
    'flaky' -> 429 the first time then a score, 'garbage' -> unparsable text, '500' -> always 500,
    'echo:<code>' -> the request headers echoed back (HTTP <code>; with 200 inside the judge's reason)."""

    def __init__(self):
        self.calls: list[dict] = []
        self.seen: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.calls.append({"body": body, "auth": self.headers.get("Authorization")})
                cand = body["messages"][-1]["content"].split("CANDIDATE:\n", 1)[1]
                n = server.seen[cand] = server.seen.get(cand, 0) + 1
                if cand == "slow" and n == 1:
                    time.sleep(1.0)
                if cand == "flaky" and n == 1:
                    return self._send(429, {"error": "rate limited"})
                if cand == "500":
                    return self._send(500, {"error": "boom"})
                if cand.startswith("echo:"):  # a careless server: the request headers in the reply
                    headers = dict(self.headers.items())
                    code = int(cand[5:])
                    if code != 200:
                        return self._send(code, {"error": f"invalid key {headers.get('Authorization')}",
                                                 "request_headers": headers})
                    content = json.dumps({"score": 5, "reason": f"got Authorization: {headers.get('Authorization')}"})
                    return self._send(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})
                if cand == "garbage":
                    content = "I cannot decide, sorry."
                elif cand.startswith("ok:"):
                    content = json.dumps({"score": int(cand[3:]), "reason": "fine"})
                else:
                    content = "Score: 7\nmostly right"
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeJudgeServer()
    yield s
    s.close()


@pytest.mark.parametrize("text,score", [
    ('{"score": 8, "reason": "good"}', 8.0),
    ('```json\n{"score": 3, "reason": "weak"}\n```', 3.0),
    ("Score: 7\nmostly right", 7.0),
    ("6", 6.0),
    ("I rate it 9/10.", 9.0),
    ("no idea", None),
    ('{"score": 42}', None),
    ("", None),
])
def test_parse_judge_reply(text, score):
    assert parse_judge_reply(text)[0] == score


def test_judge_scores_retries_and_failures(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret")
    cache = JudgeCache(tmp_path / "cache.jsonl")
    judge = OpenAIJudge(server.url, "judge-x", api_key_env="MY_JUDGE_KEY", timeout_s=0.3,
                        max_retries=2, backoff_s=0.01, cache=cache)
    cands = ["ok:9", "plain", "flaky", "slow", "garbage", "500"]
    scores, failures = judge_all(judge, ["ref"] * len(cands), cands, num_threads=3, progress=False)
    assert scores == [9.0, 7.0, 7.0, 7.0, None, None]
    assert failures == {"parse": 1, "http_500": 1}
    assert server.seen["flaky"] == 2 and server.seen["slow"] == 2 and server.seen["500"] == 3
    assert all(c["auth"] == "Bearer sk-secret" for c in server.calls)
    assert server.calls[0]["body"]["model"] == "judge-x"
    # The key is never written to the cache.
    assert "sk-secret" not in (tmp_path / "cache.jsonl").read_text()

    # A rerun pays only for the items that failed (successes come from the on-disk cache).
    n_before = len(server.calls)
    judge2 = OpenAIJudge(server.url, "judge-x", api_key_env="MY_JUDGE_KEY", timeout_s=0.3,
                         max_retries=0, cache=JudgeCache(tmp_path / "cache.jsonl"))
    scores2, _ = judge_all(judge2, ["ref"] * len(cands), cands, num_threads=1, progress=False)
    assert scores2[:4] == [9.0, 7.0, 7.0, 7.0]
    assert len(server.calls) - n_before == 2  # garbage + 500, once each
    # Another judge model is another cache key.
    judge3 = OpenAIJudge(server.url, "judge-y", cache=JudgeCache(tmp_path / "cache.jsonl"))
    assert judge3.judge("ref", "ok:4").score == 4.0 and judge3.judge("ref", "ok:4").cached


def test_unreachable_judge_is_a_clear_error():
    judge = OpenAIJudge("http://127.0.0.1:9/v1", "m", timeout_s=0.2, max_retries=1, backoff_s=0.01)
    with pytest.raises(JudgeUnreachable, match="unreachable"):
        judge_all(judge, ["r"] * 20, ["c"] * 20, num_threads=2, fail_fast_after=4, progress=False)


def test_total_time_budget_bounds_the_run(server):
    judge = OpenAIJudge(server.url, "m", timeout_s=5, max_retries=5, backoff_s=0.5, max_total_s=0.3)
    t0 = time.monotonic()
    r = judge.judge("ref", "500")
    assert r.score is None and r.error in ("http_500", "deadline")
    assert time.monotonic() - t0 < 2.0


def test_api_key_is_redacted_from_everything_printed_raised_or_saved(server, tmp_path, monkeypatch, capsys):
    """A server echoing the request headers (key included) in 4xx/5xx bodies and in a reply: the key
    appears in no console output, no raised message and no written file."""
    from eval.report import main as report_main

    key = "sk-test-SECRET-0123456789abcdef"
    monkeypatch.setenv("MY_JUDGE_KEY", key)

    def write(path, candidates):
        with open(path, "w") as f:
            for i, cand in enumerate(candidates):
                f.write(json.dumps({"case_id": f"c{i}", "element": 0, "task": "summary", "model": path.stem,
                                    "generation": cand, "reference": f"ref {i}"}) + "\n")

    out = tmp_path / "out"
    common = ["--metric", "judge", "--judge-base-url", server.url, "--judge-api-key-env", "MY_JUDGE_KEY",
              "--judge-max-retries", "0", "--judge-threads", "1", "--num-bootstrap", "50", "--out-dir", str(out)]
    # 200 with the key in the judge's reason (cached and reported) and a 500 echoing the headers.
    write(tmp_path / "a.jsonl", ["echo:200", "echo:500", "ok:7"])
    write(tmp_path / "b.jsonl", ["ok:4", "ok:5", "ok:6"])
    report_main(["--generations", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), *common])
    # 401 echoing the headers: the run stops with the server's answer, redacted.
    write(tmp_path / "c.jsonl", ["echo:401"])
    with pytest.raises(SystemExit) as exc:
        report_main(["--generations", str(tmp_path / "c.jsonl"), *common])
    assert exc.value.code == 1

    assert all(c["auth"] == f"Bearer {key}" for c in server.calls)  # the key was really sent (and echoed)
    captured = capsys.readouterr()
    assert "HTTP 401" in captured.err and "Authorization" in captured.err and "***" in captured.err
    assert key not in captured.out and key not in captured.err
    assert key[:12] not in captured.out + captured.err  # no prefix of it either (bodies are cut short)
    cache = (out / "judge_cache.jsonl").read_text()
    assert "got Authorization: Bearer ***" in cache
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 5
    for p in written:
        assert key.encode() not in p.read_bytes(), p


def test_redact_replaces_the_key_and_authorization_values():
    from eval.judge import redact

    text = '{"Authorization": "Bearer sk-abc", "x": "sk-abc"} authorization=Basic dXNlcg== no authorization here'
    assert redact(text, ["sk-abc"]) == ('{"Authorization": "Bearer ***", "x": "***"} authorization=Basic *** '
                                        "no authorization here")
    assert redact("nothing secret", [""]) == "nothing secret"


def test_torn_cache_line_is_cut_before_appending(tmp_path, capsys):
    path = tmp_path / "cache.jsonl"
    cache = JudgeCache(path)
    cache.put("k1", JudgeResult(8.0))
    path.write_text(path.read_text() + '{"key": "k2", "sco')  # a run killed mid-append
    cache = JudgeCache(path)
    assert "line 2" in capsys.readouterr().err and len(cache) == 1
    cache.put("k3", JudgeResult(6.0))
    assert [r["key"] for r in read_jsonl_checked(path).records] == ["k1", "k3"]
    assert read_jsonl_checked(path).torn_line is None
