"""LLM judge against a real local HTTP server speaking /v1/chat/completions, failures included."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from eval.judge import JudgeCache, JudgeUnreachable, OpenAIJudge, judge_all, parse_judge_reply


class FakeJudgeServer:
    """Replies per candidate text: 'ok:N' -> score N, 'slow' -> sleeps past the timeout once,
    'flaky' -> 429 the first time then a score, 'garbage' -> unparsable text, '500' -> always 500."""

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
