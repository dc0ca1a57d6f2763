"""Markov-chain setting: chains, sampling, exact KLs, tabular MLE, minibatch alignment, presets, claims, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from npo_sim import claims as C
from npo_sim import cli, metrics, unlearn
from npo_sim.losses import get_objective, kl
from npo_sim.runio import UserError
from npo_sim.settings import markov as M
from npo_sim.settings import markov_chains as MC
from npo_sim.settings import markov_findings as MF
from npo_sim.settings import markov_privacy as P
from npo_sim.study import run_study


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny float64 ops: a second intra-op thread only adds overhead (and contention on shared machines)
    torch.set_num_threads(1)
    yield


def _chain_params(chain: MC.Chain) -> list[torch.Tensor]:
    rows = torch.log(MC.rows_tensor(chain))
    return [rows[0].clone(), rows[1:].clone()]


# --------------------------------------------------------------------------------------------------
# chains and sampling
# --------------------------------------------------------------------------------------------------
def test_chain_entries_follow_the_definition():
    eps = 0.2
    ch = MC.make_chains(10, 3, eps)
    f1 = ch["forget1"]
    assert np.allclose(f1.trans.sum(1), 1) and np.isclose(f1.init.sum(), 1)
    assert np.allclose(f1.trans[3, [3, 4, 5]], (1 - eps) / 3)
    assert np.allclose(f1.trans[3, [0, 1, 2, 6, 7, 8, 9]], eps / 7)
    assert np.allclose(f1.trans[0], 0.1) and np.allclose(f1.trans[9], 0.1)  # rows outside its set are uniform
    assert np.allclose(f1.init, f1.trans[4])                                # same split for the start
    assert np.allclose(ch["retain"].trans[1, :3], (1 - eps) / 3)
    assert np.allclose(ch["forget2"].trans[8, 6:9], (1 - eps) / 3)


def test_sampled_transition_frequencies_match_chain_within_3_sigma():
    chain = MC.make_chains(10, 3, 0.2)["forget1"]
    x = MC.sample(chain, 20000, 20, np.random.default_rng(0))
    counts = np.zeros((10, 10))
    np.add.at(counts, (x[:, :-1].ravel(), x[:, 1:].ravel()), 1)
    n = counts.sum(1, keepdims=True)
    P = chain.trans
    z = (counts / n - P) / np.sqrt(P * (1 - P) / n)
    first = np.bincount(x[:, 0], minlength=10) / len(x)
    z = np.concatenate([z.ravel(), (first - chain.init) / np.sqrt(chain.init * (1 - chain.init) / len(x))])
    # 110 cells: ~0.3 are expected beyond 3σ by chance, so allow at most 2 (P(≥3) ≈ 0.4%), none beyond 4.5σ
    assert (np.abs(z) > 3).sum() <= 2 and np.abs(z).max() < 4.5, np.sort(np.abs(z))[-3:]
    assert 0.6 < np.mean(z ** 2) < 1.4  # standardised: E z² ≈ 1, so a wrong σ (or a too-good match) fails


# --------------------------------------------------------------------------------------------------
# tabular model and exact KLs
# --------------------------------------------------------------------------------------------------
def test_tabular_seq_logp_matches_brute_force_and_idk_closed_form():
    rng = np.random.default_rng(1)
    model = MC.TabularModel(10)
    params = [torch.randn(10, dtype=torch.float64), torch.randn(10, 10, dtype=torch.float64)]
    x = MC.sample(MC.make_chains()["retain"], 7, 6, rng)
    data = MC.SeqSet.of(x)
    li, lt = F.log_softmax(params[0], -1), F.log_softmax(params[1], -1)
    brute = [float(li[s[0]] + sum(lt[a, b] for a, b in zip(s[:-1], s[1:]))) for s in x]
    assert np.allclose(model.seq_logp(params, data).numpy(), brute)
    idk = MC.SeqSet.of(np.full((3, 5), 9))
    assert np.allclose(model.seq_logp(params, idk).numpy(), float(li[9] + 4 * lt[9, 9]))
    assert math.isclose(float(model.retain_logp(params, data)[0]), float(np.mean(brute)), rel_tol=1e-12)


def test_exact_kl_is_zero_at_the_chain_logits_and_positive_elsewhere():
    chains = MC.make_chains()
    model = MC.TabularModel(10)
    for ch in chains.values():
        p = _chain_params(ch)
        assert abs(float(MC.chain_kl(ch, F.log_softmax(model.row_logits(p), -1), 20))) < 1e-12
    other = _chain_params(chains["forget1"])
    assert float(MC.chain_kl(chains["retain"], F.log_softmax(model.row_logits(other), -1), 20)) > 0.1


def test_closed_form_chain_kl_matches_monte_carlo():
    chain = MC.make_chains(10, 3, 0.2)["retain"]
    model = MC.TabularModel(10)
    g = torch.Generator().manual_seed(3)
    q = [torch.randn(10, generator=g, dtype=torch.float64), torch.randn(10, 10, generator=g, dtype=torch.float64)]
    L, n = 12, 40000
    data = MC.SeqSet.of(MC.sample(chain, n, L, np.random.default_rng(4)))
    per_seq = (model.seq_logp(_chain_params(chain), data) - model.seq_logp(q, data)).numpy() / L
    exact = float(MC.chain_kl(chain, F.log_softmax(model.row_logits(q), -1), L))
    se = per_seq.std() / math.sqrt(n)
    assert abs(per_seq.mean() - exact) < 4 * se, (per_seq.mean(), exact, se)
    assert se < 0.02 * exact  # the check has teeth


def test_mle_is_a_stationary_point_of_the_token_nll():
    data = MC.SeqSet.of(MC.sample(MC.make_chains()["forget2"], 500, 15, np.random.default_rng(5)))
    model = MC.TabularModel(10, pseudocount=1e-12)
    params, nll = model.pretrain(data)
    params = [p.requires_grad_(True) for p in params]
    loss = -model.seq_logp(params, data).sum() / data.lengths.sum()
    grads = torch.autograd.grad(loss, params)
    assert max(float(g.abs().max()) for g in grads) < 1e-9
    assert math.isclose(loss.item(), nll, rel_tol=1e-12)


def test_retain_only_mle_is_close_to_the_retain_chain():
    cfg = M.make_config("divergence", seed=0)
    chains, data = M.build_data(cfg)
    model = MC.TabularModel(10, cfg.pseudocount)
    oracle, _ = model.pretrain(data["retain"][0])
    rows = F.log_softmax(model.row_logits(oracle), -1)
    ckl = float(MC.chain_kl(chains["retain"], rows, 20))
    assert ckl < 2e-3
    # next-state KL on retain test prefixes: same bound, and far from the forget chains
    test = data["retain"][1]
    _, w, _ = model.contexts(test)
    assert float(MC.weighted_kl(MC.rows_tensor(chains["retain"]), rows, w)) < 2e-3
    assert float(MC.chain_kl(chains["forget1"], rows, 20)) > 0.3


def test_weighted_rows_kl_equals_per_position_kl():
    """The tabular retain_logits shortcut (distinct rows + prefix counts as weights) is exact."""
    model = MC.TabularModel(10)
    data = MC.SeqSet.of(MC.sample(MC.make_chains()["retain"], 50, 8, np.random.default_rng(6)))
    p = [torch.randn(10, dtype=torch.float64), torch.randn(10, 10, dtype=torch.float64)]
    r = [torch.randn(10, dtype=torch.float64), torch.randn(10, 10, dtype=torch.float64)]
    lg, w = model.retain_logits(p, data)
    lr, _ = model.retain_logits(r, data)
    per_pos = kl(model.next_logprobs(p, data), model.next_logprobs(r, data), data.mask)
    assert math.isclose(float(kl(lg, lr, w)), float(per_pos), rel_tol=1e-10)


# --------------------------------------------------------------------------------------------------
# minibatching through unlearn.run's select hook, and a transformer smoke test
# --------------------------------------------------------------------------------------------------
def test_transformer_minibatch_references_align_and_preset_runs(tmp_path):
    cfg = M.make_config("length", "transformer", quick=True, n_retain=200, n_forget1=100, n_forget2=100, steps=6,
                        methods=("npo", "simnpo_rt", "npo_kl"), batch_size=16, n_records=3, linear_records=0)
    summary = run_study(M.STUDY, cfg, tmp_path / "run", tmp_path / "figs").results.summary
    curves = __import__("pandas").read_csv(tmp_path / "run" / "curves.csv")
    w0 = curves[(curves.method == "npo") & (curves.step == 0)].npo_weight.iloc[0]
    assert w0 == pytest.approx(1.0, abs=1e-6)  # logp on the step-0 batch == its cached reference slice
    kl0 = curves[(curves.method == "npo_kl") & (curves.step == 0)].retain_loss.iloc[0]
    assert kl0 == pytest.approx(0.0, abs=1e-6)
    assert (tmp_path / "figs" / "markov_length_transformer.png").exists()
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["config"]["forget2_length"] == 5 and set(saved["methods"]) == {"npo", "simnpo_rt", "npo_kl"}
    assert summary["pretrain"]["method"] == "AdamW"
    privacy = __import__("pandas").read_csv(tmp_path / "run" / "privacy.csv")  # the transformer is scored too
    assert set(privacy.model) == {"transformer"} and set(privacy.method) == {"oracle", "npo", "simnpo_rt", "npo_kl"}
    assert privacy.mia_auc_loss.between(0, 1).all() and set(summary["privacy"]["end_step"].values()) == {6}


def test_select_hook_gives_same_curve_as_full_batch_when_batch_is_everything():
    cfg = M.make_config("length", n_retain=60, n_forget1=30, n_forget2=30)
    chains, data = M.build_data(cfg)
    model = MC.TabularModel(10)
    train = {s: d[0] for s, d in data.items()}
    target, _ = model.pretrain(MC.SeqSet.cat(list(train.values())))
    forget = MC.SeqSet.cat([train["forget1"], train["forget2"]])
    ev = M.Evaluator(model, chains, {s: d[1] for s, d in data.items()}, {"forget1": train["forget1"]}, target, target,
                     {s: 20 for s in MC.SOURCES})
    out = []
    for bs in (0, 10_000):
        ad = M.MarkovAdapter(model, forget, train["retain"], None, ev, batch_size=bs)
        res = unlearn.run(ad, get_objective("npo_rt"), target, steps=5, lr=0.1, record_at=[5])
        out.append(res["kl_forget1_oracle"])
    # a full "minibatch" is a permutation of the full batch: identical means
    assert np.allclose(out[0], out[1], rtol=1e-10)


# --------------------------------------------------------------------------------------------------
# presets and CLI
# --------------------------------------------------------------------------------------------------
def test_divergence_preset_cli_prints_rates_and_fits_hold_on_tabular(tmp_path, capsys):
    rc = cli.main(["markov", "--preset", "divergence", "--quick", "--out", str(tmp_path / "m"),
                   "--figures", str(tmp_path / "figs")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "linear: slope" in out and "log: slope" in out
    s = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert (tmp_path / "m" / "curves.csv").exists() and (tmp_path / "figs" / "markov_divergence_tabular.png").exists()
    f = s["findings"]["fits"]
    # GA: linear law (Lemma 3 analogue) for both the parameter distance and the forget NLL
    assert f["ga"]["norm_linear"]["r2"] > 0.98 and f["ga"]["forget_nll_linear"]["r2"] > 0.98
    # NPO: logarithmic forget NLL; the parameter distance is log-like but still concave in log t early on
    # (d log q / d logit = 1 − q while forget probabilities are not yet small), so its log fit passes
    # 0.98 from 10% of the run on, not from 1% (see findings.r2_by_window)
    assert f["npo"]["forget_nll_log"]["r2"] > 0.98
    assert f["npo"]["norm_log"]["r2"] > f["npo"]["norm_linear"]["r2"]
    late = s["findings"]["r2_by_window"][f"from_{s['config']['steps'] // 10}"]
    assert late["npo"]["norm_log"] > 0.98
    assert late["ga"]["norm_loglog_slope"] == pytest.approx(1.0, abs=0.05)  # ‖θ_t−θ_0‖ ∝ t¹ late in the run
    assert s["findings"]["ga_linear_law_holds"] is True


@pytest.mark.parametrize("argv, msg", [
    (["--preset", "divergence", "--eps", "1.0"], "eps must be in [0, 1)"),
    (["--preset", "divergence", "--eps", "-0.1"], "eps must be in [0, 1)"),
    (["--preset", "length", "--length", "1"], "length must be >= 2"),
    (["--preset", "bogus"], "unknown preset 'bogus'"),
    (["--preset", "length", "--model", "rnn"], "unknown model 'rnn'"),
    (["--preset", "length", "--methods", "npo,nope"], "unknown method 'nope'"),
])
def test_bad_input_is_one_line_error_and_writes_nothing(tmp_path, capsys, argv, msg):
    out = tmp_path / "never"
    rc = cli.main(["markov", *argv, "--out", str(out), "--figures", str(tmp_path / "figs")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and msg in err and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / "figs").exists()


def test_length_preset_prints_npo_and_simnpo_forget_and_retain_kls(tmp_path, capsys):
    rc = cli.main(["markov", "--preset", "length", "--quick", "--methods", "npo,simnpo", "--out", str(tmp_path / "l"),
                   "--figures", ""])
    assert rc == 0
    out = capsys.readouterr().out
    assert "F1 KL→orc" in out and "ret KL→true" in out
    s = json.loads((tmp_path / "l" / "summary.json").read_text())
    b = s["findings"]["at_best"]
    for m in ("npo", "simnpo"):
        for f in ("forget1", "forget2"):
            # unlearning moved each forget set towards the oracle from where the target was
            assert b[m][f]["kl_oracle"] < s["reference"]["target"][f"kl_{f}_oracle"]
    assert s["reference"]["oracle"]["kl_forget1_oracle"] == pytest.approx(0.0, abs=1e-12)


# --------------------------------------------------------------------------------------------------
# the Study: report configs, claims, config validation
# --------------------------------------------------------------------------------------------------
def test_report_configs_name_the_figures_runs_and_smoke_keeps_the_methods_the_claims_read():
    full, smoke = M.report_configs(False), M.report_configs(True)
    assert list(full) == list(smoke) == ["markov_length", "markov_memorization", "markov_divergence",
                                         "markov_divergence_transformer"]
    assert [(c.preset, c.model) for c in full.values()] == [("length", "tabular"), ("memorization", "tabular"),
                                                            ("divergence", "tabular"), ("divergence", "transformer")]
    for name in ("markov_length", "markov_memorization", "markov_divergence"):
        assert smoke[name].steps == 100 and smoke[name].methods == ("ga", "npo", "simnpo")
    assert smoke["markov_divergence_transformer"].steps == 20
    assert smoke["markov_divergence_transformer"].methods == ("ga", "npo")
    assert full["markov_length"].lr_scale == (("simnpo", 1000.0), ("simnpo_rt", 1000.0))
    assert full["markov_divergence_transformer"].lr_scale == (("npo", 20.0),)


def test_run_study_writes_claims_with_a_verdict_word_and_a_criterion(tmp_path):
    cfg = M.make_config("memorization", quick=True, steps=30, methods=("npo", "simnpo"))
    run = run_study(M.STUDY, cfg, tmp_path / "mem", None)
    (claim,) = run.claims
    assert claim.verdict in C.VERDICTS and claim.criterion and claim.figure == "markov_memorization_tabular.png"
    assert claim.measured == run.results.summary["findings"]["verdict"]
    assert C.load(tmp_path / "mem" / "claims.json") == [claim]
    assert {p.name for p in (tmp_path / "mem").iterdir()} >= {"config.json", "curves.csv", "summary.json",
                                                              "timing.json", "markov_memorization_tabular.png"}
    assert "timing_s" not in json.loads((tmp_path / "mem" / "summary.json").read_text())


def test_claims_without_the_methods_they_read_are_not_measured():
    cfg = M.make_config("length", quick=True, methods=("ga",))
    assert MF.FINDINGS["length"].claim({"at_best": {}, "verdict": ""}, cfg).verdict == C.NA
    assert MF.FINDINGS["divergence"].claim({"verdict": ""}, M.make_config("divergence")).verdict == C.NA


@pytest.mark.parametrize("overrides, msg", [
    (dict(steps=0), "steps must be >= 1"),
    (dict(lr=-1.0), "lr must be > 0"),
    (dict(beta=0.0), "beta must be > 0"),
    (dict(methods=()), "methods must name at least one objective"),
    (dict(n_states=9, eps=0.0, methods=("idk_rt",)), "needs the no-chain IDK state"),
    (dict(optimizer="sgd"), "unknown optimizer 'sgd'"),
])
def test_config_errors_are_in_the_configs_own_words(overrides, msg):
    with pytest.raises(UserError, match=msg):
        M.make_config("divergence", **overrides)


# --------------------------------------------------------------------------------------------------
# the closed-form tabular chain rule and the batched program
# --------------------------------------------------------------------------------------------------
def _small_tabular():
    cfg = M.make_config("length", n_retain=60, n_forget1=30, n_forget2=30)
    chains, data = M.build_data(cfg)
    model = MC.TabularModel(10)
    train = {s: d[0] for s, d in data.items()}
    target, _ = model.pretrain(MC.SeqSet.cat(list(train.values())))
    forget = MC.SeqSet.cat([train["forget1"], train["forget2"]])
    idk = MC.SeqSet(torch.full_like(forget.seqs, 9), forget.lengths)
    ev = M.Snapshots(M.Evaluator(model, chains, {s: d[1] for s, d in data.items()}, {"forget1": train["forget1"]},
                                 target, target, {s: 20 for s in MC.SOURCES}))
    return model, forget, train["retain"], idk, ev, target


@pytest.mark.parametrize("method", ["ga", "ga_rt", "ga_kl", "npo_kl", "simnpo_rt", "idk_rt", "dpo_kl"])
def test_tabular_vjp_equals_autograd_through_the_model(method):
    model, forget, retain, idk, ev, target = _small_tabular()
    obj = get_objective(method)
    params = [(p + 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
              .requires_grad_(True) for p in target]
    ad = M.TabularAdapter(model, forget, retain, idk, ev)
    ref = unlearn.reference_inputs(ad, obj, target)
    inputs = {**ad.inputs(params, frozenset(obj.needs - set(ref))), **ref}
    auto = torch.autograd.grad(obj(inputs).loss, params)
    keys = [k for k in inputs if k in unlearn.THETA_INPUTS]
    detached = {k: (v.detach().requires_grad_(True) if k in keys else v) for k, v in inputs.items()}
    cot = torch.autograd.grad(obj(detached).loss, [detached[k] for k in keys])
    closed = ad.vjp(params, {k: detached[k] for k in keys}, dict(zip(keys, cot)))
    for a, b in zip(auto, closed):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_tabular_closed_form_runs_match_the_autograd_reference_and_batched_matches_separate():
    model, forget, retain, idk, ev, target = _small_tabular()
    cfg = M.make_config("length", n_retain=60, n_forget1=30, n_forget2=30, steps=15)
    methods = cfg.methods
    # the closed form reads per-token inputs as weighted distinct table entries; the reference, per sequence
    for method in ("npo_kl", "simnpo_rt", "dpo_rt", "wga_rt", "tnpo", "satimp", "undial", "ce_u", "kto"):
        obj = get_objective(method)
        runs = [unlearn.run(cls(model, forget, retain, idk, ev), obj, target, steps=15, lr=0.1, record_at=[0, 5, 15])
                for cls in (M.MarkovAdapter, M.TabularAdapter)]
        for k in runs[0]:
            assert np.allclose(runs[0][k], runs[1][k], rtol=1e-11, atol=1e-12), (method, k)
    batched = M._unlearn_batched(cfg, model, forget, retain, idk, ev, target)
    finals = dict(ev.final)
    separate = M._unlearn_each(cfg, model, forget, retain, idk, ev, target, False, {})
    for m in methods:  # the snapshot of replica r is method r's last-step parameters
        assert all(torch.allclose(a, b, rtol=1e-11, atol=1e-12) for a, b in zip(finals[m], ev.final[m])), m
    assert len(batched) == len(separate) == len(methods)
    for b, s in zip(batched, separate):
        assert list(b.columns) == list(s.columns)
        assert np.allclose(b.drop(columns="method").to_numpy(float), s.drop(columns="method").to_numpy(float),
                           rtol=1e-11, atol=1e-12)


def test_a_diverging_batch_falls_back_to_one_run_per_method(monkeypatch):
    model, forget, retain, idk, ev, target = _small_tabular()
    cfg = M.make_config("divergence", n_retain=60, n_forget1=30, n_forget2=30, steps=5)

    def boom(*a, **k):
        raise M.NonFiniteLoss("batched run diverged")
    monkeypatch.setattr(M, "_unlearn_batched", boom)
    curves, diverged = M._unlearn_all(cfg, model, forget, retain, idk, ev, target, False)
    assert list(curves.method.unique()) == list(cfg.methods) and diverged == {}


# --------------------------------------------------------------------------------------------------
# memorization and privacy (issue 14): exact memorization and MIA AUC, forget train vs forget test
# --------------------------------------------------------------------------------------------------
def test_privacy_scores_equal_hand_computed_values_on_a_two_state_model():
    init, trans = np.array([0.75, 0.25]), np.array([[0.25, 0.75], [0.6, 0.4]])
    chain = MC.Chain("c", init, trans)
    params = [torch.log(torch.tensor(init)), torch.log(torch.tensor(trans))]
    model = MC.TabularModel(2)
    members = MC.SeqSet.of(np.array([[0, 1, 0], [0, 1, 1]]))
    nonmembers = MC.SeqSet.of(np.array([[0, 0, 1], [0, 1, 0]]))
    lp, hits = P.token_scores(model, params, members)
    assert torch.allclose(lp, torch.log(torch.tensor([[0.75, 0.75, 0.6], [0.75, 0.75, 0.4]], dtype=torch.float64)))
    assert hits.tolist() == [[True, True, True], [True, True, False]]  # argmax: start 0, 0 -> 1, 1 -> 0
    got = P.score(model, params, members, nonmembers, chain)
    assert got["exact_memorization"] == pytest.approx((1 + 2 / 3) / 2)
    # mean log-probs: members A=[0,1,0] -0.362, B=[0,1,1] -0.497; non-members C=[0,0,1] -0.654, D=A (a tie)
    # pairs: A>C, A=D (1/2), B>C, B<D -> 2.5/4
    assert got["mia_auc_loss"] == pytest.approx(0.625)
    assert got["mia_auc_ref_true"] == pytest.approx(0.5)  # the model is the chain: every score is 0, all ties
    assert metrics.privleak(got["mia_auc_loss"], 0.5) == pytest.approx(25.0)


def test_target_trained_on_few_forget_sequences_is_detected_and_the_oracle_is_at_chance():
    chains = MC.make_chains(30, 8, 0.5)   # many states, few sequences: the MLE memorizes its members
    rng = np.random.default_rng(0)
    retain = MC.SeqSet.of(MC.sample(chains["retain"], 500, 20, rng))
    members = MC.SeqSet.of(MC.sample(chains["forget1"], 50, 20, rng))
    nonmembers = MC.SeqSet.of(MC.sample(chains["forget1"], 500, 20, rng))
    model = MC.TabularModel(30, 0.01)
    target, _ = model.pretrain(MC.SeqSet.cat([retain, members]))
    oracle, _ = model.pretrain(retain)
    t = P.score(model, target, members, nonmembers, chains["forget1"])
    o = P.score(model, oracle, members, nonmembers, chains["forget1"])
    assert t["mia_auc_loss"] > 0.7 and t["mia_auc_ref_true"] > 0.65
    assert abs(o["mia_auc_loss"] - 0.5) < 0.1 and abs(o["mia_auc_ref_true"] - 0.5) < 0.1
    assert t["exact_memorization"] > o["exact_memorization"]
    assert metrics.privleak(t["mia_auc_loss"], o["mia_auc_loss"]) > 30


def test_a_run_writes_a_privacy_table_and_summary_block(tmp_path):
    cfg = M.make_config("length", n_retain=200, n_forget1=100, n_forget2=100, steps=8, lr=1.0, methods=("ga", "npo"),
                        n_records=3, linear_records=0)
    res = run_study(M.STUDY, cfg, tmp_path / "run", None).results
    table = __import__("pandas").read_csv(tmp_path / "run" / "privacy.csv")
    assert list(table.columns) == P.COLUMNS and len(table) == 2 * (1 + 2 * 2)
    oracle = table[table.method == "oracle"]
    assert (oracle.privleak == 0).all() and set(oracle.forget_set) == {"forget1", "forget2"}
    start = table[(table.method != "oracle") & (table.step == 0)]
    for s in ("forget1", "forget2"):  # step 0 is the target for every method
        assert start[start.forget_set == s][["exact_memorization", "mia_auc_loss"]].nunique().max() == 1
    assert set(table.step) == {0, 8}
    block = json.loads((tmp_path / "run" / "summary.json").read_text())["privacy"]
    assert block == json.loads(json.dumps(res.summary["privacy"]))
    ga = block["methods"]["ga"]["forget1"]
    end = table[(table.method == "ga") & (table.step == 8) & (table.forget_set == "forget1")].iloc[0]
    assert ga["end"]["mia_auc_loss"] == pytest.approx(end.mia_auc_loss) and block["end_step"] == {"ga": 8, "npo": 8}
    assert ga["end"]["exact_memorization"] < ga["target"]["exact_memorization"]  # GA un-learns the forget chain
