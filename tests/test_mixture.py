"""The §4 mixture experiment: pretraining optimality, exact KLs, replica batching, the paper's findings, CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from npo_sim import claims as C
from npo_sim import cli, losses, unlearn
from npo_sim.metrics import mean_kl
from npo_sim.runio import UserError
from npo_sim.settings import mixture as mx
from npo_sim.settings import mixture_adapter as ad
from npo_sim.settings import mixture_analysis as analysis
from npo_sim.settings.mixture_pretrain import _newton_step, _problem, pretrain_gd, pretrain_newton
from npo_sim.study import run_study


@pytest.fixture(scope="module")
def small():
    cfg = mx.SyntheticConfig(alpha=1, seeds=2, compare_pretrain=False)
    data = mx.make_data(cfg)
    theta, info = pretrain_newton(data)
    return cfg, data, theta, info


def _mean_nll(phi, y, theta):
    z = phi @ theta
    return torch.nn.functional.softplus(-(2 * y - 1) * z).mean()


def test_newton_reaches_the_optimum(small):
    """Independent autograd gradients of both models' mean NLL vanish at the Newton solution."""
    cfg, data, theta, info = small
    assert info["grad_norm_max"] < 1e-10
    for s in range(cfg.seeds):
        pf, pr = torch.tensor(data.phi_forget[s]), torch.tensor(data.phi_retain[s])
        yf, yr = torch.tensor(data.y_forget[s]), torch.tensor(data.y_retain[s])
        for col, (phi, y) in enumerate([(torch.cat([pf, pr]), torch.cat([yf, yr])), (pr, yr)]):
            th = torch.tensor(theta[s, :, col], requires_grad=True)
            (g,) = torch.autograd.grad(_mean_nll(phi, y, th), [th])
            assert g.norm() < 1e-8


def test_gd_recipe_descends_towards_newton_and_float32_is_faithful(small):
    cfg, data, theta, _ = small
    th64, info64 = pretrain_gd(data, steps=1500, lr=0.05, dtype=np.float64)
    th32, _ = pretrain_gd(data, steps=1500, lr=0.05, dtype=np.float32)
    info_n = small[3]
    # GD is not at the optimum yet, and its loss is above the exact minimum
    assert info64["grad_norm_max"] > 1e-4
    assert np.all(info64["loss"] >= info_n["loss"] - 1e-12)
    # float32 arithmetic (used for the comparison-only GD run) changes θ negligibly
    gap = np.linalg.norm(th64 - theta, axis=1)
    rounding = np.linalg.norm(th32 - th64, axis=1)
    assert np.all(rounding < 1e-3 * gap)


def test_newton_gram_hessian_equals_the_broadcast_hessian(small):
    """The weighted Gram Hessian ΦᵀDΦ (one matmul per model) equals the elementwise-broadcast one."""
    _, data, theta, _ = small
    phi, y, w = _problem(data)
    phiT = np.ascontiguousarray(np.swapaxes(phi, 1, 2))
    th = 0.3 * theta + 0.01
    z = phi @ th
    g = np.random.default_rng(0).normal(size=th.shape)
    p = 0.5 * (1.0 + np.tanh(0.5 * z))   # σ(z), without overflow
    curv = w * p * (1.0 - p)
    H = (phiT[:, None] * np.swapaxes(curv, 1, 2)[:, :, None, :]) @ phi[:, None]     # the old broadcast form
    want = np.swapaxes(np.linalg.solve(H, np.swapaxes(g, 1, 2)[..., None])[..., 0], 1, 2)
    np.testing.assert_allclose(_newton_step(phi, phiT, w, z, g), want, rtol=1e-9, atol=1e-12)


def _grad(adapter, objective, theta, theta_ref):
    """One gradient of objective.loss.sum() through unlearn.run's machinery (closed form or autograd)."""
    ref = unlearn.reference_inputs(adapter, objective, [theta_ref])
    needs = frozenset(objective.needs - set(ref))
    th = theta.clone().requires_grad_(True)
    if adapter.vjp is None:
        total = objective({**adapter.inputs([th], needs), **ref}).loss.sum()
        return torch.autograd.grad(total, [th])[0]
    with torch.no_grad():
        got = adapter.inputs([th], needs)
    x = {k: v.requires_grad_(k in unlearn.THETA_INPUTS) for k, v in got.items()}
    keys = [k for k in x if x[k].requires_grad]
    cot = torch.autograd.grad(objective({**x, **ref}).loss.sum(), [x[k] for k in keys], allow_unused=True)
    used = {k: g for k, g in zip(keys, cot) if g is not None}
    return adapter.vjp([th], {k: x[k].detach() for k in used}, used)[0]


@pytest.mark.parametrize("method", mx.SUPPORTED)
def test_closed_form_gradient_equals_autograd(small, method):
    """Float64: Φᵀ(c ⊙ ∂input/∂z) equals autograd through the model, for every synthetic method."""
    _, data, theta, _ = small
    closed = ad.MixtureAdapter(data, theta[..., 1], dtype=torch.float64)
    auto = ad.MixtureAdapter(data, theta[..., 1], dtype=torch.float64, closed_form=False)
    assert auto.vjp is None and closed.vjp is not None
    spec = mx.HYPERPARAMETERS[1.0][method]
    obj = losses.get_objective(spec.objective, **({"beta": spec.beta} if spec.beta is not None else {}))
    th_ref = torch.tensor(theta[..., 0])
    th = th_ref + 0.05 * torch.randn(th_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want, got = _grad(auto, obj, th, th_ref), _grad(closed, obj, th, th_ref)
    assert want.abs().max() > 1e-6
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)


def test_one_program_for_all_methods_equals_separate_runs(small):
    """Every method x seed in one program (closed form) gives the curves of one run per method, and the
    autograd reference path gives the same curves."""
    cfg, data, theta, _ = small
    specs = mx.HYPERPARAMETERS[1.0]
    th0 = torch.tensor(theta[..., 0])
    kw = dict(steps=30, record_at=[0, 10, 30], seeds=cfg.seed_list)
    closed = ad.MixtureAdapter(data, theta[..., 1], dtype=torch.float64)
    auto = ad.MixtureAdapter(data, theta[..., 1], dtype=torch.float64, closed_form=False)
    together = ad.run_methods(closed, th0, specs, **kw)
    apart = pd.concat([ad.run_methods(closed, th0, {k: v}, **kw) for k, v in specs.items()], ignore_index=True)
    reference = ad.run_methods(auto, th0, specs, **kw)
    cols = ["forget_distance", "retain_distance", "param_distance", "forget_loss", "forget_nll", "retain_loss"]
    key = ["method", "seed", "step"]
    assert (together[key] == apart[key]).all().all() and (together[key] == reference[key]).all().all()
    np.testing.assert_allclose(together[cols].to_numpy(), apart[cols].to_numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(together[cols].to_numpy(), reference[cols].to_numpy(), rtol=1e-10, atol=1e-14)
    at = lambda st: together[together.step == st].forget_distance.to_numpy()  # noqa: E731
    moved = at(30) < at(0)
    assert moved.mean() > 0.5   # not vacuous: most replicas moved


def test_seed_bootstrap_intervals():
    """The bootstrap's row 0 is the plain seed mean; the interval brackets it; Wilson matches a known value."""
    rng = np.random.default_rng(0)
    steps = np.arange(0, 50, 10)
    rows = [{"method": m, "seed": sd, "step": st, "forget_distance": v, "retain_distance": v / 10}
            for m in ("a", "b") for sd in range(8) for st, v in zip(steps, rng.lognormal(0, 1, steps.size))]
    curves = pd.DataFrame(rows)
    boot = analysis.Bootstrap(curves, ("a", "b"), B=500)
    want = curves[curves.method == "b"].groupby("step")["forget_distance"].mean().to_numpy()
    np.testing.assert_allclose(boot.forget[0, 1], want, rtol=1e-12)
    c = analysis.ci(boot.forget[:, 1, 2])
    assert c["ci"][0] <= c["estimate"] <= c["ci"][1] and c["ci"][0] < c["ci"][1]
    assert analysis.wilson(3, 5) == pytest.approx([0.2307, 0.8824], abs=1e-4)
    never = analysis.ci(boot.first_below("a", -1.0))
    assert never == {"estimate": None, "ci": [None, None]}


def _logsig(a: float) -> float:
    return -(max(-a, 0.0) + math.log1p(math.exp(-abs(a))))


def _kl_loop(logit_p, logit_q):
    """Per-sample loop over sum_y p(y) log(p(y)/q(y)), with log-probabilities that cannot overflow."""
    out = 0.0
    for a, b in zip(logit_p, logit_q):
        for lp, lq in ((_logsig(a), _logsig(b)), (_logsig(-a), _logsig(-b))):
            out += math.exp(lp) * (lp - lq)
    return out / len(logit_p)


def test_vectorized_kl_equals_brute_force():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 3, (4, 300)), rng.normal(0, 3, (4, 300))
    vec = ad.mean_binary_kl(torch.tensor(a), torch.tensor(b)).numpy()
    for i in range(4):
        assert vec[i] == pytest.approx(_kl_loop(a[i], b[i]), rel=1e-10)
        pa, pb = 1 / (1 + np.exp(-a[i])), 1 / (1 + np.exp(-b[i]))
        assert vec[i] == pytest.approx(mean_kl(np.stack([pa, 1 - pa], 1), np.stack([pb, 1 - pb], 1)), rel=1e-10)
    # stable where naive probabilities round to 0/1
    big = ad.binary_kl(torch.tensor([40.0, -40.0, 2000.0], dtype=torch.float64),
                       torch.tensor([-40.0, 40.0, 1.0], dtype=torch.float64))
    want = [_kl_loop([40.0], [-40.0]), _kl_loop([-40.0], [40.0]), _kl_loop([2000.0], [1.0])]
    assert big.tolist() == pytest.approx(want, rel=1e-12)
    assert want[0] == pytest.approx(40.0, rel=1e-12)


def test_step0_forget_distance_is_kl_retr_ref_for_every_method(small):
    cfg, data, theta, _ = small
    adapter = ad.MixtureAdapter(data, theta[..., 1], dtype=torch.float64)
    specs = mx.HYPERPARAMETERS[1.0]
    curves = ad.run_methods(adapter, torch.tensor(theta[..., 0]), specs, steps=1, record_at=[0],
                            seeds=cfg.seed_list)
    for s_idx, seed in enumerate(cfg.seed_list):
        ev = data.phi_eval_forget[s_idx]
        want = _kl_loop(ev @ theta[s_idx, :, 1], ev @ theta[s_idx, :, 0])
        got = curves[(curves["seed"] == seed) & (curves["step"] == 0)].set_index("method")["forget_distance"]
        assert set(got.index) == set(specs)
        assert np.allclose(got.to_numpy(), want, rtol=1e-9)
        assert 0.5 < want < 5.0


def test_methods_sharing_an_objective_batch_as_replicas(small):
    """Per-replica lr and β: two NPO variants in one tensor program equal two separate runs."""
    cfg, data, theta, _ = small
    adapter = ad.MixtureAdapter(data, theta[..., 1], dtype=torch.float64)
    th0 = torch.tensor(theta[..., 0])
    specs = {"slow": mx.MethodSpec("npo", 5e-3, 1.0), "fast": mx.MethodSpec("npo", 5e-2, 10.0)}
    kw = dict(steps=40, record_at=[0, 20, 40], seeds=cfg.seed_list)
    together = ad.run_methods(adapter, th0, specs, **kw)
    apart = pd.concat([ad.run_methods(adapter, th0, {k: v}, **kw) for k, v in specs.items()], ignore_index=True)
    cols = ["forget_distance", "retain_distance", "param_distance", "forget_loss"]
    key = ["method", "seed", "step"]
    a = together.sort_values(key).reset_index(drop=True)
    b = apart.sort_values(key).reset_index(drop=True)
    assert (a[key] == b[key]).all().all()
    np.testing.assert_allclose(a[cols].to_numpy(), b[cols].to_numpy(), rtol=1e-10)
    assert not np.allclose(a[a.method == "slow"][cols].to_numpy(), a[a.method == "fast"][cols].to_numpy())


def test_npo_small_beta_tracks_ga(small):
    cfg, data, theta, _ = small
    adapter = ad.MixtureAdapter(data, theta[..., 1], dtype=torch.float64)
    specs = {"ga": mx.MethodSpec("ga", 5e-3), "npo": mx.MethodSpec("npo", 5e-3, 1e-4)}
    c = ad.run_methods(adapter, torch.tensor(theta[..., 0]), specs, steps=100, record_at=range(0, 101, 10),
                       seeds=cfg.seed_list)
    ga, npo = (c[c.method == m].reset_index(drop=True) for m in ("ga", "npo"))
    for col in ("forget_distance", "retain_distance", "param_distance"):
        np.testing.assert_allclose(npo[col], ga[col], rtol=0.01)
    first, last = ga[ga.step == 0].forget_distance.to_numpy(), ga[ga.step == 100].forget_distance.to_numpy()
    assert np.all(last < 0.8 * first)   # the comparison is not vacuous: the models did move


FINDINGS_METHODS = ("ga", "ga_rt", "idk_rt", "npo", "npo_rt")


@pytest.fixture(scope="module")
def alpha1_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("alpha1")
    cfg = mx.SyntheticConfig(alpha=1, seeds=5, methods=FINDINGS_METHODS, compare_pretrain=False)
    run = run_study(mx.STUDY, cfg, out / "run", out / "figs")
    return out, run


def test_alpha1_writes_tables_and_figures(alpha1_run):
    out, _ = alpha1_run
    curves = pd.read_csv(out / "run" / "curves.csv")
    assert list(curves.columns[:7]) == ["method", "seed", "step", "forget_distance", "retain_distance",
                                        "param_distance", "forget_loss"]
    assert len(curves) == len(FINDINGS_METHODS) * 5 * 81
    saved = json.loads((out / "run" / "summary.json").read_text())
    assert saved["config"]["dpo_scale"] == "2/beta" and "dpo_note" in saved["config"]
    assert set(saved["methods"]) == set(FINDINGS_METHODS)
    assert set(saved["findings"]) == {"start_point", "forget_below_threshold", "ga_retain_diverges",
                                      "npo_better_tradeoff"}
    for name in ("synthetic_tradeoff_alpha1.png", "synthetic_distances_alpha1.png"):
        assert (out / "run" / name).stat().st_size > 10_000
        assert (out / "figs" / name).exists()


def test_alpha1_reproduces_the_findings_it_shows(alpha1_run):
    """Measured on seeds 0-4 (see the closing report for what does not hold)."""
    _, run = alpha1_run
    f = run.results.summary["findings"]
    # 1. start near (1.70, 0.02): the seed-mean point is (the 5-seed CI is too wide; see the 20-seed test)
    m = f["start_point"]["measured"]
    assert abs(m["forget_distance"] - 1.70) <= 0.34 and m["retain_distance"] <= 0.05
    # 2. IDK+RT never forgets; GA, GA+RT, NPO, NPO+RT get below 0.005 by step 1200 in most seeds
    per_seed = f["forget_below_threshold"]["min_forget_distance_per_seed"]
    assert min(per_seed["idk_rt"].values()) > 0.3
    for m in ("ga", "ga_rt", "npo", "npo_rt"):
        n, total = map(int, f["forget_below_threshold"]["seeds_reaching_by_horizon"][m].split("/"))
        assert n >= 3 and total == 5
    # 3. GA's retain distance blows up; GA+RT's keeps growing through the end
    ga, ga_rt = f["ga_retain_diverges"]["measured"]["ga"], f["ga_retain_diverges"]["measured"]["ga_rt"]
    assert ga["diverges"] and ga["end"] > 10 * ga["start"]
    assert ga_rt["end"] > 2 * ga_rt["half_way"] > 2 * ga_rt["start"]
    # 4. like-for-like, NPO beats GA and NPO+RT beats GA+RT at the deepest common forget level
    assert f["npo_better_tradeoff"]["paired_comparison"] == {"npo<ga": True, "npo_rt<ga_rt": True}
    r = f["npo_better_tradeoff"]["retain_at_level"]
    assert r["npo_rt"] < min(r["ga"], r["ga_rt"], r["npo"])


@pytest.mark.parametrize("argv, words", [
    (["--alpha", "2"], "alpha must be one of"),
    (["--seeds", "0"], "seeds must be >= 1"),
    (["--methods", "ga,foo"], "unknown method(s) foo"),
    (["--pretrain", "adam"], "pretrain must be one of"),
])
def test_bad_input_is_one_line_error(tmp_path, capsys, argv, words):
    out = tmp_path / "run"
    rc = cli.main(["synthetic", *argv, "--out", str(out), "--figures", ""])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and words in err
    assert not out.exists()


def test_start_point_holds_over_20_seeds():
    """The start point (step 0 only) over the default 20 seeds: its whole seed CI is within the paper's band."""
    cfg = mx.SyntheticConfig(alpha=1, steps=1, record_every=1, methods=("ga",))
    assert cfg.seeds == 20
    results = mx.simulate(cfg)
    f = results.summary["findings"]["start_point"]
    assert f["holds"] is True and 1.36 <= f["ci"]["forget_distance"]["ci"][0]
    assert analysis.claims(results, cfg)[0].verdict == C.HOLDS


def test_cli_small_run(tmp_path, capsys):
    rc = cli.main(["synthetic", "--alpha", "0", "--seeds", "1", "--steps", "50", "--methods", "ga,npo,dpo_rt",
                   "--compare-pretrain",
                   "--out", str(tmp_path / "run"), "--figures", str(tmp_path / "figs")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "alpha=0" in text and "dpo_rt" in text and "DPO scale=2/beta" in text
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["methods"]["npo"]["hyperparameters"] == {"objective": "npo", "lr": 5e-2, "beta": 10.0,
                                                      "source": "paper Table 1"}
    cmp_ = s["pretraining"]["newton_vs_gd"]
    assert cmp_["ref"]["param_distance"]["mean"] > 0 and s["pretraining"]["gd"]["arithmetic"] == "float32"
    assert (tmp_path / "figs" / "synthetic_tradeoff_alpha0.png").exists()


def test_hyperparameters_follow_the_papers_table1():
    """The table derived from registry facts equals the paper's Table 1 (and the extras' stated choices)."""
    extra = "extra (not in the paper)"
    for alpha, (lr_ga, lr_npo, b_npo, lr_dpo, b_dpo) in {1.0: (5e-4, 5e-3, 1.0, 5e-3, 0.1),
                                                         0.0: (1e-4, 5e-2, 10.0, 5e-2, 5.0)}.items():
        want = {
            "ga": mx.MethodSpec("ga", lr_ga), "ga_rt": mx.MethodSpec("ga_rt", lr_ga),
            "idk_rt": mx.MethodSpec("idk_rt", lr_ga), "npo": mx.MethodSpec("npo", lr_npo, b_npo),
            "npo_rt": mx.MethodSpec("npo_rt", lr_npo, b_npo), "dpo_rt": mx.MethodSpec("dpo_rt", lr_dpo, b_dpo),
            "ga_kl": mx.MethodSpec("ga_kl", lr_ga, source=f"{extra}: GA's lr"),
            "npo_kl": mx.MethodSpec("npo_kl", lr_npo, b_npo, source=f"{extra}: NPO's lr and β"),
            "simnpo": mx.MethodSpec("simnpo", lr_npo, 2.5, source=f"{extra}: NPO's lr, β=2.5, γ=0, |y|=1"),
        }
        hp = mx.HYPERPARAMETERS[alpha]
        assert {m: hp[m] for m in mx.METHODS} == want
        assert list(mx.METHODS) == list(want)   # the display order
        # the next objectives borrow the step size of their donor family (GA for weighted/distillation terms)
        assert hp["wga"] == mx.MethodSpec("wga", lr_ga, 1.0, source=f"{extra}: GA's lr, β=1")
        assert hp["undial"] == mx.MethodSpec("undial", lr_ga, None, source=f"{extra}: GA's lr")
        assert hp["kto"].lr == lr_npo and "rmu" not in hp


def test_config_is_validated_and_never_rewrites_itself():
    cfg = mx.SyntheticConfig(alpha=0.0, methods=("npo", "ga"))
    assert cfg.methods == ("npo", "ga") and list(cfg.specs) == ["npo", "ga"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.alpha = 1.0
    for bad, words in [(dict(methods="ga,npo"), "methods must be a tuple"), (dict(steps=0), "steps must be >= 1"),
                       (dict(methods=("ga", "ga")), "methods listed twice"), (dict(dtype="half"), "dtype must be")]:
        with pytest.raises(UserError, match=words):
            mx.SyntheticConfig(**bad)


def test_report_configs():
    full, smoke = mx.report_configs(False), mx.report_configs(True)
    assert list(full) == list(smoke) == ["synthetic_alpha1", "synthetic_alpha0"]
    assert full["synthetic_alpha1"] == mx.SyntheticConfig(alpha=1.0, beta_sweep=mx.REPORT_BETA_SWEEP)
    assert full["synthetic_alpha1"].seeds == 20 and not full["synthetic_alpha1"].compare_pretrain
    assert smoke["synthetic_alpha0"] == mx.SyntheticConfig(alpha=0.0, seeds=1, steps=400, compare_pretrain=False)
    assert smoke["synthetic_alpha1"].beta_sweep == mx.REPORT_BETA_SWEEP


def test_claims_are_finished_records(alpha1_run):
    out, run = alpha1_run
    saved = C.load(out / "run" / "claims.json")
    assert saved == run.claims and len(saved) == 4
    for c in saved:
        assert c.claim.startswith("§4 synthetic (α=1): ") and c.criterion
        assert c.figure == "synthetic_tradeoff_alpha1.png" and c.verdict in C.VERDICTS
    assert saved[0].verdict in (C.HOLDS, C.PARTLY)   # the start point's seed-mean holds (see above)
    assert json.loads((out / "run" / "config.json").read_text())["config_class"] == "SyntheticConfig"


def test_verdicts_downgrade_to_partly_by_the_weaker_reading():
    """A claim that fails as stated is "partly" when its weaker reading holds; unmeasured is "not measured"."""
    finding = {f.key: f for f in analysis.FINDINGS}
    div = {"claim": "c", "criterion": "r", "holds": False, "measured": {
        "ga": {"start": 1.0, "half_way": 2.0, "end": 30.0, "min": 1.0, "diverges_ci": True},
        "ga_rt": {"start": 1.0, "half_way": 2.0, "end": 3.0, "min": 1.0, "diverges_ci": False}}}
    verdict = lambda key, rec: analysis._claim(finding[key], rec, 0.0).verdict  # noqa: E731
    assert verdict("ga_retain_diverges", div) == C.PARTLY
    assert verdict("ga_retain_diverges", {**div, "holds": True}) == C.HOLDS
    assert verdict("ga_retain_diverges", {**div, "holds": None}) == C.NA
    div["measured"]["ga"]["diverges_ci"] = False
    assert verdict("ga_retain_diverges", div) == C.FAILS
    start = {"claim": "c", "criterion": "r", "holds": None,
             "measured": {"forget_distance": 0.057, "retain_distance": 0.058}}
    assert verdict("start_point", start) == "n/a (stated for α=1)"
