"""The LM evaluation beyond FQ and MU: the tofu-mini holdout, memorization/MIA/privleak/fluency in
``npo-tofu eval`` on the tiny checkpoint (against a one-at-a-time oracle), CIs, the report's tables and
claims, and the study's --seeds / --select."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from full_scale import data as D
from full_scale import evaluate as E
from full_scale import extra_metrics as X
from full_scale.aggregate import TASKS, sample_stats, task_log, task_stats
from full_scale.cli import main as tofu_main
from full_scale.config import EvalSpec
from full_scale.data import encode_answer, encode_prompt
from full_scale.models import load_model
from full_scale.report import across_seeds, last_epoch_table
from npo_sim import metrics as M
from npo_sim.runio import UserError

DS = 4


# --------------------------------------------------------------------------------------------------
# the holdout
# --------------------------------------------------------------------------------------------------
def test_mini_holdout_is_disjoint_from_every_mini_training_set(tofu_data_dir):
    hold = D.mini_holdout(tofu_data_dir)
    assert len(hold) == 200 and len(D.MINI_HOLDOUT_AUTHORS) == 10
    full = D.load_split("full", tofu_data_dir)
    row_of = {r["question"]: i for i, r in enumerate(full)}
    # by question: not in the target's corpus (all 20 pool authors + general QA) nor any oracle's
    hq = {r["question"] for r in hold}
    for split in ("full", "retain90", "retain80", "retain50"):
        assert not hq & {r["question"] for r in D.mini_finetune_corpus(split, tofu_data_dir)}, split
    # by author: the holdout's full.json author blocks and the pool's (= forget10's) do not meet
    hold_authors = {row_of[q] // D.AUTHOR_SIZE for q in hq}
    pool_authors = {row_of[r["question"]] // D.AUTHOR_SIZE for r in D.mini_pool(tofu_data_dir)}
    assert hold_authors == set(D.MINI_HOLDOUT_AUTHORS) and pool_authors == set(range(180, 200))
    assert not hold_authors & pool_authors
    # and the holdout answers are full.json's own
    assert all(full[row_of[r["question"]]]["answer"] == r["answer"] for r in hold)


def test_holdout_file_json_and_jsonl_and_no_holdout_note(tofu_data_dir, tmp_path):
    rows = [{"question": "q1?", "answer": "a1"}, {"question": "q2?", "answer": "a2", "extra": 1}]
    (tmp_path / "h.json").write_text(json.dumps(rows))
    (tmp_path / "h.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    want = [{"question": "q1?", "answer": "a1"}, {"question": "q2?", "answer": "a2"}]
    assert D.load_holdout(tmp_path / "h.json") == D.load_holdout(tmp_path / "h.jsonl") == want
    (tmp_path / "bad.json").write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(UserError, match="row 0: missing field 'answer'"):
        D.load_holdout(tmp_path / "bad.json")
    # full TOFU without a holdout file: said plainly, nothing faked
    p = E.prepare_eval(EvalSpec("forget01", data_dir=str(tofu_data_dir), ds_size=2))
    assert p.holdout is None and any("no holdout set" in n for n in p.notes)
    p = E.prepare_eval(EvalSpec("forget01", data_dir=str(tofu_data_dir), ds_size=2,
                                holdout_file=str(tmp_path / "h.json")))
    assert p.holdout == want and p.holdout_source == str(tmp_path / "h.json")
    # a holdout that overlaps the forget set is refused
    f01 = D.load_split("forget01_perturbed", tofu_data_dir)[:1]
    (tmp_path / "leak.json").write_text(json.dumps([{"question": f01[0]["question"], "answer": "x"}]))
    with pytest.raises(UserError, match="shares 1 question"):
        E.prepare_eval(EvalSpec("forget01", data_dir=str(tofu_data_dir), ds_size=2,
                                holdout_file=str(tmp_path / "leak.json")))


# --------------------------------------------------------------------------------------------------
# npo-tofu eval on the tiny checkpoint
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evals(tiny_ckpt, tofu_data_dir, tmp_path_factory):
    """The 'oracle' eval (no retain log) and the same model against it (so privleak must be 0)."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("evals")
    base = ["eval", "--model", str(tiny_ckpt), "--forget-split", "mini-forget10", "--ds-size", str(DS),
            "--max-new-tokens", "8", "--batch-size", "3", "--data-dir", str(tofu_data_dir), "--n-boot", "200",
            "--judge-model", str(tiny_ckpt), "--threads", "1"]
    assert tofu_main(base + ["--out", str(d / "oracle")]) == 0
    assert tofu_main(base + ["--out", str(d / "model"), "--retain-log",
                             str(d / "oracle" / "eval_log_aggregated.json")]) == 0
    read = lambda p: json.loads(p.read_text())  # noqa: E731
    return {k: (read(d / k / "eval_log_aggregated.json"), read(d / k / "summary.json")) for k in ("oracle", "model")}


def test_eval_logs_every_new_metric_with_ci(evals):
    log, s = evals["model"]
    assert list(log) == [*TASKS, X.EXTRA_KEY, "dialect"]
    # privleak is defined where the retain model's AUC is > 0 (a random tiny model at 4 questions may score 0)
    defined = [a for a in X.ATTACKS if s[f"mia_auc_{a}"] > 0]
    assert len(defined) >= 2
    assert all(any(f"privleak_{a}: undefined" in n for n in s["notes"]) for a in set(X.ATTACKS) - set(defined))
    keys = ["forget_quality", "model_utility", "exact_memorization", "extraction_strength",
            *(f"mia_auc_{a}" for a in (*X.ATTACKS, "reference")), *(f"privleak_{a}" for a in defined),
            "fluency_repetition", "fluency_distinct_2", "fluency_judge_logp"]
    assert sorted(s["ci"]) == sorted(keys)
    for k in keys:
        c = s["ci"][k]
        assert c["lo"] <= c["estimate"] + 1e-12 and c["estimate"] <= c["hi"] + 1e-12, k
        assert s[k] == c["estimate"]
    assert s["ci"]["model_utility"]["estimate"] == s["model_utility"]
    assert s["ci"]["forget_quality"]["estimate"] == s["forget_quality"] == 1.0
    # the same model as its retain log: privleak 0 on every attack, the reference attack is all ties
    for a in defined:
        assert s[f"privleak_{a}"] == 0.0 and s["ci"][f"privleak_{a}"]["lo"] == 0.0 == s["ci"][f"privleak_{a}"]["hi"]
    assert s["mia_auc_reference"] == 0.5
    assert s["fq_attainable_values"] == DS and s["fq_next_above"] is None
    assert s["fq_next_below"] == pytest.approx(M.ks_attainable_pvalues(DS, DS)[-2])
    assert s["eval_sets"]["holdout"]["n"] == DS and "170-179" in s["eval_sets"]["holdout"]["source"]
    assert s["judge_model"] and log[X.EXTRA_KEY]["results"]["mia_auc"]["loss"] == s["mia_auc_loss"]
    # the oracle's own log carries the AUCs privleak compares with; it had no retain log
    olog, os_ = evals["oracle"]
    assert olog[X.EXTRA_KEY]["results"]["mia_auc"] == {a: s[f"mia_auc_{a}"] for a in X.ATTACKS}
    assert "forget_quality" not in os_["ci"] and any("no --retain-log" in n for n in os_["notes"])


def test_per_token_numbers_equal_a_one_at_a_time_oracle(evals, tiny_ckpt, tofu_data_dir):
    log, s = evals["model"]
    block = log[X.EXTRA_KEY]
    f = block["forget"]
    # the per-token pass is the NLL pass: mean log-prob x tokens = -gt_loss
    gt = log["eval_log_forget.json"]
    for i in range(DS):
        assert f["num_tokens"][i] == gt["num_token_gt"][str(i)]
        assert f["mia"]["loss"][i] * f["num_tokens"][i] == pytest.approx(-gt["gt_loss"][str(i)], rel=1e-5)
    model, tok, fmt = load_model(str(tiny_ckpt), device="cpu")
    sets, _, _ = E.eval_sets("mini-forget10", tofu_data_dir, DS)
    hold = D.mini_holdout(tofu_data_dir)[:DS]
    for which, q, a, i in (("forget", sets["eval_log_forget.json"][1].question, sets["eval_log_forget.json"][1].answer,
                            1), ("holdout", hold[2]["question"], hold[2]["answer"], 2)):
        p, ans = encode_prompt(tok, q, fmt), encode_answer(tok, a, fmt)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + ans])).logits[0].double(), -1)
        rows = logp[len(p) - 1: len(p) - 1 + len(ans)]
        lp = rows[torch.arange(len(ans)), torch.tensor(ans)]
        mu = (rows.exp() * rows).sum(-1)
        sd = ((rows.exp() * (rows - mu[:, None]) ** 2).sum(-1)).sqrt()
        hits = rows.argmax(-1) == torch.tensor(ans)
        m = torch.ones(1, len(ans), dtype=torch.bool)
        scores = block[which]["mia"]
        assert scores["min_k"][i] == pytest.approx(float(M.mia_min_k(lp[None], m)[0]), abs=1e-5)
        assert scores["min_k_plus_plus"][i] == pytest.approx(
            float(M.mia_min_k_plus_plus(lp[None], mu[None], sd[None], m)[0]), abs=1e-4)
        assert scores["zlib"][i] == pytest.approx(float(M.mia_zlib(lp[None], m, [a])[0]), abs=1e-5)
        if which == "forget":
            assert f["exact_memorization"][i] == pytest.approx(float(hits.double().mean()))
            assert f["extraction_strength"][i] == pytest.approx(float(M.extraction_strength(hits[None], m)[0]))
    # fluency: the logged greedy answers, scored by hand; judge = the model itself here
    gens = block["fluency"]["generated"]
    assert gens == [gt["generated_text"][str(i)][1] for i in range(DS)]
    assert s["fluency_repetition"] == pytest.approx(np.mean([M.repetition(g.lower().split(), 3) for g in gens]))
    assert s["fluency_distinct_2"] == pytest.approx(M.distinct_n([g.lower().split() for g in gens], 2))
    jl, jc = E.answer_nll(model, tok, fmt, [(it.question, g) for it, g in zip(sets["eval_log_forget.json"], gens)])
    assert s["fluency_judge_logp"] == pytest.approx(float(np.mean(-jl / jc)), rel=1e-6)


def test_eval_prints_the_ci_lines(tiny_ckpt, tofu_data_dir, tmp_path, capsys):
    argv = ["eval", "--model", str(tiny_ckpt), "--forget-split", "mini-forget10", "--ds-size", "2",
            "--max-new-tokens", "4", "--data-dir", str(tofu_data_dir), "--n-boot", "50", "--threads", "1",
            "--out", str(tmp_path / "e")]
    assert tofu_main(argv) == 0
    out = capsys.readouterr().out
    assert "95% bootstrap CIs over questions (50 resamples)" in out and "MIA AUC forget vs holdout: loss" in out
    assert "no judge model (--judge-model)" in out  # said, and only that number is omitted
    s = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert "fluency_judge_logp" not in s and "fluency_repetition" in s
    assert tofu_main(argv[:-1] + [str(tmp_path / "e2"), "--no-extra-metrics"]) == 0
    assert "ci" not in json.loads((tmp_path / "e2" / "summary.json").read_text())


# --------------------------------------------------------------------------------------------------
# the CI helpers
# --------------------------------------------------------------------------------------------------
def test_fq_ci_shortcut_equals_plain_bootstrap_and_lattice():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=12), rng.normal(0.5, 1, size=12)
    fast = X.fq_ci(a, b, n_boot=300, seed=1)
    plain = M.bootstrap_ci(M.ks_pvalue, (a, b), n_boot=300, seed=1)
    assert (fast["lo"], fast["hi"], fast["estimate"]) == pytest.approx((plain.lo, plain.hi, plain.estimate))
    lat = M.ks_attainable_pvalues(3, 3)
    got = X.fq_lattice(float(lat[1]), 3, 3)
    assert got == {"fq_attainable_values": 3, "fq_next_above": float(lat[2]), "fq_next_below": float(lat[0])}


def test_auc_privleak_and_mu_cis():
    rng = np.random.default_rng(2)
    f, h = rng.normal(1, 1, 15), rng.normal(0, 1, 9)
    c = X.auc_ci(f, h, n_boot=300)
    assert c["estimate"] == M.auc(f, h) and c["lo"] <= c["estimate"] <= c["hi"]
    p = X.privleak_ci(f, h, f, h, n_boot=100)
    assert p == {"estimate": 0.0, "lo": 0.0, "hi": 0.0, "std": 0.0}
    p = X.privleak_ci(f + 5, h, f, h, n_boot=100)   # every member above every non-member: AUC 1
    assert p["estimate"] == pytest.approx(M.privleak(1.0, M.auc(f, h)))
    # per-sample TOFU terms average to TOFU's statistics
    n = 5
    task = lambda off: {"avg_gt_loss": {str(i): 1 + 0.2 * i + off for i in range(n)},  # noqa: E731
                        "avg_paraphrased_loss": {str(i): 1.1 + 0.1 * i for i in range(n)},
                        "average_perturb_loss": {str(i): [1.5 + 0.1 * j - 0.3 * i for j in range(3)] for i in range(n)},
                        "rougeL_recall": {str(i): 0.2 * i for i in range(n)}}
    log = {k: task(0.1 * j) for j, k in enumerate(TASKS)}
    for t in ("retain", "real_authors", "world_facts", "forget"):
        want = task_stats(task_log(log, t), t)
        assert sample_stats(task_log(log, t), t).mean(axis=0) == pytest.approx(list(want.values()))
    c = X.mu_ci(log, n_boot=200)
    assert c["lo"] <= c["estimate"] <= c["hi"]


# --------------------------------------------------------------------------------------------------
# the report and the study
# --------------------------------------------------------------------------------------------------
def test_last_epoch_table_and_across_seeds():
    curve = pd.DataFrame({"epoch": [1, 2], "forget_quality": [0.1, 0.2], "forget_quality_lo": [0.05, 0.1],
                          "forget_quality_hi": [0.3, 0.4], "model_utility": [0.5, 0.4]})
    runs = [{"split": "s", "method": "npo", "eval_curve": curve}]
    t = last_epoch_table(runs, {"s": {"model_utility": 0.6, "ci": {"model_utility": {"lo": 0.5, "hi": 0.7}}}})
    assert t.method.tolist() == ["target", "npo"] and t.epoch.tolist() == [0, 2]
    assert t.loc[1, "forget_quality"] == 0.2 and t.loc[1, "forget_quality_hi"] == 0.4
    assert math.isnan(t.loc[1, "privleak_min_k_plus_plus"]) and t.loc[0, "model_utility_lo"] == 0.5
    tables = {s: t.assign(model_utility=[0.6, v]) for s, v in zip((0, 1, 2), (1.0, 2.0, 3.0))}
    seeds = across_seeds(tables)
    row = seeds[(seeds.method == "npo") & (seeds.metric == "model_utility")].iloc[0]
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)
    assert (row.n_seeds, row["mean"], row.lo, row.hi) == pytest.approx((3, 2.0, 2.0 - half, 2.0 + half))
    assert "target" not in set(seeds.method)


def test_study_seeds_and_select(capsys):
    argv = ["study", "--model", "tiny-llama:1m", "--methods", "ga,npo", "--out", "/nonexistent/s", "--dry-run",
            "--select", "last"]
    assert tofu_main(argv + ["--seeds", "0,1,2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 + 4 + 2 + 2 * 2 * 3   # fine-tunes, evals, SGD law runs, splits x methods x seeds
    unlearn = [ln for ln in lines if "/unlearn/" in ln]
    assert {f"/unlearn/mini-forget10/seed-{s}/ga-" in " ".join(unlearn) for s in (0, 1, 2)} == {True}
    assert all(any(f"--seed {s} --out " in ln for s in (0, 1, 2)) for ln in unlearn)
    assert all("--eval-judge-model /nonexistent/s/finetuned/oracle-" in ln for ln in unlearn)
    assert all("--judge-model /nonexistent/s/finetuned/oracle-" in ln for ln in lines if " eval " in ln)
    from full_scale.study import study_config

    cfg = study_config("mini", methods=("ga",), seeds=(0, 1), select="last")
    assert cfg.settings()["seeds"] == [0, 1] and cfg.settings()["select"] == "last"
    assert study_config("mini").settings()["select"] == "val"   # the preset's declared protocol
    assert "last epoch" in cfg.settings()["select_rule"]
    assert tofu_main(argv + ["--seeds", "0,x"]) == 2
    assert tofu_main(argv + ["--seeds", "1,1"]) == 2
    with pytest.raises(SystemExit) as exc:  # argparse: one line, exit 2
        tofu_main(argv + ["--select", "best-on-test"])
    assert exc.value.code == 2
