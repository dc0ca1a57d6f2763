"""`npo-sim figures --quick` regenerates every synthetic figure and a complete claims table."""

from __future__ import annotations

import re

import pytest

from npo_sim import report
from npo_sim.cli import main as npo_sim_main
from npo_sim.runio import UserError

CLAIM_KEYWORDS = ["Prop. 1", "W = 2π", "bounded below", "Thm 2 (GA)", "Thm 2 (NPO)", "Lemma 4 envelope",
                  "exponentially slower", "§4 synthetic (α=1)", "§4 synthetic (α=0)", "Markov length",
                  "Markov memorization", "Divergence law on sequences (tabular",
                  "Divergence law on sequences (transformer", "TOFU"]


@pytest.fixture(scope="module")
def quick_figures(tmp_path_factory):
    root = tmp_path_factory.mktemp("figs")
    rc = npo_sim_main(["figures", "--quick", "--out", str(root / "figures"), "--runs", str(root / "runs")])
    assert rc == 0
    return root


def test_every_expected_figure_is_written(quick_figures):
    fig = quick_figures / "figures"
    for run in report.planned_runs(smoke=True):
        run_dir = quick_figures / "runs" / run.name
        assert (run_dir / "claims.json").is_file() and (run_dir / "config.json").is_file(), run.name
        for c in report.load_claims(run_dir):   # every claim's figure was written
            assert (fig / c.figure).stat().st_size > 1000, c.figure
    for name in ("theory_logit_shifts.png", "theory_steps_to_reach.png", "theory_beta_sweep.png",
                 "synthetic_distances_alpha1.png", "markov_memorization_tabular.png"):
        assert (fig / name).exists(), name


def test_report_has_one_complete_row_per_claim(quick_figures):
    text = (quick_figures / "figures" / "REPORT.md").read_text()
    rows = [line for line in text.splitlines() if re.match(r"^\| \d+ \|", line)]
    for kw in CLAIM_KEYWORDS:
        assert any(kw in r for r in rows), kw
    for r in rows:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]]
        assert len(cells) == 7 and all(cells), r     # #, claim, measured, verdict, criterion, checks, figure
        assert re.search(r"\*\*(holds[^*]*|partly|does not hold|not measured|vacuous[^*]*|n/a[^*]*)\*\*", cells[3]), r
    # no criterion is met by the null method (that would read "vacuous"), and the controls are reported
    assert not any("**vacuous" in r for r in rows)
    assert any("null method" in r for r in rows)
    # the header explains every verdict word
    for word in ("holds", "partly", "does not hold", "not measured", "vacuous"):
        assert f"- **{word}**:" in text, word
    # numbered 1..n, no gaps
    assert [int(r.split("|")[1]) for r in rows] == list(range(1, len(rows) + 1))


def test_report_only_rebuilds_from_run_dirs(quick_figures):
    fig, runs = quick_figures / "figures", quick_figures / "runs"
    before = (fig / "REPORT.md").read_text()
    res = report.run_figures(fig, runs, smoke=True, report_only=True)
    after = (fig / "REPORT.md").read_text()
    table = lambda t: [ln for ln in t.splitlines() if re.match(r"^\| \d+ \|", ln)]  # noqa: E731
    assert table(before) == table(after) and len(res["claims"]) >= len(CLAIM_KEYWORDS)


def test_unknown_study_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown studies"):
        report.run_figures(tmp_path / "f", tmp_path / "r", smoke=True, only=["nope"])
    assert not (tmp_path / "f").exists()
