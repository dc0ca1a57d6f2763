"""Dialects, each convention against its published definition on a hand case (full_scale.dialects)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from full_scale import data as D
from full_scale.aggregate import TaskLog, aggregate, load_log, truth_ratio_terms
from full_scale.cli import main as cli
from full_scale.config import UnlearnSpec
from full_scale.convert import from_open_unlearning, to_open_unlearning
from full_scale.dialects import DIALECTS, check_same, convention_table, get_dialect
from full_scale.generate import generation_budget
from full_scale.logprobs import token_logprobs_from_logits
from full_scale.tasks import ReferenceSource, reduce_logp
from npo_sim.losses import get_objective, nll
from npo_sim.runio import UserError


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_ckpt))


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------ tokenisation
def test_token_masks_of_a_known_string_under_each_rule(tok):
    q, a = "Who wrote it?", "Paris Hilton wrote it."
    bos, eos = tok.bos_token_id, tok.eos_token_id
    prompt = "[INST] Who wrote it? [/INST]"
    # npo-sim: [BOS] prompt, then " answer" + EOS tokenised on their own
    sep = D.encode_qa(tok, q, a, get_dialect("npo-sim").prompt_format("llama2-chat"))
    want = [bos] + _ids(tok, prompt) + _ids(tok, " " + a) + [eos]
    assert sep["input_ids"].tolist() == want
    assert (sep["labels"] == D.IGNORE_INDEX).sum() == 1 + len(_ids(tok, prompt))
    # tofu (Llama-2): "[INST] q [/INST]answer" as one string, answer_tag "", the prompt's own count masked
    tofu = D.encode_qa(tok, q, a, get_dialect("tofu").prompt_format("llama2-chat"))
    assert tofu["input_ids"].tolist() == [bos] + _ids(tok, prompt + a) + [eos]
    n_mask = 1 + len(_ids(tok, prompt))
    assert tofu["labels"][:n_mask].eq(D.IGNORE_INDEX).all() and tofu["labels"][n_mask] != D.IGNORE_INDEX
    # tofu (Phi): the "Answer: " tag is scored as answer, the generation prompt stops before it
    phi = get_dialect("tofu").prompt_format("phi")
    assert phi.template == "Question: {question}\n" and phi.answer_prefix == "Answer: "
    assert D.encode_prompt(tok, q, phi) == [bos] + _ids(tok, "Question: Who wrote it?\n")


def test_open_unlearning_first_answer_token_is_masked_where_the_space_merges(tok):
    q, a = "Who wrote it?", "Paris wrote it."
    prompt = "[INST] Who wrote it? [/INST]"
    alone = _ids(tok, prompt + " ")
    joined = _ids(tok, prompt + " " + a)
    merges = len(alone) == len(_ids(tok, prompt)) + 1 and joined[:len(alone)] != alone
    ou = D.encode_qa(tok, q, a, get_dialect("open-unlearning").prompt_format("llama2-chat"))
    assert ou["input_ids"].tolist() == [tok.bos_token_id] + joined + [tok.eos_token_id]
    true_prompt = 1 + len(_ids(tok, prompt))
    masked = int((ou["labels"] == D.IGNORE_INDEX).sum())
    # the trailing space of the prompt is its own token alone, but merges into "▁Paris" when joined
    assert merges, "this tokenizer should show the merge"
    assert masked == true_prompt + 1 and ou["labels"][true_prompt] == D.IGNORE_INDEX   # "▁Paris" lost
    assert ou["input_ids"][true_prompt] == joined[true_prompt - 1] != alone[-1]   # the merged token, not the space


def test_max_length_truncates_the_answer_from_the_right(tok):
    f = get_dialect("tofu").prompt_format("llama2-chat")
    full = D.encode_qa(tok, "Q?", "a b c d e f g h", f)
    cut = D.encode_qa(tok, "Q?", "a b c d e f g h", f, max_length=len(full["input_ids"]) - 3)
    assert cut["input_ids"].tolist() == full["input_ids"].tolist()[:-3]


# ------------------------------------------------------------------------------------------ reductions
def test_pooled_and_per_example_token_means_on_two_examples():
    lp, n = torch.tensor([-6.0, -1.0]), torch.tensor([3, 1])
    assert float(nll(reduce_logp(lp, n, "mean"))) == pytest.approx((6 / 3 + 1 / 1) / 2)   # 1.5
    assert float(nll(reduce_logp(lp, n, "pooled"))) == pytest.approx(7 / 4)                # 1.75
    assert float(nll(reduce_logp(lp, n, "sum"))) == pytest.approx(3.5)


def test_generation_budget_of_a_batch_with_prompts_of_different_lengths():
    assert generation_budget([5, 12, 7], 128, None) == 128       # npo-sim: max_new_tokens each
    assert generation_budget([5, 12, 7], 128, 20) == 8            # tofu: 20 in total minus the longest prompt
    assert generation_budget([25], 128, 20) == 0


def test_eval_cross_entropy_in_the_model_dtype():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(1, 4, 50, generator=g) * 4).to(torch.bfloat16)
    labels = torch.tensor([[-100, 3, 7, 9]])
    fp32, _ = token_logprobs_from_logits(logits, labels, "float32")
    model, _ = token_logprobs_from_logits(logits, labels, "model")
    want32 = torch.log_softmax(logits[0, :-1].float(), -1)[torch.arange(3), labels[0, 1:]]
    want16 = torch.log_softmax(logits[0, :-1], -1)[torch.arange(3), labels[0, 1:]].float()
    assert torch.allclose(fp32[0], want32) and torch.allclose(model[0], want16)
    assert not torch.allclose(fp32, model)   # bf16 rounding shows


# ------------------------------------------------------------------------------------------ truth ratio
def test_each_truth_ratio_formula_on_given_losses():
    t = TaskLog(gt=np.array([1.0]), para=np.array([1.0]), perturb=np.array([[2.0, 3.0]]), rouge=np.array([1.0]))
    R = math.exp(2.5 - 1.0)
    assert truth_ratio_terms(t, True, "tofu")[0] == pytest.approx(1 / R)
    assert truth_ratio_terms(t, False, "tofu")[0] == pytest.approx(1 - 1 / R)
    Rp = ((math.exp(-2) + math.exp(-3)) / 2) / math.exp(-1)       # mean perturbed probability over paraphrased
    assert truth_ratio_terms(t, True, "tofu-utility")[0] == pytest.approx(min(Rp, 1 / Rp))
    assert truth_ratio_terms(t, False, "tofu-utility")[0] == pytest.approx(1 - Rp)
    pm = math.exp(-1) / (math.exp(-1) + (math.exp(-2) + math.exp(-3)) / 2)
    assert truth_ratio_terms(t, True, "prob_mean")[0] == pytest.approx(pm)


def test_published_logs_aggregate_to_todays_numbers_under_tofu(tofu_reference_logs):
    ck = load_log(tofu_reference_logs / "tofu/llama2-7b/full/eval_log_aggregated.json")
    rt = load_log(tofu_reference_logs / "tofu/llama2-7b/retain90/eval_log_aggregated.json")
    today = aggregate(ck, rt)
    tofu = aggregate(ck, rt, truth_ratio=get_dialect("tofu").truth_ratio)
    assert {k: v for k, v in tofu.items() if k != "truth_ratio_formula"} == \
        {k: v for k, v in today.items() if k != "truth_ratio_formula"}
    ou = aggregate(ck, rt, truth_ratio="prob_mean")
    assert ou["forget_quality"] == today["forget_quality"] and ou["model_utility"] != today["model_utility"]


# ------------------------------------------------------------------------------------------ objectives
def test_open_unlearning_simnpo_parameterisation():
    spec = UnlearnSpec(forget="forget10", retain="retain90", method="simnpo_rt", gamma=0.5)
    o = spec.objective("open-unlearning")
    assert (o.beta, o.gamma, o.retain_weight) == (4.5, 4.5 * 0.5, 1.0 / 0.125)   # δ inside β; γ = 0.125 forget weight
    assert spec.objective("npo-sim") == get_objective("simnpo_rt", gamma=0.5)
    assert spec.objective("open-unlearning").beta != spec.objective().beta
    npo = UnlearnSpec(forget="forget10", retain="retain90", method="npo_rt")
    assert npo.objective("open-unlearning") == npo.objective()   # only SimNPO is reparameterised


def test_per_step_idk_answers_need_the_reference_model():
    dpo = get_objective("dpo")
    assert ReferenceSource.choose(dpo, "cached") == ReferenceSource(("logp_ref", "idk_logp_ref"), False)
    assert ReferenceSource.choose(dpo, "cached", ("idk_logp_ref",)) == ReferenceSource(("logp_ref",), True)


# ------------------------------------------------------------------------------------------ records, mixing
def test_dialect_records_and_mixing_is_refused():
    assert set(DIALECTS) == {"npo-sim", "tofu", "open-unlearning", "npo-official"}
    assert get_dialect(None).name == "npo-sim"
    with pytest.raises(UserError, match="unknown dialect 'nope'"):
        get_dialect("nope")
    assert check_same({"a": "tofu", "b": None}) == "tofu"            # a published log matches any
    with pytest.raises(UserError, match="different dialects .*a: tofu; b: npo-sim.*--allow-mixed-dialects"):
        check_same({"a": "tofu", "b": "npo-sim"})
    assert check_same({"a": "tofu", "b": "npo-sim"}, allow_mixed=True) == "mixed"
    table = convention_table()
    assert table.count("\n") == 1 + 14 and "`'joined'`" in table


def test_aggregate_refuses_logs_of_two_dialects_and_convert_round_trips(tofu_reference_logs, tmp_path, capsys):
    ck = load_log(tofu_reference_logs / "tofu/llama2-7b/full/eval_log_aggregated.json")
    rt = load_log(tofu_reference_logs / "tofu/llama2-7b/retain90/eval_log_aggregated.json")
    ev, summary = to_open_unlearning(ck, rt)
    back = from_open_unlearning(ev)
    a, b = aggregate(ck, rt), aggregate(back, rt)
    assert a["forget_quality"] == pytest.approx(b["forget_quality"], rel=1e-12)
    assert a["model_utility"] == pytest.approx(b["model_utility"], rel=1e-12)
    assert summary["forget_quality"] == a["forget_quality"] and ev["forget_Q_A_ROUGE"]["agg_value"] == a["forget_rouge"]
    (tmp_path / "ck.json").write_text(json.dumps({**ck, "dialect": "tofu"}))
    (tmp_path / "rt.json").write_text(json.dumps({**rt, "dialect": "npo-sim"}))
    code = cli(["aggregate", "--ckpt-log", str(tmp_path / "ck.json"), "--retain-log", str(tmp_path / "rt.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "different dialects" in err[0]
    assert cli(["convert", str(tmp_path / "ck.json"), "--to", "open-unlearning", "--out", str(tmp_path / "ou")]) == 0
    assert (tmp_path / "ou" / "TOFU_EVAL.json").is_file() and (tmp_path / "ou" / "TOFU_SUMMARY.json").is_file()


def test_compare_dialects_table_by_hand(tmp_path):
    from full_scale.dialect_report import compare, markdown

    def summary(fq, mu, tfq, tmu):
        return {"targets": {"s": {"forget_quality": tfq, "model_utility": tmu}},
                "best_fq": [{"split": "s", "method": "npo", "fq_last": fq, "mu_last": mu}]}
    for name, s in {"a": summary(0.01, 0.5, 1e-4, 0.7), "b": summary(0.1, 0.45, 1e-4, 0.6)}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(s))
    df = compare({"a": tmp_path / "a", "b": tmp_path / "b"}).set_index("method")
    assert df.loc["npo", "max_abs_dlog10_fq"] == pytest.approx(1.0)
    assert df.loc["npo", "max_abs_dmu"] == pytest.approx(0.05)
    assert df.loc["target", "max_abs_dlog10_fq"] == 0 and df.loc["target", "max_abs_dmu"] == pytest.approx(0.1)
    assert "| s | NPO | 0.01 | 0.1 | 0.500 | 0.450 | 1.00 | 0.050 |" in markdown(df.reset_index(), ["a", "b"])


def test_eval_in_tofu_dialect_and_unlearn_in_open_unlearning_dialect_run(tiny_ckpt, tofu_data_dir, tmp_path):
    common = ["--data-dir", str(tofu_data_dir), "--threads", "1"]
    assert cli(["eval", "--model", str(tiny_ckpt), "--forget-split", "mini-forget10", "--ds-size", "1",
                "--out", str(tmp_path / "ev"), "--dialect", "tofu", "--no-extra-metrics", *common]) == 0
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert s["dialect"] == "tofu" and s["truth_ratio_formula"] == "tofu"
    assert '"dialect": "tofu"' in json.dumps(s["config"])
    assert json.loads((tmp_path / "ev" / "eval_log_aggregated.json").read_text())["dialect"] == "tofu"
    assert cli(["unlearn", "--preset", "mini", "--model", str(tiny_ckpt), "--method", "ga_kl", "--out",
                str(tmp_path / "ul"), "--epochs", "1", "--batch-size", "40", "--no-progress", "--collapse-questions",
                "0", "--dialect", "open-unlearning", *common]) == 0
    cfg = json.loads((tmp_path / "ul" / "config.json").read_text())
    assert (cfg["dialect"], cfg["ga_reduction"], cfg["max_length"]) == ("open-unlearning", "pooled", 512)
    assert json.loads((tmp_path / "ul" / "run.json").read_text())["dialect"] == "open-unlearning"
