"""PrefixLM on a tiny random Mistral (fp32, CPU): losses vs HF, packing, LoRA, adapters, generation.

The HF-loss and fused-LoRA equalities also run on tiny Llama and Qwen2 (biased q/k/v, tied embeddings)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.collate import TrainItem, collate_generation, collate_train
from models.prefix_lm import (
    ModelConfig,
    PrefixLM,
    Stage2Prefix,
    build_prefix_lm,
    load_adapter_into,
    param_groups,
    save_adapter,
)
from models.tasks import TokenizedExample

LATENT_DIM = 16
NUM_IMAGE_TOKENS = 2
WORDS = ("the map shows wind shear storm summary caption image describe write one low high cape "
         "watch severe front moist dry jet").split()


ARCHS = ["mistral", "llama", "qwen2"]


def make_tiny_lm_dir(out: Path, sliding_window: int | None = None, arch: str = "mistral") -> Path:
    """A tiny random causal LM (MistralForCausalLM; `arch` llama / qwen2: the tiny_models.lm configs at
    the same width) + a word-level tokenizer, saved like a real model dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out)
    if arch != "mistral":
        from tiny_models.lm import TINY_ARCHS

        torch.manual_seed(0)
        TINY_ARCHS[arch].model_class(TINY_ARCHS[arch].config(len(vocab), hidden_size=32)).save_pretrained(out)
        return out
    cfg = MistralConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        sliding_window=sliding_window, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    MistralForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory) -> Path:
    return make_tiny_lm_dir(tmp_path_factory.mktemp("tiny_mistral"))


@pytest.fixture(scope="module", params=ARCHS)
def arch_lm_dir(request, lm_dir, tmp_path_factory) -> Path:
    """The tiny model dir of each supported architecture (Mistral: the module's `lm_dir`)."""
    if request.param == "mistral":
        return lm_dir
    return make_tiny_lm_dir(tmp_path_factory.mktemp(f"tiny_{request.param}"), arch=request.param)


def perturb_trainables(model: PrefixLM, seed: int = 0) -> None:
    """LoRA B starts at zero (adapter = identity): randomise it so the tests see the adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def build(lm_dir, **overrides) -> PrefixLM:
    kwargs = dict(num_image_tokens=NUM_IMAGE_TOKENS, lora_r=4, lora_alpha=8, lora_dropout=0.0, ce_chunk_size=5)
    cfg = ModelConfig(model_path=str(lm_dir), **{**kwargs, **overrides})
    torch.manual_seed(1)
    model, _ = build_prefix_lm(cfg, latent_dim=LATENT_DIM, device="cpu")
    perturb_trainables(model)
    return model.eval()


def ex(task, rest, target, cond=0, seed=0, weight=1.0) -> TrainItem:
    uses_image = task != "text_summary"
    latent = np.random.default_rng(seed).standard_normal(LATENT_DIM).astype(np.float32)
    return TrainItem(TokenizedExample(task, uses_image, [1] + rest, target + [2], True),
                     latent if uses_image else None, cond, loss_weight=weight)


def items():
    return [ex("caption", [3, 4, 5], [6, 7, 8, 9], cond=1, seed=1),
            ex("text_summary", [10, 11, 12, 13, 14], [15, 16, 17], seed=2),
            ex("cot", [5, 6], [18, 19, 20, 4, 5], cond=4, seed=3),
            ex("summary", [7, 8, 9, 10], [11, 12], cond=9, seed=4)]


def test_packed_loss_equals_padded_loss_and_hf(arch_lm_dir):
    model = build(arch_lm_dir)
    packed = collate_train(items(), 0, NUM_IMAGE_TOKENS, packed=True, pad_to_multiple_of=8)
    padded = collate_train(items(), 0, NUM_IMAGE_TOKENS, packed=False)
    with torch.no_grad():
        out_p, out_d = model(packed), model(padded)
        # HF's own loss on the same embeddings (padded rows, its own label shift and masking).
        hf = model.lm(inputs_embeds=model.embed(padded), attention_mask=padded["attention_mask"],
                      position_ids=padded["position_ids"], labels=padded["labels"])
    assert out_p.num_loss_tokens.item() == packed["num_target_tokens"] == padded["num_target_tokens"]
    torch.testing.assert_close(out_p.token_losses, out_d.token_losses, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_p.loss, out_d.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_p.loss, hf.loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_p.task_loss_sum, out_d.task_loss_sum, atol=1e-4, rtol=0)
    assert out_p.task_token_count.tolist() == [5.0, 3.0, 6.0, 4.0]  # targets + EOS, TASKS order
    torch.testing.assert_close(out_p.task_loss_sum.sum(), out_p.loss_sum, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fused", ["none", "chunked"])
@pytest.mark.parametrize("attn", ["packed_sdpa", "sdpa", "eager"])
def test_backends_and_loss_kernels_agree(lm_dir, attn, fused):
    """Stock HF attention detects packing from position_ids; every combination gives one loss."""
    ref = build(lm_dir)
    model = build(lm_dir, attn_implementation=attn, fused_kernels=fused)
    batch = collate_train(items(), 0, NUM_IMAGE_TOKENS)
    with torch.no_grad():
        torch.testing.assert_close(model(batch).loss, ref(batch).loss, atol=1e-5, rtol=0)


def test_gradients_match_between_packed_and_padded(lm_dir):
    grads = []
    for packed in (True, False):
        model = build(lm_dir)
        model(collate_train(items(), 0, NUM_IMAGE_TOKENS, packed=packed)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4, msg=n)
    assert any(("prefix.proj" in n and g.abs().sum() > 0) for n, g in grads[0].items())


def test_loss_free_items_contribute_nothing(lm_dir):
    model = build(lm_dir)
    base = items()[:2]
    with_dup = base + [ex("cot", [5, 6], [18, 19, 20], cond=4, seed=3, weight=0.0)]
    outs = []
    for its in (base, with_dup):
        model.zero_grad()
        out = model(collate_train(its, 0, NUM_IMAGE_TOKENS))
        out.loss.backward()
        outs.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-6, rtol=0)
    for n, g in outs[0][1].items():
        torch.testing.assert_close(g, outs[1][1][n], atol=1e-6, rtol=1e-5, msg=n)
    # A batch of only loss-free duplicates gives loss 0 (not NaN) and still backpropagates.
    dup_only = model(collate_train(with_dup[2:], 0, NUM_IMAGE_TOKENS))
    assert dup_only.loss.item() == 0.0
    dup_only.loss.backward()


def test_only_lora_and_prefix_are_trainable(lm_dir):
    model = build(lm_dir)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(("lora_" in n) or n.startswith("prefix.") for n in trainable)
    assert any(n.startswith("prefix.") for n in trainable)
    # Every target module got an adapter; nothing else of the base model trains.
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert any(f"{proj}.lora_A" in n for n in trainable), proj
    groups = param_groups(model)
    assert len(groups["lora_and_prefix"]) == len(trainable) and groups["stage1_tail"] == []


def test_stage1_tail_gets_its_own_group_and_is_used(lm_dir):
    class MeanTail(torch.nn.Module):  # stand-in with the Stage1Tail contract: [N, T, D] -> [N, D]
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(LATENT_DIM, LATENT_DIM)

        def forward(self, tokens):
            return self.lin(tokens.mean(1))

    cfg = ModelConfig(model_path=str(lm_dir), num_image_tokens=NUM_IMAGE_TOKENS, lora_r=4)
    model, _ = build_prefix_lm(cfg, latent_dim=LATENT_DIM, tail=MeanTail(), device="cpu")
    groups = param_groups(model)
    assert len(groups["stage1_tail"]) == 2
    its = items()
    for it in its:
        if it.example.uses_image:
            it.block_tokens = np.random.default_rng(0).standard_normal((3, LATENT_DIM)).astype(np.float32)
    model(collate_train(its, 0, NUM_IMAGE_TOKENS)).loss.backward()
    assert model.prefix.tail.lin.weight.grad.abs().sum() > 0


def test_prefix_scale_matches_token_embeddings(lm_dir):
    model = build(lm_dir)
    batch = collate_train(items(), 0, NUM_IMAGE_TOKENS)
    with torch.no_grad():
        prefix = model.prefix(batch["latents"] * 50.0, batch["cond_ids"])  # latent scale must not matter
    emb_std = model.base_lm.get_input_embeddings().weight.std().item()
    assert prefix.shape == (3, NUM_IMAGE_TOKENS + 1, 32)
    assert 0.5 < prefix.std().item() / emb_std < 2.0


def test_adapter_roundtrip_with_plain_peft(lm_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = build(lm_dir)
    save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()
    ids = torch.tensor([[1, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        ours = model.lm(input_ids=ids).logits
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm_dir), tmp_path).eval()
        torch.testing.assert_close(plain(input_ids=ids).logits, ours, atol=1e-6, rtol=0)
        # ... and load_adapter_into restores it into a freshly built model.
        fresh = build(lm_dir)
        perturb_trainables(fresh, seed=5)
        assert not torch.allclose(fresh.lm(input_ids=ids).logits, ours)
        load_adapter_into(fresh, tmp_path)
        torch.testing.assert_close(fresh.lm(input_ids=ids).logits, ours, atol=1e-6, rtol=0)


def test_prefix_save_load_and_seed_format(lm_dir, tmp_path):
    model = build(lm_dir)
    model.prefix.save(tmp_path / "new")
    loaded = Stage2Prefix.load(tmp_path / "new")
    lat, cond = torch.randn(2, LATENT_DIM), torch.tensor([0, 19])
    with torch.no_grad():
        torch.testing.assert_close(loaded(lat, cond), model.prefix(lat, cond))
    # The seed wrote a torch state dict (.pt); it had no input LayerNorm.
    seed_state = {k: v for k, v in model.prefix.state_dict().items() if not k.startswith("latent_norm")}
    (tmp_path / "seed").mkdir()
    torch.save({"state_dict": seed_state}, tmp_path / "seed" / "stage2_prefix_modules.pt")
    seed = Stage2Prefix.load(tmp_path / "seed")
    assert (seed.num_image_tokens, seed.hidden_size, seed.latent_dim) == (NUM_IMAGE_TOKENS, 32, LATENT_DIM)
    torch.testing.assert_close(seed.proj[2].weight, model.prefix.proj[2].weight)
    with pytest.raises(FileNotFoundError, match="stage2_prefix_modules"):
        Stage2Prefix.load(tmp_path)


def test_batched_generation_equals_one_at_a_time(lm_dir):
    model = build(lm_dir)
    its = items()
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    batched = model.generate(collate_generation(its, 0, NUM_IMAGE_TOKENS), **kw)
    assert model.attn_implementation == "prefix_lm_packed_sdpa"  # restored after generate
    for r, it in enumerate(its):
        single = model.generate(collate_generation([it], 0, NUM_IMAGE_TOKENS), **kw)
        assert batched[r].tolist() == single[0].tolist(), r


# ---------------------------------------------------------------------------------------------
# The fused LoRA forward (models.lora_fused) against PEFT's own forward
# ---------------------------------------------------------------------------------------------

def _lora_layers(model: PrefixLM):
    from peft.tuners.lora import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]


def _loss_and_grads(model: PrefixLM, batch: dict):
    model.zero_grad(set_to_none=True)
    loss = model(batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_lora_equals_peft_values_and_grads(arch_lm_dir):
    """Also on Qwen2, whose q/k/v projections carry a bias (added once, in the base layer)."""
    from models.lora_fused import fused_lora_linear_class

    fused, plain = build(arch_lm_dir), build(arch_lm_dir, fused_lora=False)
    layers = _lora_layers(fused)
    assert len(layers) == 2 * 7 and all(type(m) is fused_lora_linear_class() for m in layers)
    assert not any(type(m) is fused_lora_linear_class() for m in _lora_layers(plain))
    assert fused.state_dict().keys() == plain.state_dict().keys()  # same names: standard PEFT
    batch = collate_train(items(), 0, NUM_IMAGE_TOKENS)
    loss_f, grads_f = _loss_and_grads(fused.train(), batch)
    loss_p, grads_p = _loss_and_grads(plain.train(), batch)
    torch.testing.assert_close(loss_f, loss_p, atol=1e-6, rtol=0)
    assert grads_f.keys() == grads_p.keys() and any("lora_A" in n for n in grads_f)
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], atol=1e-6, rtol=1e-5, msg=name)


def test_fused_lora_on_a_biased_projection_equals_peft():
    """A biased base Linear (Qwen2's q/k/v): the fused forward adds the base bias exactly once and
    equals PEFT's own forward and its formula, values and gradients (fp32, tight tolerance)."""
    from peft import LoraConfig, get_peft_model

    from models.lora_fused import _lora_linear_class, fuse_lora_linears

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(16, 24, bias=True)

        def forward(self, x):
            return self.q_proj(x)

    torch.manual_seed(0)
    model = get_peft_model(Attn(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"]))
    assert fuse_lora_linears(model) == 1
    layer = model.base_model.model.q_proj
    with torch.no_grad():
        layer.base_layer.bias.copy_(torch.randn(24) * 3.0)  # large, so a double or missing bias shows
        layer.lora_B["default"].weight.copy_(torch.randn(24, 4) * 0.5)
    x = torch.randn(2, 5, 16, requires_grad=True)
    fused = layer(x)
    peft = _lora_linear_class().forward(layer, x)  # PEFT's unfused forward of the same layer
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    formula = x @ layer.base_layer.weight.t() + layer.base_layer.bias + (x @ a.t() @ b.t()) * layer.scaling["default"]
    torch.testing.assert_close(fused, peft, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fused, formula, atol=1e-5, rtol=1e-6)
    grads = []
    for out in (fused, peft):
        g = torch.autograd.grad(out.pow(2).sum(), [x, a, b])
        grads.append(g)
    for gf, gp in zip(*grads):
        torch.testing.assert_close(gf, gp, atol=1e-5, rtol=1e-6)


def test_fused_lora_adds_in_place_without_view_replay():
    """The LoRA term is added in place into the base GEMM's own output. Adding into a view of it
    instead makes autograd copy the whole output gradient back in backward (AsStrided/CopySlices,
    a slower 7B backward: README). The graph of the output must hold no such node."""
    from peft import LoraConfig, get_peft_model

    from models.lora_fused import fuse_lora_linears

    class Proj(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(16, 24, bias=False)

        def forward(self, x):
            return self.q_proj(x)

    torch.manual_seed(0)
    model = get_peft_model(Proj(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj"]))
    assert fuse_lora_linears(model) == 1
    out = model(torch.randn(1, 7, 16, requires_grad=True))
    assert out.shape == (1, 7, 24)
    names, todo, seen = set(), [out.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo += [nxt for nxt, _ in fn.next_functions]
    assert "AddmmBackward0" in names  # the in-place addmm_ is in the graph
    assert not {n for n in names if "AsStrided" in n or "CopySlices" in n}, sorted(names)


def test_fused_lora_dropout_is_shared_per_input_and_has_peft_distribution(lm_dir, monkeypatch):
    """One mask per distinct input tensor (q/k/v share one), Bernoulli(1-p) with 1/(1-p) scaling;
    a new input draws a new mask; eval mode has no dropout."""
    import torch.nn.functional as F

    from models.lora_fused import shared_dropout_cache

    drawn = []
    real_dropout = F.dropout

    def recording_dropout(x, p=0.5, training=True, inplace=False):
        out = real_dropout(x, p, training, inplace)
        drawn.append(out.detach().clone())
        return out

    monkeypatch.setattr(F, "dropout", recording_dropout)
    p = 0.25
    model = build(lm_dir, lora_dropout=p).train()
    attn = model.decoder.layers[0].self_attn
    x = torch.ones(64, 32, 32)
    with torch.no_grad():
        y_q, y_k, y_v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    assert len(drawn) == 1  # one dropout for the three readers of x
    kept = drawn[0] != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01  # 65k draws: ~4 sigma
    torch.testing.assert_close(drawn[0][kept], torch.full_like(drawn[0][kept], 1 / (1 - p)))
    # each output is exactly PEFT's formula on that shared dropped input
    for layer, y in ((attn.q_proj, y_q), (attn.k_proj, y_k), (attn.v_proj, y_v)):
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        want = layer.base_layer(x) + (drawn[0] @ a.t() @ b.t()) * layer.scaling["default"]
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        attn.q_proj(x.clone())
    assert len(drawn) == 2 and not torch.equal(drawn[0], drawn[1])  # another tensor, another mask
    shared_dropout_cache(model.lm).clear()
    model.eval()
    with torch.no_grad():
        attn.q_proj(x)
    assert len(drawn) == 2  # eval: no dropout


def test_fused_lora_with_dropout_trains_and_checkpointing_matches(lm_dir):
    """Dropout + activation checkpointing: the recompute redraws the same masks (RNG restored),
    so the gradients equal those without checkpointing under the same seed."""
    batch = collate_train(items(), 0, NUM_IMAGE_TOKENS)
    results = []
    for ckpt in (False, True):
        model = build(lm_dir, lora_dropout=0.3, gradient_checkpointing=ckpt).train()
        torch.manual_seed(123)
        results.append(_loss_and_grads(model, batch))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_one_node_lora_groups_under_checkpointing_match(lm_dir):
    """Packed adapters (the engines' default, one autograd node per sibling group) with dropout and
    activation checkpointing: the recompute redraws the same masks, so the gradients equal those
    without checkpointing under the same seed."""
    from models.flat_lora import attach_flat_lora

    batch = collate_train(items(), 0, NUM_IMAGE_TOKENS)
    results = []
    for ckpt in (False, True):
        model = build(lm_dir, lora_dropout=0.3, gradient_checkpointing=ckpt).train()
        attach_flat_lora(model)
        torch.manual_seed(123)
        results.append(_loss_and_grads(model, batch))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=0)
    assert "flat_lora.flat" in grads_a and grads_a["flat_lora.flat"].abs().sum() > 0
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5, msg=name)


def test_partial_gradient_checkpointing_flags_only_first_layers(lm_dir):
    model = build(lm_dir, gradient_checkpointing=True, gradient_checkpointing_layers=1)
    assert [layer.gradient_checkpointing for layer in model.decoder.layers] == [True, False]
    ref = build(lm_dir)
    batch = collate_train(items(), 0, NUM_IMAGE_TOKENS)
    loss_c, grads_c = _loss_and_grads(model.train(), batch)
    loss_r, grads_r = _loss_and_grads(ref.train(), batch)
    torch.testing.assert_close(loss_c, loss_r, atol=1e-6, rtol=0)
    for name in grads_r:
        torch.testing.assert_close(grads_c[name], grads_r[name], atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_base_gets_bf16_adapters_and_standard_peft_files(lm_dir, tmp_path):
    """On a bf16 base (the GPU default) the adapters are bf16 too (no fp32 LoRA GEMMs/casts), the
    fused path runs, and the saved adapter loads in plain PEFT with the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = build(lm_dir, precision="bf16")
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.bfloat16 for p in lora.values())
    batch = collate_train(items(), 0, NUM_IMAGE_TOKENS)
    model.train()(batch).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in lora.values())
    save_adapter(model, tmp_path)
    ids = torch.tensor([[1, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        ours = model.eval().lm(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.bfloat16)
        plain = PeftModel.from_pretrained(base, tmp_path, autocast_adapter_dtype=False).eval()
        torch.testing.assert_close(plain(input_ids=ids).logits, ours, atol=2e-2, rtol=0)


# ------------------------------------------------------------------------------------------------
# --model-path: the directory is checked first, the error names what is missing

def _model_dir_without(lm_dir: Path, out: Path, *patterns: str) -> Path:
    import shutil

    shutil.copytree(lm_dir, out)
    for pattern in patterns:
        for f in out.glob(pattern):
            f.unlink()
    return out


@pytest.mark.parametrize("removed,missing", [
    (("tokenizer*",), "has no tokenizer files (tokenizer.json, tokenizer.model or tokenizer_config.json)"),
    (("config.json",), "has no config.json"),
    (("*.safetensors",), "has no weights (*.safetensors, *.bin or an *.index.json of them)"),
])
def test_a_model_dir_lacking_a_part_says_which(lm_dir, tmp_path, removed, missing):
    from models.prefix_lm import ModelDirError

    bad = _model_dir_without(lm_dir, tmp_path / "model", *removed)
    with pytest.raises(ModelDirError) as info:
        build_prefix_lm(ModelConfig(model_path=str(bad)), latent_dim=LATENT_DIM, device="cpu")
    assert f"model directory {str(bad)!r} {missing}; expected a local Hugging Face model directory" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_a_missing_empty_or_wrong_model_path_is_named(tmp_path):
    cases = [(tmp_path / "nowhere", "does not exist"), (tmp_path / "file.txt", "is not a directory"),
             (tmp_path / "empty", "has no config.json; no weights (*.safetensors, *.bin or an *.index.json of "
                                  "them); no tokenizer files (tokenizer.json, tokenizer.model or tokenizer_config.json)")]
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    for path, problem in cases:
        with pytest.raises(FileNotFoundError, match="expected a local Hugging Face model directory") as info:
            build_prefix_lm(ModelConfig(model_path=str(path)), latent_dim=LATENT_DIM, device="cpu")
        assert f"model directory {str(path)!r} {problem};" in str(info.value)


def test_load_tokenizer_checks_for_tokenizer_files_only(lm_dir, tmp_path):
    from models.prefix_lm import ModelDirError, load_tokenizer

    # A checkpoint dir holds the tokenizer but no LM: enough for load_tokenizer.
    tok_only = _model_dir_without(lm_dir, tmp_path / "ckpt", "config.json", "*.safetensors")
    assert load_tokenizer(tok_only).pad_token_id is not None
    bare = _model_dir_without(lm_dir, tmp_path / "bare", "tokenizer*", "special_tokens_map.json")
    with pytest.raises(ModelDirError, match=f"tokenizer directory '{bare}' has no tokenizer files"):
        load_tokenizer(bare)


def _saved_bytes_loss_grads(model: PrefixLM, batch: dict):
    """Bytes autograd saves for backward, the loss and the trainable gradients of one step."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch)
    out.loss.backward()
    return saved[0], out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_sibling_projections_share_one_low_rank_gemm(lm_dir, monkeypatch):
    """With packed adapters (flat LoRA), q/k/v and gate/up compute `dropout(x) @ A^T` in one GEMM per
    group: the same loss and gradients as one GEMM per projection (fp32, dropout on, same seed), and
    the group GEMM runs exactly twice per decoder layer."""
    from models import lora_fused
    from models.flat_lora import attach_flat_lora

    calls = []
    original = lora_fused.SharedDropout.group_low_rank

    def counting(self, xd, first_a, weights):
        miss = self._low_rank is None or self._low_rank[0] is not xd or self._low_rank[1] is not first_a
        pieces = original(self, xd, first_a, weights)
        if miss and pieces is not None:
            calls.append(len(pieces))
        return pieces

    monkeypatch.setattr(lora_fused.SharedDropout, "group_low_rank", counting)
    batch = collate_train(items()[:3], 0, NUM_IMAGE_TOKENS)
    results = []
    for grouped in (True, False):
        model = build(lm_dir, lora_dropout=0.1).train()
        attach_flat_lora(model)
        _set_one_node(model, False)  # the per-layer ops (the one-node path is tested below)
        if not grouped:
            for m in model.modules():
                if getattr(m, "_lora_siblings", ()):
                    m._lora_siblings = ()
        torch.manual_seed(7)
        results.append(_saved_bytes_loss_grads(model, batch)[1:])
        if grouped:
            layers = model.base_lm.config.num_hidden_layers
            assert sorted(calls) == sorted([3, 2] * layers), calls
            calls.clear()
    assert not calls  # ungrouped: the group path never ran
    (loss_g, grads_g), (loss_u, grads_u) = results
    torch.testing.assert_close(loss_g, loss_u, atol=1e-6, rtol=0)
    assert grads_g.keys() == grads_u.keys() and "flat_lora.flat" in grads_g
    for name in grads_u:
        torch.testing.assert_close(grads_g[name], grads_u[name], atol=1e-6, rtol=1e-5, msg=name)


def _set_one_node(model: PrefixLM, on: bool) -> None:
    for m in _lora_layers(model):
        m._lora_one_node = on


def test_one_autograd_node_per_sibling_group_equals_the_per_layer_ops(lm_dir, monkeypatch):
    """Eager training with packed adapters runs each sibling group (q/k/v, gate/up) and each single
    projection (o, down) as one models.lora_autograd node: the same loss and gradients as the
    per-layer autograd ops (fp32, dropout on, the same masks), and exactly four such nodes per layer."""
    import torch.nn.functional as F

    from models import lora_fused
    from models.flat_lora import attach_flat_lora

    # Both paths draw their masks with native_dropout (as F.dropout does on a GPU), so one seed gives
    # both the same masks.
    monkeypatch.setattr(F, "dropout", lambda x, p=0.5, training=True, inplace=False:
                        torch.native_dropout(x, p, True)[0] if training else x)
    groups = []
    real = lora_fused.lora_group_linear

    def counting(x, bases, *args):
        groups.append(len(bases))
        return real(x, bases, *args)

    monkeypatch.setattr(lora_fused, "lora_group_linear", counting)
    batch = collate_train(items()[:3], 0, NUM_IMAGE_TOKENS)
    results = []
    for one_node in (True, False):
        model = build(lm_dir, lora_dropout=0.1).train()
        attach_flat_lora(model)
        _set_one_node(model, one_node)
        torch.manual_seed(7)
        results.append(_saved_bytes_loss_grads(model, batch)[1:])
        layers = model.base_lm.config.num_hidden_layers
        assert sorted(groups) == sorted([3, 2, 1, 1] * layers if one_node else []), groups
        groups.clear()
    (loss_n, grads_n), (loss_o, grads_o) = results
    torch.testing.assert_close(loss_n, loss_o, atol=1e-6, rtol=0)
    assert grads_n.keys() == grads_o.keys() and "flat_lora.flat" in grads_n
    for name in grads_o:
        torch.testing.assert_close(grads_n[name], grads_o[name], atol=1e-6, rtol=1e-5, msg=name)
    assert grads_n["flat_lora.flat"].abs().sum() > 0


def _set_lora_dropout(model: PrefixLM, p: float) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


@pytest.mark.slow
def test_compiled_layers_equal_eager_and_share_one_dropout_mask_per_input(lm_dir):
    """--compile: the same losses and LoRA gradients as the eager layers (fp32, two row lengths, the
    flat LoRA tensor an engine packs); and the LoRA dropout costs compiled layers no more saved memory
    than the eager per-layer ops (q/k/v and gate/up share one dropped input inside the graph, as in
    eager), and the eager one-node groups less."""
    from models.flat_lora import attach_flat_lora

    eager, compiled = (build(lm_dir, lora_dropout=0.1, compile=c).train() for c in ("off", "on"))
    for m in (eager, compiled):
        attach_flat_lora(m)
        _set_lora_dropout(m, 0.0)
    for n in (2, 4):
        batch = collate_train(items()[:n], 0, NUM_IMAGE_TOKENS)
        _, loss_e, grads_e = _saved_bytes_loss_grads(eager, batch)
        _, loss_c, grads_c = _saved_bytes_loss_grads(compiled, batch)
        torch.testing.assert_close(loss_c, loss_e, atol=1e-6, rtol=0)
        assert grads_c.keys() == grads_e.keys() and "flat_lora.flat" in grads_c
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-5, rtol=1e-5, msg=name)

    batch = collate_train(items(), 0, NUM_IMAGE_TOKENS)
    extra = {}
    for name, m, one_node in (("one node", eager, True), ("eager ops", eager, False), ("compiled", compiled, True)):
        _set_one_node(m, one_node)
        _set_lora_dropout(m, 0.0)
        without = _saved_bytes_loss_grads(m, batch)[0]
        _set_lora_dropout(m, 0.1)
        extra[name] = _saved_bytes_loss_grads(m, batch)[0] - without
    # the one-node groups keep a 1-byte mask per input element (the dropped input replaces the input)
    assert 0 < extra["compiled"] <= extra["eager ops"] and 0 < extra["one node"] < extra["eager ops"], extra
