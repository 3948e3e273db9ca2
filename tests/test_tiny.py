"""Tiny Mistral (and Llama / Qwen2) + locally trained tokenizer: loads like a real model dir, round-trips text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralForCausalLM

from benchmarks.make_random_model import mistral_7b_shape_config, shape_config
from models.tasks import build_prompt, tokenize_prompt
from tiny_models.lm import main, make_tiny_lm

torch.set_num_threads(1)


def _cases(json_path):
    data = json.loads(Path(json_path).read_text())
    return data["cases"] if isinstance(data, dict) else data


@pytest.fixture(scope="module")
def loaded(tiny_lm_dir):
    return AutoTokenizer.from_pretrained(tiny_lm_dir), AutoModelForCausalLM.from_pretrained(tiny_lm_dir)


def test_tiny_lm_dir_loads_via_auto_classes(tiny_lm_dir, loaded):
    tokenizer, model = loaded
    assert isinstance(model, MistralForCausalLM)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.vocab_size == len(tokenizer) and not cfg.tie_word_embeddings
    assert (tiny_lm_dir / "model.safetensors").is_file()
    # a class name transformers 4 resolves too (v5 would write its own "TokenizersBackend")
    assert json.loads((tiny_lm_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == \
        (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_forward_backward_and_generate(loaded):
    tokenizer, model = loaded
    ids = tokenizer(["Areas affected...portions of southeast OH"], return_tensors="pt")["input_ids"]
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    model.zero_grad(set_to_none=True)
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert ids.shape[1] < gen.shape[1] <= ids.shape[1] + 4  # may stop early at EOS
    assert torch.equal(gen[:, :ids.shape[1]], ids)


def test_special_tokens_follow_mistral_conventions(loaded):
    tokenizer, _ = loaded
    assert [tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token] == \
        ["<unk>", "<s>", "</s>", "<pad>"]
    assert len({tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 4
    with_special = tokenizer("hail threat")["input_ids"]
    without = tokenizer("hail threat", add_special_tokens=False)["input_ids"]
    assert with_special == [tokenizer.bos_token_id] + without  # BOS, no EOS, like Mistral


def test_tokenizer_round_trips_summaries_and_captions(synthetic_data, loaded):
    tokenizer, _ = loaded
    json_paths, _ = synthetic_data
    cases = _cases(json_paths[-1])
    texts = [cases[0]["global_summary"]] + [el["caption"] for el in cases[0]["elements"][:3]]
    texts.append("Unseen text: 20Z/4 pm EDT ... ünïcödé 🌪  double  spaces\nnew line")
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    # the BPE actually learned the domain: summaries compress well below one token per character
    summary = cases[0]["global_summary"]
    assert len(tokenizer(summary)["input_ids"]) < 0.5 * len(summary)


def test_prompt_template_words_are_single_tokens(loaded):
    tokenizer, _ = loaded
    tail = build_prompt("caption", cond_name="shr6", caption="x").tail
    words = " Describe the map in four sentences".split(" ")[1:]
    ids = tokenizer(" " + " ".join(words), add_special_tokens=False)["input_ids"]
    assert len(ids) == len(words), tokenizer.convert_ids_to_tokens(ids)
    assert "[/INST]" in tail


def test_tokenize_prompt_integration(synthetic_data, loaded):
    tokenizer, _ = loaded
    json_paths, _ = synthetic_data
    case = _cases(json_paths[0])[0]
    el = case["elements"][0]
    prompt = build_prompt("caption", cond_name=el["cond_name"], caption=el["caption"])
    ex = tokenize_prompt(prompt, tokenizer, max_seq_len=512, num_image_tokens=4)
    assert ex.prompt_ids[0] == tokenizer.bos_token_id and ex.target_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex.target_ids[:-1]) == el["caption"]


def test_make_tiny_lm_is_deterministic_and_tolerant(tmp_path):
    """Same texts -> same files; {"cases": ...} documents and broken cases are read tolerantly."""
    doc = {"cases": [{"global_summary": "SUMMARY...Severe storms possible.", "elements": [
        {"image_rel_path": "a.gif", "cond_name": "scp", "caption": "A strong supercell composite."},
        {"cond_name": "scp"}, "not-an-element"]}, {"elements": None}, 7]}
    (tmp_path / "doc.json").write_text(json.dumps(doc))
    a = make_tiny_lm(tmp_path / "a", corpus_json=[tmp_path / "doc.json"], corpus_texts=["extra text"], vocab_size=400)
    b = make_tiny_lm(tmp_path / "b", corpus_json=[tmp_path / "doc.json"], corpus_texts=["extra text"], vocab_size=400)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = make_tiny_lm(tmp_path / "c", corpus_texts=["extra text"], vocab_size=400, seed=1)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_unreadable_corpus_names_the_file(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        make_tiny_lm(tmp_path / "x", corpus_json=[tmp_path / "bad.json"])


def test_cli(synthetic_data, tmp_path):
    json_paths, _ = synthetic_data
    out = main(["--out", str(tmp_path / "cli"), "--gemini-json", *map(str, json_paths), "--vocab-size", "512"])
    assert len(AutoTokenizer.from_pretrained(out)) == 512


def test_mistral_7b_shape():
    cfg = mistral_7b_shape_config()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (4096, 32, 14336)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (32, 8, 32768)
    with torch.device("meta"):
        model = MistralForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == 7_248_023_552  # Mistral-7B-v0.3


@pytest.mark.parametrize("shape,cls,params", [("llama3-8b", "LlamaForCausalLM", 8_030_261_248),
                                              ("qwen2.5-7b", "Qwen2ForCausalLM", 7_615_616_512)])
def test_llama3_8b_and_qwen2_5_7b_shapes(shape, cls, params):
    cfg = shape_config(shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert type(model).__name__ == cls and not cfg.tie_word_embeddings
    assert sum(p.numel() for p in model.parameters()) == params  # the published models' counts
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == (shape == "qwen2.5-7b")  # Qwen2: biased q/k/v
    assert cfg.rope_parameters["rope_theta"] == {"llama3-8b": 5e5, "qwen2.5-7b": 1e6}[shape]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_llama_and_qwen2_load_via_auto_classes_and_generate(arch, tmp_path):
    out = make_tiny_lm(tmp_path / arch, corpus_texts=["Severe storms possible over the plains."], vocab_size=300,
                       pretrain_steps=2, arch=arch)
    tokenizer, model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out)
    cfg = model.config
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.vocab_size == len(tokenizer) and cfg.pad_token_id == tokenizer.pad_token_id
    q = model.model.layers[0].self_attn.q_proj
    if arch == "qwen2":  # Qwen2.5: biased q/k/v, tied embeddings (also after the save/load round trip)
        assert q.bias is not None and cfg.tie_word_embeddings
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:  # Llama 3.1: no bias, llama3 RoPE scaling at theta 5e5, untied head
        assert q.bias is None and not cfg.tie_word_embeddings
        assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.rope_parameters["rope_theta"] == 5e5
    ids = tokenizer(["Severe storms"], return_tensors="pt")["input_ids"]
    gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(gen[:, :ids.shape[1]], ids)
    with pytest.raises(ValueError, match="arch='gpt2'"):
        make_tiny_lm(tmp_path / "x", corpus_texts=["a"], arch="gpt2")


def test_tiny_lm_is_pretrained_on_the_corpus(synthetic_data, loaded, tmp_path):
    """The stand-in behaves like a pretrained LM: it predicts the domain's text far better than
    chance (ln 1024 ~ 6.9), unlike the random model that `pretrain_steps=0` writes."""
    tokenizer, model = loaded
    json_paths, _ = synthetic_data
    el = _cases(json_paths[-1])[0]["elements"][0]
    prompt = build_prompt("caption", cond_name=el["cond_name"], caption=el["caption"], with_image=False)
    ids = tokenizer(prompt.text + prompt.target, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        pretrained = float(model(input_ids=ids, labels=ids).loss)
        random_dir = make_tiny_lm(tmp_path / "random", corpus_json=json_paths, pretrain_steps=0)
        random_model = AutoModelForCausalLM.from_pretrained(random_dir)
        random = float(random_model(input_ids=ids, labels=ids).loss)
    assert random > 6.0 and pretrained < 2.0, (random, pretrained)
