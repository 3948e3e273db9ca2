"""The streaming data pipeline: splitting across ranks/workers, exact resume, task mix, bad shards.

Most tests use a small hand-made shard directory (written with shard_format + webdataset, sizes
chosen so that N is not divisible by the number of ranks or workers) and a BPE tokenizer trained
here; one test runs on the conftest's built shards and tiny LM.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from common.io import sha256_file
from data_prep.manifest import Manifest, ShardEntry, Stage1Record, load_manifest, save_manifest
from data_prep.shard_format import CASES_FILENAME, ElementSample, encode_sample
from models.cond_names import COND_NAMES, default_cond_name_to_id
from models.tasks import TASKS
from trainer.data import DataConfig, DataError, TrainStream, plan_rank, resume_point, round_robin_order, split_evenly
from trainer.schedules import ScheduleConfig, build_phases

TRAIN_SHARD_SIZES = (7, 5, 6, 4)  # N = 22: not divisible by 2 ranks x 2 workers x batch 3
VAL_SHARD_SIZES = (5, 4)
LATENT_DIM = 8
NUM_IMAGE_TOKENS = 2


def _caption(case: int, el: int) -> str:
    if el == 1:  # one sentence: task cot is unavailable -> falls back to caption
        return f"A lone sentence about map {el} of case {case}."
    return (f"The map {el} shows strong shear over Kansas in case {case}. Values rise to the east. "
            f"This favours organised storms. It links to the watch in the summary.")


def _summary(case: int) -> str:
    return f"Areas affected...portions of Kansas. Severe potential...Watch possible for case {case}."


def write_shard_dir(out: Path, train_sizes=TRAIN_SHARD_SIZES, val_sizes=VAL_SHARD_SIZES) -> Path:
    """Shards whose samples are (case, element) pairs with 3 elements per case, cases.jsonl, manifest."""
    rng = np.random.default_rng(0)
    entries, cases = [], {}
    counter = itertools.count()
    for split, sizes in (("train", train_sizes), ("val", val_sizes)):
        for i, size in enumerate(sizes):
            name = f"{split}-{i:06d}.tar"
            with wds.TarWriter(str(out / name)) as w:
                for _ in range(size):
                    n = next(counter)
                    case, el = n // 3, n % 3
                    s = ElementSample(case_id=f"case{case:03d}", element_index=el, split=split,
                                      cond_name=COND_NAMES[n % 20], cond_id=n % 20, caption=_caption(case, el),
                                      global_summary=_summary(case),
                                      latent=rng.standard_normal(LATENT_DIM).astype(np.float16),
                                      cls_logits=rng.standard_normal(20).astype(np.float16))
                    w.write(encode_sample(s))
                    c = cases.setdefault(s.case_id, {"case_id": s.case_id, "split": split,
                                                     "global_summary": s.global_summary, "captions": []})
                    c["captions"].append(s.caption)
            entries.append(ShardEntry(name, split, size, sha256_file(out / name), (out / name).stat().st_size))
    (out / CASES_FILENAME).write_text("".join(json.dumps(c) + "\n" for c in cases.values()))
    stage1 = Stage1Record("0" * 64, "0" * 64, 32, 0, "mean", LATENT_DIM, 0, {"mean": [0.5] * 3, "std": [0.5] * 3})
    save_manifest(out, Manifest(shards=entries, split_counts={}, stage1=stage1,
                                cond_name_to_id=default_cond_name_to_id()))
    return out


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    return write_shard_dir(tmp_path_factory.mktemp("small_shards"))


@pytest.fixture(scope="module")
def tokenizer():
    from tiny_models.lm import prompt_texts, train_tokenizer

    texts = [_caption(c, e) for c in range(10) for e in range(3)] + [_summary(c) for c in range(10)]
    return train_tokenizer(texts + list(prompt_texts()), vocab_size=400)


def make_stream(shard_dir, tokenizer, rank=0, world_size=1, seed=0, schedule=None, **data_kw) -> TrainStream:
    cfg = DataConfig(shard_dir=str(shard_dir), **{"batch_size": 3, "num_workers": 2, "shuffle_buffer": 4,
                                                  "max_seq_len": 512, **data_kw})
    cfg.validate()
    phases = build_phases(schedule or ScheduleConfig(num_epochs=3))
    return TrainStream(load_manifest(shard_dir), shard_dir, tokenizer, cfg, phases, NUM_IMAGE_TOKENS,
                       rank, world_size, seed)


def train_keys() -> list[str]:
    return [f"case{n // 3:03d}__e{n % 3:02d}" for n in range(sum(TRAIN_SHARD_SIZES))]


def fingerprint(batch: dict) -> tuple:
    """What identifies a batch: its examples, their loss weights and the exact token ids."""
    return tuple(batch["keys"]), tuple(batch["loss_weights"]), tuple(batch["input_ids"].flatten().tolist())


# ----------------------------------------------------------------------------------------------
# The plan (pure arithmetic)


@pytest.mark.parametrize("n, world, workers, batch", [
    (22, 2, 2, 3), (22, 3, 2, 4), (7, 4, 3, 2), (3, 4, 2, 1), (1, 2, 0, 8), (100, 8, 4, 5), (9, 4, 1, 3),
])
def test_plan_covers_every_sample_once_with_equal_counts(n, world, workers, batch):
    real, dups, slot_counts, batch_counts = Counter(), 0, set(), set()
    for rank in range(world):
        plan = plan_rank(n, rank, world, workers, batch)
        assert len(plan) == max(1, workers)
        for w in plan:
            real.update(w.positions)
            assert w.num_batches == -(-w.num_slots // batch)
        dups += sum(w.duplicate is not None for w in plan)
        slot_counts.add(sum(w.num_slots for w in plan))
        batch_counts.add(tuple(w.num_batches for w in plan))
    assert real == Counter(range(n))  # every sample exactly once per epoch
    assert len(slot_counts) == 1 and len(batch_counts) == 1  # identical on all ranks
    assert dups == slot_counts.pop() * world - n < world  # duplicates only fill the remainder


@pytest.mark.parametrize("field, value", [("batch_size", -1), ("num_workers", -1), ("shuffle_buffer", -1),
                                          ("max_seq_len", 8), ("val_max_samples", -1), ("batch_tokens", 100)])
def test_data_config_validation(field, value):
    with pytest.raises(ValueError, match="--" + field.replace("_", "-")):
        DataConfig(**{field: value}).validate()


def test_split_evenly_and_round_robin():
    assert [len(r) for r in split_evenly(10, 4)] == [3, 3, 2, 2]
    assert round_robin_order([2, 2, 1]) == [0, 1, 2, 0, 1]
    assert resume_point([2, 2, 1], 0) == ([0, 0, 0], 0)
    assert resume_point([2, 2, 1], 3) == ([1, 1, 1], 0)
    assert resume_point([2, 2, 1], 4) == ([2, 1, 1], 1)
    assert resume_point([2, 2, 1], 5)[0] == [2, 2, 1]
    with pytest.raises(ValueError, match="skip_batches"):
        resume_point([2, 2, 1], 6)


# ----------------------------------------------------------------------------------------------
# Streams over real shards


@pytest.mark.parametrize("batching", [{"batch_size": 3}, {"batch_size": 0, "batch_tokens": 600}])
def test_two_ranks_see_every_sample_once_and_same_batch_counts(small_shards, tokenizer, batching):
    streams = [make_stream(small_shards, tokenizer, rank=r, world_size=2, **batching) for r in range(2)]
    assert streams[0].batches_per_epoch == streams[1].batches_per_epoch
    orders = []
    for epoch in range(2):
        seen, per_rank = Counter(), []
        for stream in streams:
            batches = list(stream.loader(epoch))
            assert len(batches) == stream.batches_per_epoch
            per_rank.append([k for b in batches for k in b["keys"]])
            for b in batches:
                seen.update(k for k, w in zip(b["keys"], b["loss_weights"]) if w > 0)
                assert b["stats"]["pad_duplicates"] == sum(w == 0 for w in b["loss_weights"])
                assert sum(b["stats"]["truncation"]["dropped"].values()) == 0
                # Loss-free duplicates carry no target tokens.
                assert b["num_target_tokens"] == (b["labels"] != -100).sum().item()
        assert sorted(seen) == sorted(train_keys()) and set(seen.values()) == {1}
        assert len(per_rank[0]) == len(per_rank[1]) == 11
        orders.append(per_rank)
    assert orders[0] != orders[1]  # epochs are shuffled differently


def test_same_seed_same_batches_other_seed_other_order(small_shards, tokenizer):
    a = [fingerprint(b) for b in make_stream(small_shards, tokenizer, seed=1).loader(0)]
    b = [fingerprint(b) for b in make_stream(small_shards, tokenizer, seed=1).loader(0)]
    c = [fingerprint(b) for b in make_stream(small_shards, tokenizer, seed=2).loader(0)]
    assert a == b and a != c


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("world_size, num_workers, window, batch_tokens",
                         [(2, 2, 8, 0), (1, 3, 3, 0), (1, 0, 4, 0), (1, 0, 1, 0), (2, 2, 2, 512)])
def test_skip_batches_resumes_exactly(small_shards, tokenizer, world_size, num_workers, window, batch_tokens):
    """Resuming at any batch (inside a balancing window too) gives the rest of the same epoch."""
    stream = make_stream(small_shards, tokenizer, rank=world_size - 1, world_size=world_size,
                         num_workers=num_workers, batch_size=0 if batch_tokens else 2, batch_tokens=batch_tokens,
                         balance_window=window)
    full = [fingerprint(b) for b in stream.loader(1)]
    assert len(full) == stream.batches_per_epoch
    for skip in sorted({1, 2, len(full) // 2 + 1, len(full) - 1, len(full)}):
        assert [fingerprint(b) for b in stream.loader(1, skip_batches=skip)] == full[skip:], skip


def _epoch_stats(stream: TrainStream, epoch: int):
    batches = list(stream.loader(epoch))
    mix, fallbacks, trunc = Counter(), 0, Counter()
    for b in batches:
        mix.update(b["stats"]["task_counts"])
        fallbacks += b["stats"]["task_fallbacks"]
        for kind, per_task in b["stats"]["truncation"].items():
            trunc.update({(kind, t): v for t, v in per_task.items()})
    return batches, mix, fallbacks, trunc


def test_task_mix_fallbacks_and_truncation_stats(small_shards, tokenizer):
    schedule = ScheduleConfig(schedule="summary_centric", prob_summary=0.0, prob_caption=0.0, prob_cot=0.5,
                              prob_text_summary=0.5, text_summary=True, warmup_epochs=1, main_epochs=1)
    # 140 positions: every cot head fits, three captions of a case (task D) do not.
    stream = make_stream(small_shards, tokenizer, schedule=schedule, num_workers=0, max_seq_len=140)
    batches, mix, fallbacks, trunc = _epoch_stats(stream, 1)
    # Element 1 of every case has a one-sentence caption: cot falls back to caption there.
    assert fallbacks > 0 and mix["caption"] == fallbacks
    assert mix["summary"] == 0 and mix["cot"] > 0 and mix["text_summary"] > 0
    assert sum(mix.values()) == stream.num_train_samples
    assert trunc[("prompt_truncated", "text_summary")] == mix["text_summary"]
    assert sum(v for (kind, _), v in trunc.items() if kind == "dropped") == 0
    # Task D examples have no image prefix, so fewer latents than examples.
    assert sum(len(b["latents"]) for b in batches if "latents" in b) == stream.num_train_samples - mix["text_summary"]

    # 100 positions: no cot head fits; those examples are counted as dropped and become captions.
    stream = make_stream(small_shards, tokenizer, schedule=schedule, num_workers=0, max_seq_len=100)
    _, mix100, fallbacks100, trunc100 = _epoch_stats(stream, 1)
    assert mix100["cot"] == 0 and trunc100[("dropped", "cot")] == mix["cot"]
    assert mix100["caption"] == fallbacks100 == mix["caption"] + mix["cot"]
    assert sum(mix100.values()) == stream.num_train_samples


def test_val_loader_is_fixed_capped_and_split(small_shards, tokenizer):
    streams = [make_stream(small_shards, tokenizer, rank=r, world_size=2, val_max_samples=7) for r in range(2)]
    runs = [[fingerprint(b) for s in streams for b in s.val_loader()] for _ in range(2)]
    assert runs[0] == runs[1]
    keys = [k for fp in runs[0] for k, w in zip(fp[0], fp[1]) if w > 0]
    assert len(keys) == len(set(keys)) == 7
    items = streams[0].val_items(3)
    assert [it.key for it in items] == [f"case{(22 + i) // 3:03d}__e{(22 + i) % 3:02d}" for i in range(3)]
    assert make_stream(small_shards, tokenizer, val_max_samples=0).val_loader() == []


# ----------------------------------------------------------------------------------------------
# Bad shards


def _copy_shards(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_missing_or_truncated_shard_is_named(small_shards, tokenizer, tmp_path):
    missing = _copy_shards(small_shards, tmp_path / "missing")
    (missing / "train-000002.tar").unlink()
    with pytest.raises(DataError, match=r"train-000002\.tar.*missing"):
        make_stream(missing, tokenizer)
    stream = make_stream(missing, tokenizer, skip_bad_shards=True)
    assert stream.skipped_shards == ["train-000002.tar"] and stream.num_train_samples == 22 - 6

    cut = _copy_shards(small_shards, tmp_path / "cut")
    data = (cut / "train-000001.tar").read_bytes()
    (cut / "train-000001.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"train-000001\.tar.*bytes"):
        make_stream(cut, tokenizer)


def test_corrupt_shard_found_while_reading(small_shards, tokenizer, tmp_path):
    """A shard whose size the manifest does not record is only found bad when read."""
    bad = _copy_shards(small_shards, tmp_path / "bad")
    manifest = json.loads((bad / "manifest.json").read_text())
    for s in manifest["shards"]:
        s["size"] = -1
    (bad / "manifest.json").write_text(json.dumps(manifest))
    data = (bad / "train-000000.tar").read_bytes()
    (bad / "train-000000.tar").write_bytes(data[: len(data) // 2])
    # In-process (num_workers=0): a DataLoader whose worker raised takes ~10 s to shut down, and
    # the worker path re-raises the same DataError message.
    with pytest.raises(DataError, match=r"train-000000\.tar: cannot read sample"):
        list(make_stream(bad, tokenizer, num_workers=0).loader(0))

    stream = make_stream(bad, tokenizer, skip_bad_shards=True, num_workers=0)
    batches = list(stream.loader(0))
    assert len(batches) == stream.batches_per_epoch  # the layout survives: stand-ins are loss-free
    bad_count = sum(b["stats"]["bad_samples"] for b in batches)
    assert 0 < bad_count <= 7
    assert sum(w == 0 for b in batches for w in b["loss_weights"]) == bad_count


def _flip_a_latent_byte(shard: Path) -> None:
    """One flipped bit inside the first sample's latent array: same size, the tar and the .npy still
    read, only the manifest's sha256 can tell."""
    import tarfile

    with tarfile.open(shard) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(".latent.npy"))
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size - 2] ^= 0x01  # in the last fp16 value, past the .npy header
    shard.write_bytes(bytes(data))


def _with_a_flipped_latent(small_shards, tokenizer, dst: Path) -> tuple[Path, str, list[str]]:
    """A copy of the shards whose first shard of epoch 0 (so a worker's first) has a flipped byte:
    (dir, shard name, the keys of its samples)."""
    bad = _copy_shards(small_shards, dst)
    first = Path(make_stream(bad, tokenizer, num_workers=0)._train_plan(0)[0][0].path).name
    size_before = (bad / first).stat().st_size
    _flip_a_latent_byte(bad / first)
    assert (bad / first).stat().st_size == size_before
    index = int(first.split("-")[1].split(".")[0])
    start = sum(TRAIN_SHARD_SIZES[:index])
    return bad, first, train_keys()[start:start + TRAIN_SHARD_SIZES[index]]


def test_a_shard_whose_checksum_fails_is_refused_naming_it(small_shards, tokenizer, tmp_path):
    bad, name, _ = _with_a_flipped_latent(small_shards, tokenizer, tmp_path / "bad")
    expected = next(s.sha256 for s in load_manifest(bad).shards if s.name == name)
    pattern = rf"{name}: sha256 [0-9a-f]{{64}} does not match the manifest's {expected}"
    stream = make_stream(bad, tokenizer, num_workers=0)
    with pytest.raises(DataError, match=pattern):
        list(stream.loader(0))
    # A resume past the start of the shard (or past all of it) still checks the whole file.
    for skip in (1, stream.batches_per_epoch - 1, stream.batches_per_epoch):
        with pytest.raises(DataError, match=pattern):
            list(stream.loader(0, skip_batches=skip))
    # Split over 2 ranks, exactly one worker reads the shard to its end and checks it.
    failed = 0
    for rank in range(2):
        try:
            list(make_stream(bad, tokenizer, rank=rank, world_size=2, num_workers=0).loader(0))
        except DataError as e:
            assert re.search(pattern, str(e)), e
            failed += 1
    assert failed == 1


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_bad_shards_skips_a_shard_whose_checksum_fails_and_counts_it(small_shards, tokenizer, tmp_path,
                                                                           num_workers):
    bad, name, bad_keys = _with_a_flipped_latent(small_shards, tokenizer, tmp_path / "bad")
    for epoch in range(2):
        seen, bad_samples, bad_shards, counts = Counter(), 0, 0, set()
        for rank in range(2):
            stream = make_stream(bad, tokenizer, rank=rank, world_size=2, num_workers=num_workers,
                                 skip_bad_shards=True)
            batches = list(stream.loader(epoch))
            counts.add((len(batches), stream.batches_per_epoch))
            for b in batches:
                seen.update(k for k, w in zip(b["keys"], b["loss_weights"]) if w > 0)
                bad_samples += b["stats"]["bad_samples"]
                bad_shards += b["stats"]["bad_shards"]
        assert len(counts) == 1 and len(set(counts.pop())) == 1  # equal batch counts on both ranks, as planned
        # The whole shard is skipped (not a sample of it trained), counted once; the rest exactly once.
        assert not set(bad_keys) & set(seen)
        assert sorted(seen) == sorted(set(train_keys()) - set(bad_keys)) and set(seen.values()) == {1}
        assert (bad_samples, bad_shards) == (len(bad_keys), 1), epoch

    # An intact shard set: checked in both modes, nothing skipped, the same batches as without checks.
    unchecked = _copy_shards(small_shards, tmp_path / "unchecked")
    manifest = json.loads((unchecked / "manifest.json").read_text())
    for s in manifest["shards"]:
        s["sha256"] = ""
    (unchecked / "manifest.json").write_text(json.dumps(manifest))
    want = [fingerprint(b) for b in make_stream(unchecked, tokenizer, num_workers=num_workers).loader(1)]
    for skip_bad in (False, True):
        stream = make_stream(small_shards, tokenizer, num_workers=num_workers, skip_bad_shards=skip_bad)
        batches = list(stream.loader(1))
        assert [fingerprint(b) for b in batches] == want
        assert sum(b["stats"]["bad_samples"] + b["stats"]["bad_shards"] for b in batches) == 0


@pytest.mark.slow
def test_skip_bad_shards_puts_the_skipped_shard_in_train_log(shard_dir, tiny_lm_dir, tmp_path):
    """End to end: a shard with a flipped latent byte is skipped, and train_log.jsonl counts it."""
    import shutil

    from transformers import AutoTokenizer

    from tests.test_train_e2e import base_flags, run_train, train_records

    bad = Path(shutil.copytree(shard_dir, tmp_path / "shards"))
    cfg = DataConfig(shard_dir=str(bad), batch_size=16, num_workers=1)
    stream = TrainStream(load_manifest(bad), bad, AutoTokenizer.from_pretrained(tiny_lm_dir), cfg,
                         build_phases(ScheduleConfig()), 4, 0, 1, seed=1)
    first = Path(stream._train_plan(0)[0][0].path).name  # the run's first shard: read within a few steps
    _flip_a_latent_byte(bad / first)
    out = tmp_path / "run"
    run_train(base_flags(bad, tiny_lm_dir, out, **{"skip-bad-shards": True, "batch-size": 16, "max-steps": 5}),
              num_procs=1)
    recs = train_records(out)
    assert sum(r["bad_shards"] for r in recs) == 1  # counted with the shard's last sample
    # its samples trained so far (5 steps x 16, shuffled) are all loss-free stand-ins
    assert 0 < sum(r["bad_samples"] for r in recs) <= next(e.num_samples for e in load_manifest(bad).shards
                                                           if e.name == first)


# ----------------------------------------------------------------------------------------------
# The real builder's shards and the tiny LM's tokenizer


def test_stream_over_built_shards(shard_dir, tiny_lm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    manifest = load_manifest(shard_dir)
    cfg = DataConfig(shard_dir=str(shard_dir), batch_size=4, num_workers=2, shuffle_buffer=16, max_seq_len=256)
    phases = build_phases(ScheduleConfig(text_summary=True))
    streams = [TrainStream(manifest, shard_dir, tok, cfg, phases, 4, r, 2, 0) for r in range(2)]
    seen = Counter()
    for s in streams:
        batches = list(s.loader(0))
        assert len(batches) == s.batches_per_epoch
        for b in batches:
            seen.update(k for k, w in zip(b["keys"], b["loss_weights"]) if w > 0)
            if "latents" in b:  # absent when every example of the batch is task D (text only)
                assert b["latents"].shape[1] == manifest.stage1.latent_dim
            assert b["cu_seqlens"][-1] == b["input_ids"].shape[1]
    assert sum(seen.values()) == len(seen) == manifest.num_samples("train")
    mix = Counter()
    for b in streams[0].val_loader():
        mix.update({t: n for t, n in b["stats"]["task_counts"].items() if n})
    assert set(mix) <= set(TASKS) and len(mix) >= 3


def test_token_balanced_batches_keep_counts_and_even_out_tokens(small_shards, tokenizer):
    """Same batches per epoch, every sample once, and per-batch token totals closer to the mean than
    consecutive batching gives (the spread that makes one GPU wait for another)."""
    def epoch(window):
        stream = make_stream(small_shards, tokenizer, num_workers=0, batch_size=3, balance_window=window)
        batches = list(stream.loader(0))
        keys = sorted(k for b in batches for k in b["keys"])
        return stream.batches_per_epoch, batches, keys

    n_plain, plain, keys_plain = epoch(1)
    n_bal, balanced, keys_bal = epoch(4)
    assert len(plain) == n_plain == len(balanced) == n_bal
    assert keys_plain == keys_bal == sorted(train_keys())
    full = balanced[: 4 * (len(balanced) // 4)]  # whole windows only
    assert len(full) >= 4
    tokens = lambda bs: [b["input_ids"].numel() for b in bs]  # noqa: E731  (packed rows: no padding)
    spread = lambda xs: max(xs) - min(xs)  # noqa: E731
    assert spread(tokens(full)) < spread(tokens(plain[: len(full)])), (tokens(full), tokens(plain[: len(full)]))


def test_balanced_batches_lpt_is_within_one_example_of_the_mean():
    from models.tasks import TokenizedExample
    from trainer.data import Example, balanced_batches

    rng = random.Random(0)
    window = [Example(raw=None, loss_weight=1.0, tokens=TokenizedExample("caption", True, [1] * rng.randint(5, 30),
                                                                          [2] * rng.randint(20, 200), True))
              for _ in range(64)]
    window[3].tokens = None  # a dropped example still takes a slot
    batches = balanced_batches(window, 8, prefix_tokens=5)
    assert len(batches) == 8 and all(batches) and sorted(map(id, sum(batches, []))) == sorted(map(id, window))
    size = lambda ex: 0 if ex.tokens is None else len(ex.tokens.prompt_ids) + len(ex.tokens.target_ids) + 5  # noqa: E731
    totals = [sum(map(size, b)) for b in batches]
    assert max(totals) - min(totals) <= max(map(size, window)), totals
    position = {id(ex): i for i, ex in enumerate(window)}
    for b in batches:  # stream order kept inside a batch
        assert [position[id(ex)] for ex in b] == sorted(position[id(ex)] for ex in b)


# ----------------------------------------------------------------------------------------------
# Token budgets (--batch-tokens)


def _summary_centric(main: dict) -> ScheduleConfig:
    """Warm-up epoch of captions + CoT links (long examples here), then one epoch of the `main` mix."""
    probs = {"prob_summary": 0.0, "prob_caption": 0.0, "prob_cot": 0.0, **main}
    return ScheduleConfig(schedule="summary_centric", warmup_epochs=1, main_epochs=1, **probs)


def _epoch_positions(stream: TrainStream, epoch: int) -> list[int]:
    return [b["input_ids"].numel() for b in stream.loader(epoch)]  # packed rows: positions, no padding


def test_probe_measures_the_lengths_the_pipeline_produces(small_shards, tokenizer):
    """A caption-only epoch of all 22 samples (all of them probed) carries exactly the probed mean."""
    stream = make_stream(small_shards, tokenizer, num_workers=0, batch_size=0, batch_tokens=600,
                         schedule=_summary_centric({"prob_caption": 1.0}))
    positions = _epoch_positions(stream, 1)
    assert sum(positions) / len(train_keys()) == pytest.approx(stream.task_lengths["caption"], rel=1e-9)


def test_batch_tokens_give_each_phase_its_batch_size_and_fill_the_budget(small_shards, tokenizer):
    """Summaries are short in this data, captions and CoT links long: the summary phase gets more
    examples per batch, and the batches of both phases carry ~the budget."""
    budget = 600
    stream = make_stream(small_shards, tokenizer, num_workers=0, batch_size=0, batch_tokens=budget,
                         balance_window=2, schedule=_summary_centric({"prob_summary": 1.0}))
    sizes = stream.phase_batch_sizes
    assert sizes["warmup"] < sizes["main"], sizes
    longest = max(stream.task_lengths.values())
    for epoch in (0, 1):
        positions = _epoch_positions(stream, epoch)
        assert len(positions) == stream.num_batches(epoch)
        whole = positions[: 2 * (len(positions) // 2) - 2]  # whole windows, not a worker's short last one
        mean = sum(whole) / len(whole)
        assert budget - longest <= mean <= budget * 1.1, (epoch, sizes, positions)
    # A fixed --batch-size ignores the budget.
    fixed = make_stream(small_shards, tokenizer, num_workers=0, batch_size=3, batch_tokens=budget,
                        schedule=_summary_centric({"prob_summary": 1.0}))
    assert set(fixed.phase_batch_sizes.values()) == {3} and fixed.task_lengths == {}


def test_a_doubled_budget_doubles_the_examples_per_batch(small_shards, tokenizer):
    one, two = (make_stream(small_shards, tokenizer, batch_size=0, batch_tokens=t,
                            schedule=_summary_centric({"prob_summary": 1.0})) for t in (600, 1200))
    for phase, b in one.phase_batch_sizes.items():
        assert 2 * b <= two.phase_batch_sizes[phase] <= 2 * b + 1
