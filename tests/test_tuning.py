"""The tofu-mini study's declared tuning protocol, its law runs and its REPORT.md claims.

The selection is checked by hand on a made-up grid; the law rule on closed-form curves; the claims on
made-up summaries, including the untouched target and a do-nothing method (which must not pass); and
the whole study once, end to end, at ``--quick``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from full_scale import laws as L
from full_scale.study import plan, select_configs, study_config
from full_scale.tofu_claims import claims
from npo_sim.claims import FAILS, HOLDS, NA, PARTLY
from npo_sim.runio import UserError

REPO = Path(__file__).resolve().parents[1]


def _cfg(out, **kw):
    base = {"model": "tiny-llama:1m", "methods": ("ga", "npo"), "out": str(out)}
    return study_config("mini", **{**base, **kw})


def _flag(cmd, name):
    cmd = list(cmd)
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_plan_grid_law_and_finals(tmp_path):
    """Grid runs: the tune split's val questions, one run per lr (x β factor for NPO), judged against the
    oracle's val log; law runs: SGD, constant lr, no weight decay, no eval; finals (given a selection): every
    split x seed at the selected lr / β / epochs on the test questions."""
    cfg = _cfg(tmp_path / "s", grid_lrs=(1e-3, 3e-3), grid_betas=(1.0, 5.0), seeds=(0, 1))
    stages = plan(cfg)
    tune = [st for st in stages if st.kind == "tune"]
    assert len(tune) == 2 + 2 * 2      # ga: 2 lrs; npo: 2 lrs x 2 betas
    assert {(_flag(st.cmd, "--lr"), _flag(st.cmd, "--beta")) for st in tune if _flag(st.cmd, "--method") == "npo"} \
        == {("0.001", None), ("0.003", None), ("0.001", "0.5"), ("0.003", "0.5")}
    assert all(_flag(st.cmd, "--eval-questions") == "val" and _flag(st.cmd, "--forget") == "mini-forget10"
               and "oracle-mini-forget10-val-" in _flag(st.cmd, "--retain-log")
               and _flag(st.cmd, "--lr-schedule") == "constant" and _flag(st.cmd, "--epochs") == "5" for st in tune)
    law = [st for st in stages if st.kind == "law"]
    assert [_flag(st.cmd, "--method") for st in law] == ["ga", "npo"]
    assert all(_flag(st.cmd, "--optimizer") == "sgd" and _flag(st.cmd, "--weight-decay") == "0"
               and _flag(st.cmd, "--warmup-epochs") == "0" and "--eval-every-epoch" not in st.cmd for st in law)
    assert not [st for st in stages if st.kind == "unlearn"]   # the finals wait for the selection
    evals = [st.name for st in stages if st.kind == "eval"]
    assert "eval target on mini-forget10 (val)" in evals and "eval target on mini-forget50 (val)" not in evals
    sel = {"ga": {"lr": 1e-3, "beta": None, "epochs": 2}, "npo": {"lr": 3e-3, "beta": 0.5, "epochs": 4}}
    finals = [st for st in plan(cfg, sel) if st.kind == "unlearn"]
    assert len(finals) == 2 * 2 * 2  # splits x seeds x methods
    for st in finals:
        m = _flag(st.cmd, "--method")
        assert (_flag(st.cmd, "--lr"), _flag(st.cmd, "--beta"), _flag(st.cmd, "--epochs")) == \
            {"ga": ("0.001", None, "2"), "npo": ("0.003", "0.5", "4")}[m]
        assert _flag(st.cmd, "--eval-questions") == "test" and "-test-" in _flag(st.cmd, "--retain-log")
    # the grid's stages are the same with and without the selection (their directories are reused)
    assert [st.out for st in plan(cfg, sel) if st.kind == "tune"] == [st.out for st in tune]
    with pytest.raises(UserError, match="grid"):
        dataclasses.replace(cfg, grid_lrs=())
    with pytest.raises(UserError, match="tune split"):
        _cfg(tmp_path, tune_split="mini-forget90")


def _write_tune(st, rows):
    st.out.mkdir(parents=True)
    (st.out / "run.json").write_text("{}")
    pd.DataFrame(rows).to_csv(st.out / "eval_curve.csv", index=False)


def test_select_configs_by_hand(tmp_path):
    """Highest val FQ among the points that keep val MU ≥ 0.9 x target; none kept: the highest MU; ties:
    lower val forget ROUGE, then higher MU, then lower lr, earlier epoch."""
    cfg = _cfg(tmp_path / "s", grid_lrs=(1e-3, 3e-3), grid_betas=(1.0, 5.0))
    stages = plan(cfg)
    tgt = next(st for st in stages if st.name == "eval target on mini-forget10 (val)")
    tgt.out.mkdir(parents=True)
    (tgt.out / "summary.json").write_text(json.dumps({"model_utility": 0.8}))   # floor 0.72
    pts = lambda *fm: [{"epoch": i + 1, "forget_quality": f, "model_utility": m, "forget_rouge": 0.5}  # noqa: E731
                       for i, (f, m) in enumerate(fm)]
    runs = {(st.cmd[list(st.cmd).index("--method") + 1], _flag(st.cmd, "--lr"), _flag(st.cmd, "--beta")): st
            for st in stages if st.kind == "tune"}
    # GA never keeps MU: the point with the highest MU (lr 1e-3 epoch 1), whatever its FQ
    _write_tune(runs["ga", "0.001", None], pts((0.01, 0.70), (0.9, 0.1)))
    _write_tune(runs["ga", "0.003", None], pts((0.5, 0.60), (0.9, 0.0)))
    # NPO: 0.6 at MU 0.5 is not kept; 0.3 is tied between lr 1e-3 β 0.1 epoch 2 (MU 0.75) and lr 3e-3 β 0.5
    # epoch 1 (MU 0.75): the lower lr wins
    _write_tune(runs["npo", "0.001", None], pts((0.1, 0.8), (0.3, 0.75), (0.6, 0.5)))
    _write_tune(runs["npo", "0.003", "0.5"], pts((0.3, 0.75), (0.2, 0.74)))
    _write_tune(runs["npo", "0.001", "0.5"], pts((0.3, 0.73)))                 # same FQ, lower MU
    chosen, grid = select_configs(cfg, stages)     # npo lr 3e-3 β 0.1 has not finished: left out of the grid
    assert len(grid) == 2 + 2 + 3 + 2 + 1
    assert chosen["ga"] == pytest.approx({"lr": 1e-3, "beta": None, "beta_value": 0.1, "epochs": 1, "val_fq": 0.01,
                                          "val_mu": 0.70, "kept_mu": False, "mu_floor": 0.72, "target_val_mu": 0.8})
    assert (chosen["npo"]["lr"], chosen["npo"]["beta"], chosen["npo"]["epochs"], chosen["npo"]["kept_mu"]) == \
        (1e-3, None, 2, True)
    # with the tie broken the other way round (a higher MU at lr 3e-3 β 0.5) the larger lr and β are taken
    (runs["npo", "0.003", "0.5"].out / "eval_curve.csv").write_text(
        pd.DataFrame(pts((0.3, 0.76))).to_csv(index=False))
    chosen, _ = select_configs(cfg, stages)
    assert (chosen["npo"]["lr"], chosen["npo"]["beta"], chosen["npo"]["epochs"]) == (3e-3, 0.5, 1)
    # equal FQ: the point that forgot more (lower forget ROUGE) wins over a higher MU
    rows = pts((0.3, 0.8), (0.3, 0.75))
    rows[1]["forget_rouge"] = 0.1
    (runs["npo", "0.001", "0.5"].out / "eval_curve.csv").write_text(pd.DataFrame(rows).to_csv(index=False))
    chosen, _ = select_configs(cfg, stages)
    assert (chosen["npo"]["lr"], chosen["npo"]["beta"], chosen["npo"]["epochs"]) == (1e-3, 0.5, 2)


# --------------------------------------------------------------------------------------------------
# the law rule
# --------------------------------------------------------------------------------------------------
def _log(dist):
    t = np.arange(1, len(dist) + 1)
    return pd.DataFrame({"step": t, "param_dist": dist})


def test_growth_exponent_on_closed_forms():
    t = np.arange(1, 101, dtype=float)
    assert L.growth_exponent(t, 0.3 * t) == pytest.approx(1.0)
    assert L.growth_exponent(t, 0.02 * t ** 2) == pytest.approx(2.0)
    # log growth: the local exponent of log(1+t) over t in [50, 100] is about 1/log(75) ≈ 0.23
    p = L.growth_exponent(t, np.log1p(t))
    assert 0.15 < p < 0.3
    assert L.growth_exponent(t, np.full(100, 2.0)) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(L.growth_exponent(t, np.zeros(100)))     # a do-nothing run: no exponent


def test_law_rows_follow_or_not():
    t = np.arange(1, 101, dtype=float)
    assert L.law_row("ga", _log(0.3 * t), "finished")["follows"] is True          # linear, predicted linear
    assert L.law_row("ga", _log(0.02 * t ** 2), "finished")["follows"] is False   # faster than linear: not the law
    assert L.law_row("ga", _log(np.log1p(t)), "finished")["follows"] is False     # log growth is not GA's law
    assert L.law_row("npo", _log(np.log1p(t)), "finished")["follows"] is True
    assert L.law_row("npo", _log(0.3 * t), "finished")["follows"] is False
    assert L.law_row("undial", _log(2 - np.exp(-t / 5)), "finished")["follows"] is True   # converges
    assert L.law_row("ga", _log(np.zeros(100)), "finished")["follows"] is None    # did not move
    assert L.law_row("rmu", _log(0.3 * t), "finished")["follows"] is None         # no law (n/a)
    row = L.law_row("npo", None, "stopped")
    assert row["follows"] is None and row["status"] == "stopped"


# --------------------------------------------------------------------------------------------------
# the REPORT.md claims
# --------------------------------------------------------------------------------------------------
METRICS = ("forget_quality", "model_utility", "privleak_min_k_plus_plus", "fluency_judge_logp")


def _summary(rows, seeds=(0, 1, 2)):
    """rows: (split, method, {metric: (mean, lo, hi)}); the target's go into last_epoch, the others into
    the across-seeds table."""
    last, across = [], []
    for split, method, vals in rows:
        rec = {"split": split, "method": method, "epoch": 0 if method == "target" else 3}
        for k, (m, lo, hi) in vals.items():
            rec.update({k: m, f"{k}_lo": lo, f"{k}_hi": hi})
            if method != "target":
                across.append({"split": split, "method": method, "metric": k, "n_seeds": len(seeds), "mean": m,
                               "lo": lo, "hi": hi, "values": ""})
        last.append(rec)
    return {"last_epoch": last, "seeds": {"seeds": list(seeds), "across_seeds": across}, "mu_fraction": 0.9,
            "settings": {"model": "m", "law_runs": {"lr": 0.01, "split": "s"}}}


def _claims(tmp_path, summary, law=None):
    d = tmp_path / "figs" / "tofu_mini"
    d.mkdir(parents=True, exist_ok=True)
    (d / "summary.json").write_text(json.dumps(summary))
    if law is not None:
        law.to_csv(d / "law.csv", index=False)
    return {c.claim.split(": ", 1)[1][:31]: c for c in claims(tmp_path / "figs")}


TARGET = {"forget_quality": (1e-4, 1e-5, 1e-3), "model_utility": (0.8, 0.78, 0.82),
          "privleak_min_k_plus_plus": (80.0, 70.0, 90.0), "fluency_judge_logp": (-2.0, -2.2, -1.8)}


def test_tofu_claims_hold_and_fail(tmp_path):
    good = {"forget_quality": (0.3, 0.1, 0.5), "model_utility": (0.79, 0.77, 0.81),
            "privleak_min_k_plus_plus": (5.0, -10.0, 20.0), "fluency_judge_logp": (-2.3, -2.6, -2.0)}
    ga = {"forget_quality": (0.01, 0.0, 0.05), "model_utility": (0.75, 0.7, 0.8),
          "privleak_min_k_plus_plus": (-60.0, -70.0, -50.0), "fluency_judge_logp": (-9.0, -9.5, -8.5)}
    rows = [(s, who, v) for s in ("mini-forget10", "mini-forget50")
            for who, v in (("target", TARGET), ("ga", ga), ("npo", good))]
    c = _claims(tmp_path, _summary(rows))
    assert c["NPO-based methods strike a bett"].verdict == HOLDS
    assert c["NPO-based methods are the first"].verdict == HOLDS
    assert c["NPO-based unlearning moves priv"].verdict == HOLDS
    assert c["NPO's answers stay fluent while"].verdict == HOLDS
    assert c["divergence law on the LM (GA li"].verdict == NA     # no law runs
    # the untouched target in place of NPO (and of GA): nothing holds
    same = [(s, who, TARGET) for s in ("mini-forget10", "mini-forget50") for who in ("target", "ga", "npo")]
    c = _claims(tmp_path, _summary(same))
    assert {k: v.verdict for k, v in c.items() if "law" not in k and "divergence" not in k} == {
        "NPO-based methods strike a bett": FAILS, "NPO-based methods are the first": FAILS,
        "NPO-based unlearning moves priv": FAILS, "NPO's answers stay fluent while": FAILS}
    # NPO's mean above 0.05 but its interval reaching below: only partly on forget50; overlapping GA: fails
    wide = {**good, "forget_quality": (0.2, 0.0, 0.4)}
    c = _claims(tmp_path, _summary([(s, who, v) for s in ("mini-forget10", "mini-forget50")
                                    for who, v in (("target", TARGET), ("ga", ga), ("npo", wide))]))
    assert c["NPO-based methods are the first"].verdict == PARTLY
    assert c["NPO-based methods strike a bett"].verdict == FAILS   # lo 0.0 is not above GA's hi 0.05
    # NPO losing MU below 0.9 x target: it no longer counts
    lost = {**good, "model_utility": (0.5, 0.45, 0.55)}
    c = _claims(tmp_path, _summary([(s, who, v) for s in ("mini-forget10", "mini-forget50")
                                    for who, v in (("target", TARGET), ("ga", ga), ("npo", lost))]))
    assert c["NPO-based methods strike a bett"].verdict == FAILS


def test_law_claims(tmp_path):
    t = np.arange(1, 101, dtype=float)
    runs = {"ga": (_log(0.3 * t), "finished"), "npo": (_log(np.log1p(t)), "finished"),
            "undial": (_log(2 - np.exp(-t / 5)), "finished"), "rmu": (_log(0.3 * t), "finished")}
    summary = _summary([("s", "target", TARGET)])
    c = _claims(tmp_path, summary, L.law_table(runs))
    assert c["divergence law on the LM (GA li"].verdict == HOLDS
    assert c["every method's divergence follo"].verdict == HOLDS
    assert c["every method's divergence follo"].measured.startswith("3 of 3")   # rmu has no law
    runs["npo"] = (_log(0.3 * t), "finished")           # NPO as linear as GA: neither row holds
    c = _claims(tmp_path, summary, L.law_table(runs))
    assert c["divergence law on the LM (GA li"].verdict == FAILS
    assert c["every method's divergence follo"].verdict == PARTLY
    zero = {m: (_log(np.zeros(100)), "finished") for m in ("ga", "npo")}   # do-nothing runs
    c = _claims(tmp_path, summary, L.law_table(zero))
    assert c["divergence law on the LM (GA li"].verdict == FAILS
    assert c["every method's divergence follo"].verdict == NA


# --------------------------------------------------------------------------------------------------
# the whole study, smoke-sized
# --------------------------------------------------------------------------------------------------
def test_quick_study_end_to_end(tmp_path, tofu_data_dir):
    """``npo-tofu study --quick``: fine-tune, evaluate, tune, select, law runs, two seeds, report, figures."""
    out, figs = tmp_path / "s", tmp_path / "figs"
    env = {**os.environ, "NPO_TOFU_DIR": str(tofu_data_dir), "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "full_scale.cli", "study", "--quick", "--out", str(out), "--figures", str(figs),
           "--threads", "1", "--jobs", "2", "--theory-dir", "", "--markov-dir", ""]   # no side-by-side panels
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    sel = json.loads((out / "tune" / "selection.json").read_text())
    assert set(sel) == {"ga", "npo"} and all(c["epochs"] == 1 and c["lr"] == 1e-3 for c in sel.values())
    mini = figs / "tofu_mini"
    for name in ("selection.md", "seeds.md", "law.md", "law_curves.png", "fq_mu_trajectories.png", "results.md"):
        assert (mini / name).is_file(), name
    s = json.loads((mini / "summary.json").read_text())
    assert s["seeds"]["seeds"] == [0, 1] and s["settings"]["select"] == "val"
    assert {r["questions"] for r in s["runs"] for r in [r["config"]["eval"]]} == {"test"}
    rows = claims(figs)
    assert len(rows) == 6 and all(r.claim.startswith("TOFU mini (tiny-llama:1m)") for r in rows)
    # a second invocation finds every stage done and only reports
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert again.returncode == 0 and "[done]" not in again.stdout and again.stdout.count("[skip]") >= 14
