"""CoT stats count truncation exactly, checked by hand arithmetic on a whitespace tokenizer."""

from __future__ import annotations

import pytest

from eval.cot_stats import compute_cot_stats, format_table
from eval.inputs import EvalCase
from models.tasks import build_prompt


@pytest.fixture(scope="module")
def word_tokenizer():
    """A real HF fast tokenizer whose tokens are whitespace-separated words (easy to count)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(300)]
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


def _case(cid, summary_words, caption):
    return EvalCase(case_id=cid, element_index=0, cond_name="shr6", cond_id=0, caption=caption,
                    global_summary=" ".join(f"w{i}" for i in range(summary_words)),
                    case_captions=[caption])


def test_truncation_counts_match_hand_arithmetic(word_tokenizer):
    four = "First one. Second one. Third one. Fourth one."
    cases = [_case("a", 10, four), _case("b", 50, four), _case("c", 200, "Only one sentence.")]
    max_seq_len, nit = 64, 4
    stats = compute_cot_stats(cases, word_tokenizer, max_seq_len, nit, tasks=["summary", "cot"])

    p = build_prompt("summary", cond_name="shr6", global_summary="x")
    fixed = 1 + len(p.head.split()) + len(p.tail.split())  # BOS + head + tail
    room = max_seq_len - (nit + 1) - fixed
    expected_cuts = [w - room for w in (10, 50, 200) if w + 1 > room]  # a cut target loses its EOS too
    s = stats["tasks"]["summary"]
    assert s["examples"] == 3
    assert s["target_truncated"] == len(expected_cuts) == 2
    assert s["target_tokens_cut"] == sum(expected_cuts)
    assert s["target_cut_when_cut"]["p100"] == max(expected_cuts)
    assert s["target_tokens"]["p100"] == 201  # 200 words + EOS
    assert s["total_tokens"]["p100"] == fixed + nit + 1 + 201
    assert s["over_max_seq_len"] == 2 and s["dropped"] == 0

    c = stats["tasks"]["cot"]
    assert c["examples"] == 2 and c["unavailable"] == 1  # a 1-sentence caption has no link sentence
    assert stats["caption_sentences"] == {"1": 1, "4": 2}
    table = format_table(stats)
    assert "summary" in table and "cot" in table


def test_cli_on_shards(word_tokenizer, shard_dir, tmp_path):
    import json

    from eval.cot_stats import main

    word_tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "stats.json"
    stats = main(["--shard-dir", str(shard_dir), "--tokenizer-path", str(tmp_path / "tok"), "--max-seq-len", "64",
                  "--out-json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["num_cases"] == 24 and set(saved["tasks"]) == {"caption", "summary", "cot", "text_summary"}
    assert saved["tasks"]["text_summary"]["examples"] == 24  # one per case
    assert stats["tasks"]["summary"]["examples"] == saved["num_elements"]
