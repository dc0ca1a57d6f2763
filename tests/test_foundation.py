"""Metrics, the generic unlearning loop, atomic run files and the console scripts."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from npo_sim import metrics, runio, unlearn
from npo_sim.losses import get_objective


# ---------------------------------------------------------------- metrics
def test_mean_kl_matches_hand_computation():
    p = np.array([[0.5, 0.5], [0.9, 0.1]])
    q = np.array([[0.25, 0.75], [0.5, 0.5]])
    want = np.mean([0.5 * np.log(2) + 0.5 * np.log(0.5 / 0.75), 0.9 * np.log(1.8) + 0.1 * np.log(0.2)])
    assert metrics.mean_kl(p, q) == pytest.approx(want, rel=1e-12)
    assert metrics.mean_kl(p, p) == 0.0
    assert metrics.mean_kl([[1.0, 0.0]], [[0.5, 0.5]]) == pytest.approx(np.log(2))
    assert np.allclose(metrics.kl_from_logprobs(np.log(p), np.log(q)).mean(), want)


def test_ks_pvalue_and_harmonic_mean():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=200), rng.normal(0.5, 1, size=150)
    assert metrics.ks_pvalue(a, a) == 1.0
    assert metrics.ks_pvalue(a, b) == pytest.approx(stats.ks_2samp(a, b).pvalue)
    with pytest.raises(ValueError):
        metrics.ks_pvalue([], a)
    with pytest.raises(ValueError):
        metrics.ks_pvalue([np.nan, 1.0], a)
    assert metrics.harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    assert metrics.harmonic_mean([0.3, 0.0]) == 0.0
    with pytest.raises(ValueError):
        metrics.harmonic_mean([0.5, -1.0])


def test_growth_fits_recover_exact_laws():
    t = np.logspace(0, 4, 30)
    lin = metrics.linear_fit(t, 3.0 * t + 2.0)
    assert lin.slope == pytest.approx(3.0) and lin.intercept == pytest.approx(2.0) and lin.r2 == pytest.approx(1.0)
    lg = metrics.log_fit(t, 0.7 * np.log(t + 1.0) - 1.0)
    assert lg.slope == pytest.approx(0.7) and lg.r2 == pytest.approx(1.0)
    # a linear law is a poor log law on a long horizon, and vice versa
    assert metrics.log_fit(t, t).r2 < 0.8 and metrics.linear_fit(t, np.log1p(t)).r2 < 0.8


# ---------------------------------------------------------------- the generic loop
class _Logistic:
    """G replicas of a logistic model on the same forget/retain data."""

    def __init__(self, X, s, Xr, sr):
        self.X, self.s, self.Xr, self.sr = X, s, Xr, sr
        self.calls = 0

    def inputs(self, params, keys):
        (theta,) = params  # (G, d)
        self.calls += 1
        out = {}
        if "logp" in keys:
            out["logp"] = F.logsigmoid(self.s * (theta @ self.X.T))
        if "retain_logp" in keys:
            out["retain_logp"] = F.logsigmoid(self.sr * (theta @ self.Xr.T))
        if "retain_logits" in keys:
            z = theta @ self.Xr.T
            out["retain_logits"] = torch.stack([torch.zeros_like(z), z], -1)
        return out

    def metrics(self, params):
        return {"norm": params[0].norm(dim=-1)}


def _adapter(G=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X, Xr = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(12, 4, generator=g, dtype=torch.float64)
    s, sr = torch.ones(8, dtype=torch.float64), -torch.ones(12, dtype=torch.float64)
    theta0 = torch.randn(4, generator=g, dtype=torch.float64).expand(G, 4).clone()
    return _Logistic(X, s, Xr, sr), theta0


def test_run_batched_replicas_equal_separate_runs_and_cache_reference():
    ad, theta0 = _adapter()
    lr = torch.tensor([0.05, 0.1, 0.2], dtype=torch.float64)
    beta = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    obj = get_objective("npo_kl", beta=beta)
    res = unlearn.run(ad, obj, [theta0], steps=20, lr=lr, record_at=[0, 10, 20])
    assert ad.calls == 1 + 21  # one cached reference evaluation, then one per step (incl. the final record)
    assert set(res) >= {"step", "replica", "norm", "loss", "forget_loss", "retain_loss", "npo_weight"}
    assert len(res["step"]) == 3 * 3
    at0 = res["step"] == 0
    assert np.allclose(res["npo_weight"][at0], 1.0) and np.allclose(res["retain_loss"][at0], 0.0, atol=1e-14)
    for i in range(3):
        ad_i, th_i = _adapter(G=1)
        one = unlearn.run(ad_i, get_objective("npo_kl", beta=float(beta[i])), [th_i[:1]], steps=20,
                          lr=float(lr[i]), record_at=[20])
        sel = (res["step"] == 20) & (res["replica"] == i)
        assert res["loss"][sel][0] == pytest.approx(one["loss"][0], rel=1e-12)


def test_run_raises_on_divergence_and_bad_steps():
    class _Bad(_Logistic):
        def inputs(self, params, keys):
            return {"logp": params[0] @ self.X.T * float("nan")}

    ad, theta0 = _adapter()
    with pytest.raises(unlearn.NonFiniteLoss):
        unlearn.run(_Bad(ad.X, ad.s, ad.Xr, ad.sr), get_objective("ga"), [theta0], steps=3, lr=0.1, record_at=[])
    with pytest.raises(ValueError):
        unlearn.run(ad, get_objective("ga"), [theta0], steps=0, lr=0.1, record_at=[])
    assert unlearn.log_steps(1000, 10)[0] == 0 and unlearn.log_steps(1000, 10)[-1] == 1000


# ---------------------------------------------------------------- run files
def test_atomic_writes_leave_no_partial_file(tmp_path):
    p = tmp_path / "a" / "summary.json"
    runio.write_json(p, {"x": np.float64(1.5), "t": torch.tensor([1, 2])})
    assert json.loads(p.read_text()) == {"x": 1.5, "t": [1, 2]}

    def boom(fh):
        fh.write(b"partial")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        runio._atomic(tmp_path / "b.json", boom)
    assert list(tmp_path.iterdir()) == [tmp_path / "a"]


@pytest.mark.parametrize("script", ["npo-sim", "npo-tofu"])
def test_console_scripts_print_help(script):
    mod = {"npo-sim": "npo_sim.cli", "npo-tofu": "full_scale.cli"}[script]
    out = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage:" in out.stdout


HEAVY = ("matplotlib", "transformers", "pandas", "full_scale")


def _imported_after(argv: list[str]) -> set[str]:
    """Top-level packages that ``npo-sim *argv`` imported, run in a fresh interpreter (``--help`` exits 0)."""
    code = ("import sys\nfrom npo_sim.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('MODULES ' + ' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.strip().splitlines()[-1].split()[1:])


@pytest.mark.parametrize("argv", [["--help"], [], ["markov", "--help"]])
def test_npo_sim_help_and_light_commands_import_no_heavy_package(argv):
    # the dispatcher lists every subcommand without importing it; only the chosen command's module loads
    # (`figures --help` lists the run names, which imports the settings: it is not a light command)
    mods = _imported_after(argv)
    assert not {m for m in HEAVY if m in mods} and "torch" not in mods, argv


def test_lazy_dispatch_lists_every_command_and_markov_presets_agree(capsys):
    from npo_sim.cli import COMMANDS, main
    from npo_sim.cli import markov as cli_markov
    from npo_sim.settings.markov import PRESETS

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert cli_markov.PRESET_NAMES == tuple(PRESETS)


def test_full_scale_never_imported_by_npo_sim():
    code = "import sys, npo_sim.losses, npo_sim.theory, npo_sim.metrics, npo_sim.unlearn; " \
           "print(any(m.startswith('full_scale') or m.startswith('transformers') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False"
