"""full_scale.data / models / logprobs: loading, validation, tofu-mini, pairing, masking token by token."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from full_scale import data as D
from full_scale.logprobs import sequence_logprobs, token_logits
from full_scale.models import TINY_SIZES, count_parameters, load_model, save_checkpoint, tiny_llama
from npo_sim.runio import UserError


@pytest.fixture(scope="module")
def tiny(tofu_data_dir):
    torch.manual_seed(0)
    return load_model("tiny-llama:1m", device="cpu", data_dir=tofu_data_dir)


# ---------------------------------------------------------------------------------------- loading
def test_resolve_data_dir(tofu_data_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("NPO_TOFU_DIR", raising=False)
    with pytest.raises(UserError, match="NPO_TOFU_DIR"):
        D.resolve_data_dir(None)
    with pytest.raises(UserError, match="no full.json"):
        D.resolve_data_dir(tmp_path)
    monkeypatch.setenv("NPO_TOFU_DIR", str(tofu_data_dir))
    assert D.resolve_data_dir(None) == tofu_data_dir


def test_load_split_sizes_and_kinds(tofu_data_dir):
    full = D.load_split("full", tofu_data_dir)
    f10 = D.load_split("forget10", tofu_data_dir)
    r90 = D.load_split("retain90", tofu_data_dir)
    assert len(full) == 4000 and len(f10) == 400 and len(r90) == 3600
    assert f10 == full[-400:] and r90 == full[:3600]
    assert all(len(r["perturbed_answer"]) == 5 for r in D.load_split("forget10_perturbed", tofu_data_dir))
    assert all(len(r["perturbed_answer"]) == 3 for r in D.load_split("world_facts_perturbed", tofu_data_dir))
    idk = D.load_split("idontknow", tofu_data_dir)
    assert len(idk) == 100 and all(isinstance(s, str) and s for s in idk)


def _bad_dir(tofu_data_dir, tmp_path, name, lines):
    for f in tofu_data_dir.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / name).unlink(missing_ok=True)
    (tmp_path / name).write_text("".join(line + "\n" for line in lines))
    return tmp_path


def test_validation_names_file_line_and_problem(tofu_data_dir, tmp_path):
    ok = json.dumps({"question": "q?", "answer": "a."})
    d = _bad_dir(tofu_data_dir, tmp_path, "forget01.json", [ok, '{"question": "q", "answer": ', ok])
    with pytest.raises(UserError, match=r"forget01\.json:2: malformed JSON"):
        D.load_split("forget01", d)
    (d / "forget01.json").write_text(ok + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(UserError, match=r"forget01\.json:2: missing field 'answer'"):
        D.load_split("forget01", d)
    (d / "forget01.json").write_text(json.dumps({"question": " ", "answer": "a"}) + "\n")
    with pytest.raises(UserError, match=r":1: field 'question' must be a non-empty string"):
        D.load_split("forget01", d)
    row = {"question": "q", "answer": "a", "paraphrased_answer": "p", "perturbed_answer": ["x"] * 4}
    (d / "forget10_perturbed.json").unlink()
    (d / "forget10_perturbed.json").write_text(json.dumps(row) + "\n")
    with pytest.raises(UserError, match="has 4 answers, expected 5"):
        D.load_split("forget10_perturbed", d)
    (d / "forget05.json").unlink()
    (d / "forget05.json").write_text("\n")
    with pytest.raises(UserError, match="no rows"):
        D.load_split("forget05", d)


def test_unknown_split_and_source(tofu_data_dir):
    with pytest.raises(UserError, match="unknown split 'forget11'.*forget10"):
        D.load_split("forget11", tofu_data_dir)
    with pytest.raises(UserError, match="unknown data source"):
        D.load_split("full", tofu_data_dir, source="ftp")


def test_hub_source_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="could not load locuslab/TOFU 'forget10' from the Hugging Face hub"):
        D.load_split("forget10", source="hub")


# ---------------------------------------------------------------------------------------- tofu-mini
@pytest.mark.parametrize("name,n_authors", [("mini-forget10", 2), ("mini-forget20", 4), ("forget50", 10)])
def test_mini_splits_are_the_last_authors_of_forget10(tofu_data_dir, name, n_authors):
    full = D.load_split("full", tofu_data_dir)
    forget, retain = D.mini_splits(name, tofu_data_dir)
    assert len(forget) == 20 * n_authors and len(forget) + len(retain) == 400
    assert [(r["question"], r["answer"]) for r in forget] == \
        [(r["question"], r["answer"]) for r in full[4000 - 20 * n_authors:]]
    assert [r["question"] for r in retain] == [r["question"] for r in full[3600:4000 - 20 * n_authors]]
    assert all(len(r["perturbed_answer"]) == 5 and r["paraphrased_answer"] for r in forget)


def test_mini_corpus_adds_general_knowledge(tofu_data_dir):
    full = D.mini_finetune_corpus("full", tofu_data_dir)
    ret = D.mini_finetune_corpus("retain90", tofu_data_dir)
    n_general = len(D.load_split("real_authors", tofu_data_dir)) + len(D.load_split("world_facts", tofu_data_dir))
    assert n_general == 217 and len(full) == 400 + n_general and len(ret) == 360 + n_general
    forget_q = {r["question"] for r in D.mini_splits("forget10", tofu_data_dir)[0]}
    assert not forget_q & {r["question"] for r in ret}
    with pytest.raises(UserError, match="unknown tofu-mini retain split"):
        D.mini_finetune_corpus("retain95", tofu_data_dir)
    with pytest.raises(UserError, match="share 160 questions"):
        D.forget_retain("forget50", "retain90", "mini", tofu_data_dir)


# ---------------------------------------------------------------------------------------- pairing
def test_pairing_is_seeded_reproducible_and_covers_retain():
    a = D.pair_retain(30, 50, seed=3, epoch=0)
    assert a == D.pair_retain(30, 50, seed=3, epoch=0)
    assert len(set(a)) == 30 and all(0 <= i < 50 for i in a)            # no retain example twice
    assert a != D.pair_retain(30, 50, seed=3, epoch=1) != D.pair_retain(30, 50, seed=4, epoch=0)
    b = D.pair_retain(25, 10, seed=0, epoch=0)                          # cycles through full permutations
    assert sorted(b[:10]) == list(range(10)) and sorted(b[10:20]) == list(range(10))
    idk = D.pair_idk(40, 100, seed=0)
    assert idk == D.pair_idk(40, 100, seed=0) and all(0 <= i < 100 for i in idk)
    with pytest.raises(UserError):
        D.pair_retain(3, 0, 0, 0)


# ---------------------------------------------------------------------------------------- masking
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.mark.parametrize("fmt", list(D.PROMPT_FORMATS))
def test_answer_masking_token_by_token(tiny, fmt):
    _, tok, _ = tiny
    if fmt == "chat-template":
        tok.chat_template = CHAT_TEMPLATE  # renders BOS itself: must not be doubled
    q, a = "Who wrote 'Dune'?", "Frank Herbert wrote it."
    ex = D.encode_qa(tok, q, a, fmt)
    f = D.PROMPT_FORMATS[fmt]
    prompt_text = f.render(q, tok)
    prompt = tok(prompt_text, add_special_tokens=False)["input_ids"]
    if prompt[0] != tok.bos_token_id:
        prompt = [tok.bos_token_id] + prompt
    answer = tok(f.answer_prefix + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex["input_ids"].tolist() == prompt + answer
    assert ex["labels"].tolist() == [-100] * len(prompt) + answer
    assert ex["attention_mask"].tolist() == [1] * (len(prompt) + len(answer))
    assert ex["input_ids"].tolist().count(tok.bos_token_id) == 1
    assert tok.decode(ex["labels"][ex["labels"] != -100]) == f.answer_prefix + a + tok.eos_token
    assert D.encode_prompt(tok, q, fmt) == prompt  # generation sees exactly the training prompt
    if fmt == "llama2-chat":
        assert tok.decode(ex["input_ids"]) == f"{tok.bos_token}[INST] {q} [/INST] {a}{tok.eos_token}"
    if fmt == "phi":
        assert tok.decode(ex["input_ids"]) == f"{tok.bos_token}Question: {q}\nAnswer: {a}{tok.eos_token}"
    tok.chat_template = None


def test_truncation_keeps_prompt_and_errors_without_answer(tiny):
    _, tok, _ = tiny
    p = D.encode_prompt(tok, "q?", "plain")
    ex = D.encode_qa(tok, "q?", "a long answer with many tokens in it", "plain", max_length=len(p) + 2)
    assert ex["input_ids"].shape[0] == len(p) + 2 and int((ex["labels"] != -100).sum()) == 2
    with pytest.raises(UserError, match="no answer token"):
        D.encode_qa(tok, "q?", "a", "plain", max_length=len(p))
    with pytest.raises(UserError, match="unknown prompt format"):
        D.encode_qa(tok, "q?", "a", "alpaca")


# ---------------------------------------------------------------------------------------- log-probs
def test_sequence_logprobs_brute_force_and_padding_invariance(tiny):
    model, tok, fmt = tiny
    qa = [("Where is the Eiffel Tower?", "Paris"), ("Who wrote the play 'Romeo and Juliet'?", "William Shakespeare"),
          ("Capital of Australia?", "Canberra is the capital city of Australia.")]
    exs = [D.encode_qa(tok, q, a, fmt) for q, a in qa]
    with torch.no_grad():
        # brute force: one example at a time, log_softmax at each answer position
        want, counts = [], []
        for e in exs:
            ids = e["input_ids"][None]
            lp = F.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            n_prompt = int((e["labels"] == -100).sum())
            want.append(sum(float(lp[t - 1, ids[0, t]]) for t in range(n_prompt, ids.shape[1])))
            counts.append(ids.shape[1] - n_prompt)
        for side in ("right", "left"):
            b = D.pad_batch(exs, tok.pad_token_id, side)
            assert (b["labels"][b["attention_mask"] == 0] == -100).all()
            s, n = sequence_logprobs(model, b["input_ids"], b["attention_mask"], b["labels"])
            assert n.tolist() == counts
            assert torch.allclose(s.double(), torch.tensor(want, dtype=torch.float64), atol=1e-3, rtol=1e-5)
        s2, n2, logits, mask = token_logits(model, **D.pad_batch(exs, tok.pad_token_id))
        assert torch.allclose(s2.double(), torch.tensor(want, dtype=torch.float64), atol=1e-3)
        assert mask.sum(-1).tolist() == counts and logits.shape[:2] == mask.shape


# ---------------------------------------------------------------------------------------- models
def test_tiny_llama_sizes_and_checkpoint_roundtrip(tiny, tofu_data_dir, tmp_path):
    sizes = {}
    for name in ("1m", "5m", "20m"):
        m, tok = tiny_llama(name, data_dir=tofu_data_dir, seed=0)
        sizes[name] = count_parameters(m)
    assert 0.7e6 < sizes["1m"] < 1.5e6 and 4e6 < sizes["5m"] < 6.5e6 and 15e6 < sizes["20m"] < 25e6
    # the 80m size (bench/bench_memory.py), counted on the meta device: nothing is allocated
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        big = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, **TINY_SIZES["80m"]))
    assert set(TINY_SIZES) == {"1m", "5m", "20m", "80m"} and count_parameters(big) == 84_165_888
    model, tok, fmt = tiny
    assert tok.pad_token_id is not None and tok.bos_token_id is not None and tok.eos_token_id is not None
    text = "Jaime Vasquez was born on the 25th of February, 1958 — in Santiago."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok(text)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]  # no implicit BOS/EOS
    save_checkpoint(model, tok, tmp_path / "ck", {"prompt_format": "phi"})
    assert (tmp_path / "ck" / "model.safetensors").is_file()
    m2, tok2, fmt2 = load_model(str(tmp_path / "ck"), device="cpu")
    assert fmt2 == "phi" and tok2.get_vocab() == tok.get_vocab()
    b = D.pad_batch([D.encode_qa(tok, "q?", "an answer", fmt)], tok.pad_token_id)
    with torch.no_grad():
        assert torch.equal(sequence_logprobs(model, **b)[0], sequence_logprobs(m2, **b)[0])
    # a run directory stands for its final model/
    (tmp_path / "run").mkdir()
    save_checkpoint(model, tok, tmp_path / "run" / "model", {"prompt_format": "plain"})
    assert load_model(str(tmp_path / "run"), device="cpu")[2] == "plain"
    with pytest.raises(UserError, match="model directory not found"):
        load_model(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(UserError, match="unknown tiny-llama size"):
        load_model("tiny-llama:3m", device="cpu", data_dir=tofu_data_dir)
