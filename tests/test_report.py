"""npo-tofu report on fabricated run directories, and the side-by-side figure on fabricated frames."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from full_scale.cli import main as tofu_main
from full_scale.evaluate import CURVE_COLUMNS
from full_scale.report import best_fq_row, build_report, lm_curves, load_run
from full_scale.tofu_claims import claims
from npo_sim.claims import NA, VERDICTS
from npo_sim.plots.side_by_side import fit_series, plot_side_by_side
from npo_sim.runio import UserError

TRAIN_COLUMNS = ("step", "epoch", "lr", "loss", "forget_loss", "retain_loss", "forget_logp", "forget_logp_per_token",
                 "retain_nll", "npo_weight", "param_dist", "tokens", "collapse_nll", "degenerate_frac",
                 "step_seconds", "collapse")


def _make_run(d, method, fq, mu, split="forget10", steps_per_epoch=3, dist=lambda s: 0.1 * s):
    d.mkdir(parents=True)
    cfg = {"command": "unlearn", "method": method, "forget": split, "retain": "retain90", "preset": "mini",
           "epochs": len(fq), "model": "runs/target/model"}
    (d / "config.json").write_text(json.dumps(cfg))
    n = steps_per_epoch * len(fq)
    log = pd.DataFrame({c: np.zeros(n) for c in TRAIN_COLUMNS})
    log["step"] = np.arange(1, n + 1)
    log["epoch"] = (log["step"] - 1) // steps_per_epoch + 1
    log["param_dist"] = [dist(s) for s in log["step"]]
    log["forget_logp"] = -10.0 - log["step"]
    log["forget_logp_per_token"] = log["forget_logp"] / 20
    log.to_csv(d / "train_log.csv", index=False)
    curve = pd.DataFrame({c: np.full(len(fq), 0.5) for c in CURVE_COLUMNS})
    curve["epoch"] = np.arange(1, len(fq) + 1)
    curve["forget_quality"], curve["model_utility"] = fq, mu
    curve.to_csv(d / "eval_curve.csv", index=False)
    return d


def _target(path, mu, fq=1e-6, split="mini-forget10"):
    path.write_text(json.dumps({"model_utility": mu, "forget_quality": fq, "forget_split": split,
                                "forget_rouge": 0.9, "n_forget": 40}))
    return path


@pytest.fixture
def runs(tmp_path):
    # target MU 0.5 -> threshold 0.45
    ga = _make_run(tmp_path / "ga", "ga", fq=[1e-4, 1e-2, 0.3, 0.5], mu=[0.48, 0.46, 0.40, 0.10])
    npo = _make_run(tmp_path / "npo", "npo_rt", fq=[1e-5, 2e-3, 5e-2, 1e-3], mu=[0.50, 0.47, 0.45, 0.44])
    return ga, npo, _target(tmp_path / "target.json", 0.5)


def test_best_fq_by_hand(runs, tmp_path, capsys):
    ga, npo, target = runs
    out = tmp_path / "rep"
    rc = tofu_main(["report", str(ga), str(npo), "--target-eval", str(target), "--out", str(out)])
    assert rc == 0
    table = pd.read_csv(out / "best_fq.csv").set_index("method")
    # GA: epochs with MU >= 0.45 are 1 (1e-4) and 2 (1e-2) -> best 1e-2 at epoch 2; 0.5 at epoch 4 has MU 0.10
    assert table.loc["ga", "best_fq"] == pytest.approx(1e-2)
    assert table.loc["ga", "best_epoch"] == 2
    assert table.loc["ga", "mu_at_best"] == pytest.approx(0.46)
    assert table.loc["ga", "max_fq_any_mu"] == pytest.approx(0.5)
    # NPO+RT: MU 0.45 at epoch 3 is exactly at the threshold 0.9 * 0.5 -> counts
    assert table.loc["npo_rt", "best_fq"] == pytest.approx(5e-2)
    assert table.loc["npo_rt", "best_epoch"] == 3
    assert table.loc["npo_rt", "fq_last"] == pytest.approx(1e-3)
    assert table.loc["npo_rt", "mu_threshold"] == pytest.approx(0.45)
    assert (table["split"] == "mini-forget10").all()
    for name in ("fq_mu_trajectories.png", "best_fq.md", "eval_curves.csv", "summary.json"):
        assert (out / name).stat().st_size > 0
    assert (out / "fq_mu_trajectories.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "best_fq.md").read_text()
    assert "| mini-forget10 | GA | 0.01 | 2 |" in md
    curves = pd.read_csv(out / "eval_curves.csv")
    assert sorted(curves[curves.method == "ga"].epoch) == [0, 1, 2, 3, 4]  # epoch 0 = the target
    lm = pd.read_csv(out / "lm_curves.csv")
    assert list(lm.columns) == ["split", "method", "step", "param_distance", "forget_logp_sum", "forget_logp_token"]
    assert len(lm) == 24 and lm[lm.method == "ga"].param_distance.iloc[-1] == pytest.approx(1.2)
    assert "mini-forget10 | GA" in capsys.readouterr().out


def test_no_epoch_above_threshold_and_no_target():
    curve = pd.DataFrame({"epoch": [1, 2], "forget_quality": [0.1, 0.2], "model_utility": [0.1, 0.2]})
    row = best_fq_row(curve, target_mu=1.0)
    assert math.isnan(row["best_fq"]) and row["max_fq_any_mu"] == pytest.approx(0.2) and row["last_epoch"] == 2
    assert math.isnan(best_fq_row(curve, None)["mu_threshold"])


def test_lm_curves_from_train_log(tmp_path):
    r = load_run(_make_run(tmp_path / "r", "npo", fq=[0.1, 0.2], mu=[0.5, 0.5], split="mini-forget50"))
    lm = lm_curves([r])
    assert (lm.split == "mini-forget50").all()
    np.testing.assert_allclose(lm.forget_logp_token, (-10.0 - lm.step) / 20)


@pytest.mark.parametrize("argv, message", [
    (["report", "--out", "{tmp}/o"], "no run directories"),
    (["report", "{tmp}/nope", "--out", "{tmp}/o"], "run directory not found"),
    (["report", "{tmp}/bad", "--out", "{tmp}/o"], "missing eval_curve.csv"),
])
def test_bad_input(tmp_path, capsys, argv, message):
    bad = _make_run(tmp_path / "bad", "ga", fq=[0.1], mu=[0.5])
    (bad / "eval_curve.csv").unlink()
    rc = tofu_main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_duplicate_runs_rejected(runs, tmp_path):
    ga, _, _ = runs
    with pytest.raises(UserError, match="two runs"):
        build_report([ga, ga], tmp_path / "o")


def test_side_by_side(tmp_path):
    steps = np.arange(0, 50)
    theory = pd.concat([pd.DataFrame({"config_id": cid, "role": "flow", "method": m, "step": steps,
                                      "dist_l2": d, "forget_prob": np.exp(-0.01 * d)})
                        for cid, m, d in ((0, "ga", 0.3 * steps), (1, "npo", 2 * np.log1p(steps)))])
    markov = pd.concat([pd.DataFrame({"model": "tabular", "method": m, "step": steps, "param_dist": d,
                                      "logp_forget": -d})
                        for m, d in (("ga", 0.5 * steps + 1), ("npo", np.log1p(steps)))])
    lm = pd.DataFrame({"split": "mini-forget10", "method": np.repeat(["ga", "npo", "npo_rt"], 50),
                       "step": np.tile(steps + 1, 3), "param_distance": np.tile(0.2 * steps, 3),
                       "forget_logp_sum": -1.0, "forget_logp_token": np.tile(-0.1 * steps, 3)})
    fits = plot_side_by_side(theory, markov, lm, tmp_path / "sbs.png", figures_dir=tmp_path / "figs")
    assert (tmp_path / "sbs.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "figs" / "sbs.png").is_file()
    # exact laws are recovered: GA linear slope, NPO log-fit slope, R^2 = 1
    assert fits["logistic lab"]["ga"]["dist"]["slope"] == pytest.approx(0.3)
    assert fits["logistic lab"]["npo"]["dist"]["slope"] == pytest.approx(2.0)
    assert fits["Markov (divergence preset)"]["ga"]["loglik"]["slope"] == pytest.approx(-0.5)
    assert fits["logistic lab"]["npo"]["dist"]["r2"] == pytest.approx(1.0)
    assert set(fits["LM tofu-mini (mini-forget10)"]) == {"ga", "npo"}  # npo_rt is not drawn
    # a missing setting is drawn as "not available", not an error
    assert plot_side_by_side(None, markov, None, tmp_path / "partial.png")["logistic lab"] == {}
    assert fit_series("ga", np.array([0.0, 1.0]), np.array([0.0, 1.0])) is None


def test_study_plan_dry_run(capsys):
    """The stage plan (no training): mini defaults, and the full-TOFU GPU path with an accelerate launcher."""
    rc = tofu_main(["study", "--model", "tiny-llama:1m", "--methods", "ga,npo", "--out", "/nonexistent/s", "--dry-run",
                    "--select", "last", "--seeds", "0"])
    lines = capsys.readouterr().out.strip().splitlines()
    # 3 fine-tunes, 2 evals x 2 splits, 2 law runs (SGD), 2 methods x 2 splits
    assert rc == 0 and len(lines) == 3 + 4 + 2 + 4
    assert "--split retain90" in lines[1] and "--split retain50" in lines[2]
    assert "--ds-size 40 --max-new-tokens 32" in lines[3]
    assert re.search(r"--retain-log /nonexistent/s/eval/oracle-mini-forget50-[0-9a-f]{12}/eval_log_aggregated.json",
                     lines[-1])

    rc = tofu_main(["study", "--preset", "tofu", "--model", "meta-llama/Llama-2-7b-chat-hf", "--methods", "npo_rt",
                    "--launcher", "accelerate launch --config_file full_scale/accelerate/single_gpu.yaml",
                    "--out", "/nonexistent/t", "--dry-run"])
    lines = capsys.readouterr().out.strip().splitlines()
    # 2 fine-tunes, oracle + target evals on val and test, the grid (3 lrs x 2 betas), then the finals
    assert rc == 0 and len(lines) == 2 + 4 + 6 + 1 and lines[-1].startswith("# then 3 final runs")
    launcher = "accelerate launch --config_file full_scale/accelerate/single_gpu.yaml"
    assert lines[0].startswith(f"{launcher} -m full_scale.cli")
    assert "--split retain90" in lines[1] and "--ds-size 300 --max-new-tokens 128" in lines[2]
    assert tofu_main(["study", "--methods", "nope", "--dry-run"]) == 2
    assert tofu_main(["study", "--preset", "tofu", "--dry-run"]) == 2  # --model is required


def test_study_stage_dirs_are_named_by_what_they_compute():
    """A stage's directory key changes with what it computes (and what its inputs are), not with where or
    how fast it runs: an added method reuses the target, oracles and evals; a new fine-tuning lr does not."""
    from full_scale.study import plan, stage_key, study_config

    def dirs(**kw):
        cfg = study_config("mini", model="tiny-llama:1m", out="/x/s", select="last", seeds=(0,), law_lr=0, **kw)
        return {st.name: st.out for st in plan(cfg)}

    base = dirs(methods=("ga",))
    more = dirs(methods=("ga", "npo"))
    assert all(more[name] == d for name, d in base.items())          # ga's run, the target, oracles, evals reused
    assert set(more) - set(base) == {"unlearn mini-forget10 npo", "unlearn mini-forget50 npo"}
    assert dirs(methods=("ga",), threads=2) == base                  # how fast: not in the key
    lr = dirs(methods=("ga",), finetune_lr=1e-3)   # target and oracles are fine-tuned with it: every stage changes
    assert all(lr[name] != d for name, d in base.items())
    epochs = dirs(methods=("ga",), epochs=3)        # unlearning epochs: only the unlearning runs change
    assert {name for name in base if epochs[name] != base[name]} == {n for n in base if n.startswith("unlearn")}
    # the key: the command without where/how fast it runs, the study dir written as <study>
    a = ("unlearn", "--model", "/x/s/finetuned/t/model", "--out", "/x/s/u", "--threads", "1", "--no-progress")
    b = ("unlearn", "--model", "/y/s/finetuned/t/model", "--out", "/y/s/v", "--threads", "2")
    assert stage_key(a, "/x/s") == stage_key(b, "/y/s") != stage_key(a[:3] + ("--lr", "1"), "/x/s")


def test_tofu_claims_from_the_committed_study(tmp_path):
    """The TOFU rows of REPORT.md come from full_scale, read off figures/tofu_mini/ (summary.json, lm_curves.csv)."""
    rows = claims(Path(__file__).resolve().parents[1] / "figures")
    assert len(rows) == 6 and all(c.verdict in VERDICTS and c.criterion and c.measured for c in rows)
    assert all(c.claim.startswith("TOFU mini (") for c in rows)
    (missing,) = claims(tmp_path)  # no study outputs: one row that says so
    assert missing.verdict == NA and "make tofu-mini" in missing.measured
