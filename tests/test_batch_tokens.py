"""--batch-tokens auto (trainer/batch_tokens.py): the probe's arithmetic, its fall-backs, and the
sync-free pieces of the step it sizes (prefix splice by index, the Liger path's loss)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from models import prefix_lm
from models.collate import IGNORE_INDEX
from trainer import batch_tokens as bt
from trainer.data import DEFAULT_BATCH_TOKENS, DataConfig

GIB = 2**30


class Trainable(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n))
        self.frozen = nn.Parameter(torch.zeros(3), requires_grad=False)


def fake_peak(static: float, per_token: float, seen: list):
    """A model whose peak is exactly static + per_token * (positions of the batch)."""
    def peak(model, batch, device, dtype):
        tokens = batch["input_ids"].numel()
        seen.append(tokens)
        return int(static + per_token * tokens)
    return peak


def probe(peak, total=100 * GIB, fraction=0.85, trainable=1000, seq_len=256):
    return bt.probe_batch_tokens(Trainable(trainable), seq_len=seq_len, num_image_tokens=4, latent_dim=8,
                                 vocab_size=50, pad_id=0, device=torch.device("cpu"), dtype=torch.float32,
                                 memory_fraction=fraction, total_bytes=total, peak_bytes=peak)


def test_probe_picks_the_largest_budget_under_the_target():
    seen = []
    static, per_token, trainable = 10 * GIB, 4 * 2**20, 10**6  # 4 MiB per token
    choice = probe(fake_peak(static, per_token, seen), trainable=trainable)
    engine = trainable * bt.ENGINE_BYTES_PER_TRAINABLE
    target = 0.85 * 100 * GIB
    assert choice.tokens % bt.AUTO_ROUND == 0
    assert static + per_token * choice.tokens + engine <= target  # fits...
    assert static + per_token * (choice.tokens + bt.AUTO_ROUND) + engine > target  # ...and is the largest that does
    assert seen[:2] == [4 * 256, 16 * 256] and seen[2] == choice.tokens  # two probes + the check
    assert choice.detail["probe_mib_per_1k_tokens"] == pytest.approx(4096, rel=1e-3)


def test_probe_is_capped_and_refuses_when_nothing_fits():
    assert probe(fake_peak(GIB, 1024, [])).tokens == bt.AUTO_MAX_TOKENS
    with pytest.raises(RuntimeError, match="not even one 256-token example fits"):
        probe(fake_peak(90 * GIB, 2**20, []))


def test_probe_shrinks_when_the_check_exceeds_the_line():
    """The check at the chosen size sees more than the two probes predicted (fragmentation): shrink by 10%."""
    seen = []
    line = fake_peak(10 * GIB, 4 * 2**20, seen)

    def bumpy(model, batch, device, dtype):
        extra = 3 * GIB if batch["input_ids"].numel() > 16 * 256 else 0
        return line(model, batch, device, dtype) + extra

    choice = probe(bumpy)
    assert len(seen) >= 4 and seen[3] < seen[2]
    assert 10 * GIB + 4 * 2**20 * choice.tokens + 3 * GIB + 1000 * bt.ENGINE_BYTES_PER_TRAINABLE <= 0.85 * 100 * GIB


def test_probe_batch_is_a_packed_batch_of_full_length_image_examples():
    b = bt.probe_batch(1024, 256, 4, 8, 50, 0)
    assert b["input_ids"].shape == (1, 1024) and b["latents"].shape == (4, 8)
    assert b["cu_seqlens"].tolist() == [0, 256, 512, 768, 1024]
    assert (b["labels"] != IGNORE_INDEX).sum() > 900


def test_resolution_order():
    cpu = torch.device("cpu")
    fixed = DataConfig(batch_tokens="2048")
    assert bt.resolve_batch_tokens(fixed, None, cpu, torch.float32, resumed=9999).tokens == 2048
    auto = DataConfig()
    assert auto.fixed_batch_tokens() is None
    assert bt.resolve_batch_tokens(auto, None, cpu, torch.float32, resumed=12288).record() == {
        "batch_tokens": 12288, "batch_tokens_how": "resumed"}
    assert bt.resolve_batch_tokens(auto, None, cpu, torch.float32, resumed=None).tokens == DEFAULT_BATCH_TOKENS
    with pytest.raises(ValueError, match="--batch-tokens must be 'auto' or a whole number"):
        DataConfig(batch_tokens="lots").validate()
    with pytest.raises(ValueError, match="must be >= --max-seq-len"):
        DataConfig(batch_tokens="100").validate()


def test_prefix_splice_by_index_equals_masked_scatter():
    """The sync-free splice (index_copy at collate's prefix_index) gives masked_scatter's values and gradients."""
    torch.manual_seed(0)
    b = bt.probe_batch(768, 128, 4, 8, 50, 0)
    emb = nn.Embedding(50, 16)
    prefix = prefix_lm.Stage2Prefix(8, 16, 4, 20)

    class LM(nn.Module):
        def get_input_embeddings(self):
            return emb

    results = []
    for use_index in (True, False):
        batch = dict(b) if use_index else {k: v for k, v in b.items() if k != "prefix_index"}
        prefix.zero_grad(set_to_none=True)
        out = prefix_lm.embed_with_prefix(LM(), prefix, batch)
        (out * torch.linspace(0, 1, out.numel()).view(out.shape)).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in prefix.parameters() if p.grad is not None]))
    (a, ga), (m, gm) = results
    torch.testing.assert_close(a, m, rtol=0, atol=0)
    assert len(ga) == len(gm) > 0
    for x, y in zip(ga, gm):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    bad = dict(b, prefix_index=b["prefix_index"][:-1])
    with pytest.raises(ValueError, match="prefix slots"):
        prefix_lm.embed_with_prefix(LM(), prefix, bad)


def test_liger_path_takes_the_sync_free_loss(monkeypatch):
    """fused_kernels=liger: Liger's layer kernels, but the chunked linear+CE (Liger's fused one syncs)."""
    calls = []
    monkeypatch.setattr(prefix_lm.kernels, "liger_linear_cross_entropy", lambda *a, **k: calls.append("flce"))
    monkeypatch.setattr(prefix_lm.kernels, "linear_cross_entropy",
                        lambda h, w, labels, chunk, bias=None: calls.append("chunked") or torch.zeros(len(labels)))
    for impl, expected in (("liger", "chunked"), ("liger_flce", "flce"), ("chunked", "chunked")):
        model = prefix_lm.PrefixLM.__new__(prefix_lm.PrefixLM)
        nn.Module.__init__(model)
        model.loss_impl, model.ce_chunk_size = impl, 16
        model.__dict__["_head"] = nn.Linear(4, 5, bias=False)
        monkeypatch.setattr(prefix_lm.PrefixLM, "base_lm", property(lambda self: type("B", (), {
            "get_output_embeddings": lambda _s: self.__dict__["_head"]})()))
        calls.clear()
        model._per_token_ce(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
        assert calls == [expected], impl


def test_sharded_models_are_not_probed(monkeypatch):
    """An FSDP2 (meta-built) model runs only inside its engine: auto falls back to the default."""
    monkeypatch.setattr(bt, "probe_batch_tokens", lambda *a, **k: pytest.fail("probed a sharded model"))
    with torch.device("meta"):
        model = Trainable(10)
    choice = bt.resolve_batch_tokens(DataConfig(), model, torch.device("cuda"), torch.bfloat16, resumed=None)
    assert (choice.tokens, choice.how) == (DEFAULT_BATCH_TOKENS, "sharded-default")
