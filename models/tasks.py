"""The MTL tasks and their prompt templates: the one place that defines what the model sees.

Training, sample logging, inference, the text-only baseline and the CoT stats all build their
inputs here, so the prompts a model is evaluated on are the ones it was trained on.

| task           | letter | image prefix | prompt holds                          | target                 |
|----------------|--------|--------------|---------------------------------------|------------------------|
| `caption`      | A      | yes          | the image type                        | the 4-sentence caption |
| `summary`      | B      | yes          | the image type                        | the global MD summary  |
| `cot`          | C      | yes          | caption sentences 1-3 + global summary | caption sentence 4     |
| `text_summary` | D      | no           | all captions of the case              | the global MD summary  |

Token layout of one example (P = num_image_tokens + 1 class embedding, 0 for text-only):

    [BOS] [P image-prefix slots] [prompt head] [prompt body] [prompt tail] [target] [EOS]
    loss:  no     no                no            no           no          yes      yes

Truncation to `max_seq_len` cuts the prompt body first (the long caption/summary context of C and
D), then the end of the target; a target is never cut away completely, a cut target gets no EOS
(so the model does not learn to stop mid-sentence), and every cut is counted per task.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from models.cond_names import COND_DESCRIPTIONS

TASKS: tuple[str, ...] = ("caption", "summary", "cot", "text_summary")
TASK_LETTERS = {"caption": "A", "summary": "B", "cot": "C", "text_summary": "D"}
TASK_IDS = {t: i for i, t in enumerate(TASKS)}
IMAGE_TASKS = frozenset({"caption", "summary", "cot"})

# A few tokens of target must always survive truncation.
MIN_TARGET_TOKENS = 8

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def split_sentences(text: str) -> list[str]:
    """Split a caption into sentences (Gemini captions are plain prose: '. ' + capital)."""
    text = " ".join(text.split())
    return [s for s in _SENTENCE_END.split(text) if s] if text else []


def describe(cond_name: str) -> str:
    return f"{COND_DESCRIPTIONS.get(cond_name, cond_name)} ({cond_name})"


@dataclass(frozen=True)
class Prompt:
    """A task instance as text. `head + body + tail` is the prompt; only `body` may be truncated."""

    task: str
    uses_image: bool
    head: str
    body: str
    tail: str
    target: str

    @property
    def text(self) -> str:
        return self.head + self.body + self.tail


class TaskUnavailable(ValueError):
    """The sample lacks what the task needs (e.g. a 1-sentence caption has no 'link' sentence)."""


def build_prompt(task: str, *, cond_name: str = "", caption: str = "", global_summary: str = "",
                 case_captions: Sequence[str] = (), with_image: bool = True) -> Prompt:
    """The prompt/target of `task`. `with_image=False` gives the text-only baseline's prompt."""
    img = with_image and task in IMAGE_TASKS
    seen = f"The image is a {describe(cond_name)} map." if cond_name else ""
    if task == "caption":
        return Prompt(task, img, f"[INST] {seen} ", "",
                      "Describe the map in four sentences: two on what it shows, one on its "
                      "physical meaning, one linking it to the forecast. [/INST] ", caption)
    if task == "summary":
        return Prompt(task, img, f"[INST] {seen} ", "",
                      "Write the SPC Mesoscale Discussion summary for this case. [/INST] ",
                      global_summary)
    if task == "cot":
        sents = split_sentences(caption)
        if len(sents) < 2:
            raise TaskUnavailable(f"caption has {len(sents)} sentence(s); task cot needs >= 2")
        context = " ".join(sents[:-1])
        return Prompt(task, img, f"[INST] {seen} Observations: {context}\nMD summary: ",
                      global_summary,
                      "\nIn one sentence, link this map to the summary. [/INST] ", sents[-1])
    if task == "text_summary":
        if not case_captions:
            raise TaskUnavailable("task text_summary needs the case's captions")
        body = "".join(f"- {c.strip()}\n" for c in case_captions)
        return Prompt(task, False, "[INST] Element captions of one case:\n", body,
                      "Write the SPC Mesoscale Discussion summary for this case. [/INST] ",
                      global_summary)
    raise ValueError(f"unknown task {task!r}; known: {TASKS}")


@dataclass
class TokenizedExample:
    """Token ids of one example, text only; the collator inserts the image-prefix slots."""

    task: str
    uses_image: bool
    prompt_ids: list[int]  # [BOS] + prompt (no loss); the prefix goes right after BOS
    target_ids: list[int]  # target (+ EOS unless cut) (loss)
    has_bos: bool
    prompt_cut: int = 0  # tokens removed from the prompt body
    target_cut: int = 0  # tokens removed from the end of the target


@dataclass
class TruncationStats:
    """Per-task counts of what truncation did; summed across ranks and logged."""

    examples: dict = field(default_factory=lambda: {t: 0 for t in TASKS})
    prompt_truncated: dict = field(default_factory=lambda: {t: 0 for t in TASKS})
    target_truncated: dict = field(default_factory=lambda: {t: 0 for t in TASKS})
    target_tokens_cut: dict = field(default_factory=lambda: {t: 0 for t in TASKS})
    dropped: dict = field(default_factory=lambda: {t: 0 for t in TASKS})

    def add(self, ex: Optional[TokenizedExample], task: str) -> None:
        if ex is None:
            self.dropped[task] += 1
            return
        self.examples[task] += 1
        self.prompt_truncated[task] += ex.prompt_cut > 0
        self.target_truncated[task] += ex.target_cut > 0
        self.target_tokens_cut[task] += ex.target_cut

    def as_dict(self) -> dict:
        return {k: dict(getattr(self, k)) for k in
                ("examples", "prompt_truncated", "target_truncated", "target_tokens_cut", "dropped")}

    def merge(self, other: dict) -> None:
        for k, per_task in other.items():
            for t, v in per_task.items():
                getattr(self, k)[t] = getattr(self, k).get(t, 0) + v


def prefix_length(uses_image: bool, num_image_tokens: int) -> int:
    """Image-prefix slots: the projected latent tokens plus one class embedding."""
    return num_image_tokens + 1 if uses_image else 0


def tokenize_prompt(prompt: Prompt, tokenizer, max_seq_len: int, num_image_tokens: int,
                    with_target: bool = True) -> Optional[TokenizedExample]:
    """Tokenize and truncate to `max_seq_len` total positions (prefix included).

    Returns None when even the fixed parts (BOS, prefix, head, tail, MIN_TARGET_TOKENS) exceed
    the budget: the caller counts it as dropped. With `with_target=False` (generation) the target
    is left empty and the budget is for the prompt alone.
    """
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    head, body, tail = enc(prompt.head), enc(prompt.body), enc(prompt.tail)
    target = enc(prompt.target) if with_target else []
    eos = [tokenizer.eos_token_id] if (with_target and tokenizer.eos_token_id is not None) else []

    budget = max_seq_len - prefix_length(prompt.uses_image, num_image_tokens)
    fixed = len(bos) + len(head) + len(tail)
    min_target = min(len(target) + len(eos), MIN_TARGET_TOKENS) if with_target else 0
    if fixed + min_target > budget:
        return None
    # 1) the prompt body gives way first (down to nothing if the target needs the room) ...
    keep_body = max(0, min(len(body), budget - fixed - len(target) - len(eos)))
    prompt_cut = len(body) - keep_body
    body = body[:keep_body]
    # 2) then the end of the target; a cut target gets no EOS.
    room = budget - fixed - len(body)
    target_cut = 0
    if len(target) + len(eos) > room:
        target_cut = len(target) - room
        target, eos = target[:room], []
    return TokenizedExample(prompt.task, prompt.uses_image, bos + head + body + tail, target + eos,
                            bool(bos), prompt_cut=prompt_cut, target_cut=target_cut)
