"""LLM-as-judge: a 1-10 score with a short reason for a generation against its reference.

Backends: any OpenAI-compatible `/v1/chat/completions` server (`--judge-base-url --judge-model`,
the key read from the env var named by `--judge-api-key-env`, never logged or saved: whatever the
server sends back, e.g. an error body echoing the request headers, passes `redact` before it is
printed, raised or cached, which replaces the key and Authorization values with `***`), or a local
HF causal LM (`--judge-model-path`). The rubric is fixed and versioned; a change to it bumps
`RUBRIC_VERSION`, which is part of the cache key.

Robustness: retries with exponential back-off on timeouts, connection errors, 429 and 5xx; a total
time budget after which the remaining items are counted as failures; replies parsed from JSON,
"Score: 7", or a bare number, anything else counted as a parse failure; an on-disk cache keyed by
(judge model, rubric version, reference, candidate) so reruns do not pay twice. Only the stdlib
(`urllib`) is used for HTTP.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.cli import UserError
from common.io import append_jsonl, read_jsonl, repair_jsonl_tail

RUBRIC_VERSION = "v1"
RUBRIC = """You grade a forecaster-style weather summary (CANDIDATE) against the SPC Mesoscale
Discussion text it should match (REFERENCE). Judge meteorological content, not wording:
same hazards and their severity, same region and timing, same physical reasoning (instability,
shear, forcing, moisture), no invented or contradicting facts.
Score 1-10: 1-2 unrelated or wrong; 3-4 few shared facts; 5-6 partly right, notable gaps or errors;
7-8 mostly right, minor gaps; 9-10 equivalent content.
Reply with JSON only: {"score": <integer 1-10>, "reason": "<one short sentence>"}"""


def judge_messages(reference: str, candidate: str) -> list[dict]:
    return [{"role": "system", "content": RUBRIC},
            {"role": "user", "content": f"REFERENCE:\n{reference}\n\nCANDIDATE:\n{candidate}"}]


_SCORE_PATTERNS = (
    re.compile(r'"?score"?\s*[:=]\s*"?(\d+(?:\.\d+)?)', re.IGNORECASE),
    re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*$"),
    re.compile(r"\b(\d+(?:\.\d+)?)\s*/\s*10\b"),
)


def parse_judge_reply(text: str) -> tuple[Optional[float], str]:
    """(score in [1, 10] or None, reason). Accepts JSON, 'Score: 7', '7/10' or a bare number."""
    text = (text or "").strip()
    reason = ""
    fenced = re.sub(r"^```(?:json)?|```$", "", text, flags=re.MULTILINE).strip()
    match = re.search(r"\{.*\}", fenced, re.DOTALL)
    if match:
        try:
            obj = json.loads(match.group(0))
            if isinstance(obj, dict) and "score" in obj:
                score = float(obj["score"])
                return (score if 1 <= score <= 10 else None), str(obj.get("reason", ""))[:500]
        except (ValueError, TypeError):
            pass
    for pat in _SCORE_PATTERNS:
        m = pat.search(text)
        if m:
            score = float(m.group(1))
            if 1 <= score <= 10:
                reason = re.sub(r"(?i)\bscore\s*[:=]\s*\d+(\.\d+)?", "", text).strip(" .\n")[:500]
                return score, reason
    return None, ""


REDACTED = "***"
# The value of an Authorization header echoed back by a server, e.g. `"Authorization": "Bearer x"`.
_AUTH_VALUE = re.compile(r"""(authorization["']?\s*[:=]\s*["']?)(?:(bearer|basic)\s+)?[^\s"',}]+""", re.IGNORECASE)


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """`text` with every secret (the API key) and every Authorization header value replaced by ***."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return _AUTH_VALUE.sub(lambda m: m.group(1) + (f"{m.group(2)} " if m.group(2) else "") + REDACTED, text)


@dataclass
class JudgeResult:
    score: Optional[float]
    reason: str = ""
    error: str = ""  # "" on success; "parse", "timeout", "http_429", "unreachable", "deadline", ...
    cached: bool = False


class JudgeCache:
    """Append-only JSONL cache; the key hashes (judge model, rubric version, reference, candidate)."""

    def __init__(self, path: Optional[str | Path]):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        # A run killed mid-append leaves a torn line: cut it off, or the next entry is glued to it.
        if self.path and (torn := repair_jsonl_tail(self.path)) is not None:
            print(f"[judge] warning: {self.path}: line {torn} was an incomplete cache entry; removed",
                  file=sys.stderr, flush=True)
        self._data = {r["key"]: r for r in read_jsonl(self.path)} if self.path else {}

    @staticmethod
    def key(judge_model: str, reference: str, candidate: str) -> str:
        blob = json.dumps([judge_model, RUBRIC_VERSION, reference, candidate], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def get(self, key: str) -> Optional[JudgeResult]:
        r = self._data.get(key)
        return JudgeResult(r["score"], r.get("reason", ""), cached=True) if r else None

    def put(self, key: str, result: JudgeResult) -> None:
        if result.score is None:
            return  # only successes are cached: a failure is retried on the next run
        rec = {"key": key, "score": result.score, "reason": result.reason}
        with self._lock:
            self._data[key] = rec
            if self.path:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                append_jsonl(self.path, rec)

    def __len__(self) -> int:
        return len(self._data)


class JudgeRequestError(UserError, RuntimeError):
    """The judge server refused a request (HTTP 4xx other than 429: wrong key, model, URL); the
    message holds its (redacted) answer."""


class RetryableError(Exception):
    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


class OpenAIJudge:
    """A judge behind an OpenAI-compatible chat-completions endpoint."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 60.0, max_retries: int = 4, backoff_s: float = 1.0,
                 max_total_s: float = 1800.0, cache: Optional[JudgeCache] = None, max_tokens: int = 128):
        self.url = base_url.rstrip("/") + ("" if base_url.rstrip("/").endswith("/chat/completions")
                                           else "/chat/completions")
        self.model = model
        self._api_key = os.environ.get(api_key_env, "")  # kept private: never printed or saved (see redact)
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.deadline = time.monotonic() + max_total_s
        self.cache = cache if cache is not None else JudgeCache(None)
        self.max_tokens = max_tokens

    @property
    def name(self) -> str:
        return self.model

    def _post(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0.0,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        timeout = max(0.1, min(self.timeout_s, self.deadline - time.monotonic()))
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                payload = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            if e.code == 429 or e.code >= 500:
                raise RetryableError(f"http_{e.code}") from None
            # The body may echo the request (headers included): redact before cutting it short, so
            # that no prefix of the key survives the cut.
            body = self._redact(e.read().decode("utf-8", errors="replace"))
            raise JudgeRequestError(f"judge {self._redact(self.url)} answered HTTP {e.code}: {body[:300]!r}") from None
        except (TimeoutError, OSError) as e:  # socket timeouts, refused connections, DNS
            is_timeout = isinstance(e, TimeoutError) or "timed out" in str(e)
            raise RetryableError("timeout" if is_timeout else "unreachable") from None
        try:
            return self._redact(payload["choices"][0]["message"]["content"] or "")
        except (KeyError, IndexError, TypeError):
            return ""

    def _redact(self, text: str) -> str:
        return redact(text, (self._api_key,))

    def judge(self, reference: str, candidate: str) -> JudgeResult:
        key = JudgeCache.key(self.name, reference, candidate)
        if (hit := self.cache.get(key)) is not None:
            return hit
        error = "deadline"
        for attempt in range(self.max_retries + 1):
            if time.monotonic() >= self.deadline:
                return JudgeResult(None, error="deadline")
            try:
                text = self._post(judge_messages(reference, candidate))
            except RetryableError as e:
                error = e.kind
                pause = self.backoff_s * (2 ** attempt)
                if attempt < self.max_retries and time.monotonic() + pause < self.deadline:
                    time.sleep(pause)
                    continue
                return JudgeResult(None, error=error)
            score, reason = parse_judge_reply(text)
            result = JudgeResult(score, reason, error="" if score is not None else "parse")
            self.cache.put(key, result)
            return result
        return JudgeResult(None, error=error)


class LocalHFJudge:
    """A judge run locally from an HF causal-LM directory (greedy, chat template when present)."""

    def __init__(self, model_path: str, device: str = "cpu", cache: Optional[JudgeCache] = None,
                 max_new_tokens: int = 64):
        self.model_path = model_path
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.lm = AutoModelForCausalLM.from_pretrained(model_path).to(device).eval()
        self.cache = cache if cache is not None else JudgeCache(None)
        self.max_new_tokens = max_new_tokens

    @property
    def name(self) -> str:
        return f"local:{Path(self.model_path).name}"

    def judge(self, reference: str, candidate: str) -> JudgeResult:
        key = JudgeCache.key(self.name, reference, candidate)
        if (hit := self.cache.get(key)) is not None:
            return hit
        msgs = judge_messages(reference, candidate)
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tok("\n\n".join(m["content"] for m in msgs) + "\n\nJSON:", return_tensors="pt")["input_ids"]
        ids = ids.to(self.lm.device)
        with torch.no_grad():
            out = self.lm.generate(ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                   pad_token_id=tok.pad_token_id or tok.eos_token_id)
        score, reason = parse_judge_reply(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        result = JudgeResult(score, reason, error="" if score is not None else "parse")
        self.cache.put(key, result)
        return result


class JudgeUnreachable(UserError, RuntimeError):
    """The judge server cannot be reached (an expected failure: one message, exit 1)."""


def judge_all(judge, references: Sequence[str], candidates: Sequence[str], num_threads: int = 4,
              fail_fast_after: int = 8, progress: bool = True) -> tuple[list[Optional[float]], dict]:
    """Scores (None where judging failed) and a failure count per error kind.

    When the first `fail_fast_after` calls all fail as unreachable, raises `JudgeUnreachable`
    instead of waiting out every retry of every item.
    """
    results: list[Optional[JudgeResult]] = [None] * len(references)
    failures: dict[str, int] = {}
    unreachable_streak = [0, True]  # consecutive unreachable count, "no success yet"

    def work(i: int) -> None:
        r = judge.judge(references[i], candidates[i])
        results[i] = r
        if r.score is not None:
            unreachable_streak[1] = False
        elif r.error == "unreachable" and unreachable_streak[1]:
            unreachable_streak[0] += 1

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        futures = [pool.submit(work, i) for i in range(len(references))]
        for f in tqdm(futures, desc=f"judge {judge.name}", unit="pair", disable=not progress):
            f.result()
            if unreachable_streak[1] and unreachable_streak[0] >= fail_fast_after:
                for g in futures:
                    g.cancel()
                url = redact(getattr(judge, "url", judge.name), (getattr(judge, "_api_key", ""),))
                raise JudgeUnreachable(f"judge at {url} is unreachable ({unreachable_streak[0]} calls failed); "
                                       "check --judge-base-url, or run with --metric embedding")
    for r in results:
        if r is not None and r.score is None:
            failures[r.error] = failures.get(r.error, 0) + 1
    return [None if r is None else r.score for r in results], failures
