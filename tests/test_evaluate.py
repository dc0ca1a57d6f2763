"""TOFU aggregation (no model): formulas against hand computations, the published reference logs in
both layouts against a literal transcription of TOFU's definitions, and one-line errors for bad logs."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from full_scale import cli
from full_scale.aggregate import UTILITY_KEYS, aggregate, load_log, task_log
from npo_sim.runio import UserError

# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def _task(gt, para, perturb, rouge, layout="list"):
    cols = {"avg_gt_loss": gt, "avg_paraphrased_loss": para, "average_perturb_loss": perturb, "rougeL_recall": rouge}
    if layout == "dict":
        cols = {k: {str(i): v for i, v in enumerate(vals)} for k, vals in cols.items()}
    return cols


def _synthetic_log(layout="list"):
    """A tiny log whose statistics are computed by hand below (K=2 perturbed answers, N=2 samples)."""
    return {
        "eval_log.json": _task([0.5, 1.0], [1.0, 2.0], [[2.0, 3.0], [1.0, 2.0]], [1.0, 0.5], layout),
        "eval_real_author_wo_options.json": _task([1.0, 2.0], [1.0, 2.0], [[1.0, 2.0], [3.0, 1.0]], [0.0, 1.0], layout),
        "eval_real_world_wo_options.json": _task([0.2, 0.4], [0.2, 0.4], [[1.2, 1.4], [0.4, 0.4]], [0.25, 0.75],
                                                 layout),
        "eval_log_forget.json": _task([0.1, 3.0], [1.0, 0.5], [[1.5, 2.5], [0.5, 0.0]], [0.9, 0.1], layout),
    }


def to_dict_layout(log: dict) -> dict:
    """A list-layout log converted to TOFU's {str(index): value} layout."""
    out = {}
    for key, task in log.items():
        out[key] = {m: ({str(i): v for i, v in enumerate(col)} if isinstance(col, list) else col)
                    for m, col in task.items()}
    return out


def tofu_literal(unlearn: dict, retain: dict) -> dict:
    """TOFU's aggregate_eval_stat definitions transcribed literally: np.exp of raw losses, values taken
    in stored order, scipy's ks_2samp on the raw truth ratios R and scipy.stats.hmean for MU."""

    def vals(col):
        return np.array(list(col.values()) if isinstance(col, dict) else list(col), dtype=float)

    names = {"eval_log.json": "retain", "eval_real_author_wo_options.json": "real_authors",
             "eval_real_world_wo_options.json": "world_facts", "eval_log_forget.json": "forget"}
    out = {}
    for key, name in names.items():
        t = unlearn[key]
        if "eval_log" in key:
            prob = np.mean(np.exp(-vals(t["avg_gt_loss"])))
        else:
            p_true = np.exp(-vals(t["avg_gt_loss"]))
            p_false = np.exp(-vals(t["average_perturb_loss"]))
            prob = np.mean(p_true / (p_true + p_false.sum(-1)))
        r = np.exp(vals(t["average_perturb_loss"]).mean(-1) - vals(t["avg_paraphrased_loss"]))
        tr = np.mean(np.minimum(r, 1 / r)) if "forget" in key else np.mean(np.maximum(0, 1 - 1 / r))
        out.update({f"{name}_prob": prob, f"{name}_rouge": vals(t["rougeL_recall"]).mean(), f"{name}_truth_ratio": tr})
    out["model_utility"] = stats.hmean([out[k] for k in UTILITY_KEYS])

    def r_forget(log):
        t = log["eval_log_forget.json"]
        return np.exp(vals(t["average_perturb_loss"]).mean(-1) - vals(t["avg_paraphrased_loss"]))

    out["forget_quality"] = stats.ks_2samp(r_forget(unlearn), r_forget(retain)).pvalue
    return out


# ---------------------------------------------------------------------------------------------------
# formulas on synthetic arrays, by hand
# ---------------------------------------------------------------------------------------------------


def test_components_equal_hand_computation():
    res = aggregate(_synthetic_log(), _synthetic_log())
    e = math.exp
    # probability: retain/forget mean exp(-gt); with options p_true / (p_true + sum p_perturbed)
    assert res["retain_prob"] == pytest.approx((e(-0.5) + e(-1.0)) / 2, abs=1e-12)
    assert res["forget_prob"] == pytest.approx((e(-0.1) + e(-3.0)) / 2, abs=1e-12)
    ra = (e(-1) / (e(-1) + e(-1) + e(-2)) + e(-2) / (e(-2) + e(-3) + e(-1))) / 2
    assert res["real_authors_prob"] == pytest.approx(ra, abs=1e-12)
    wf = (e(-0.2) / (e(-0.2) + e(-1.2) + e(-1.4)) + e(-0.4) / (3 * e(-0.4))) / 2
    assert res["world_facts_prob"] == pytest.approx(wf, abs=1e-12)
    # ROUGE: mean recall
    assert res["retain_rouge"] == pytest.approx(0.75)
    assert res["real_authors_rouge"] == pytest.approx(0.5)
    assert res["forget_rouge"] == pytest.approx(0.5)
    # truth ratio R = exp(mean perturbed - paraphrased)
    r_ret = [e(2.5 - 1.0), e(1.5 - 2.0)]  # others: mean(max(0, 1 - 1/R))
    assert res["retain_truth_ratio"] == pytest.approx((1 - 1 / r_ret[0] + 0.0) / 2, abs=1e-12)
    r_ra = [e(1.5 - 1.0), e(2.0 - 2.0)]
    assert res["real_authors_truth_ratio"] == pytest.approx((1 - 1 / r_ra[0] + 0.0) / 2, abs=1e-12)
    r_wf = [e(1.3 - 0.2), e(0.4 - 0.4)]
    assert res["world_facts_truth_ratio"] == pytest.approx((1 - 1 / r_wf[0]) / 2, abs=1e-12)
    r_f = [e(2.0 - 1.0), e(0.25 - 0.5)]  # forget: mean(min(R, 1/R))
    assert res["forget_truth_ratio"] == pytest.approx((1 / r_f[0] + r_f[1]) / 2, abs=1e-12)
    # model utility: harmonic mean of the nine components
    nine = [res[k] for k in UTILITY_KEYS]
    assert len(nine) == 9 and "forget_prob" not in UTILITY_KEYS
    assert res["model_utility"] == pytest.approx(9 / sum(1 / v for v in nine), rel=1e-12)
    # and the whole thing equals the literal transcription
    lit = tofu_literal(_synthetic_log(), _synthetic_log())
    for k, v in lit.items():
        assert res[k] == pytest.approx(v, rel=1e-12, abs=1e-15), k


def test_forget_quality_of_a_log_against_itself_is_one():
    assert aggregate(_synthetic_log(), _synthetic_log())["forget_quality"] == 1.0


def test_forget_quality_is_ks_pvalue_of_raw_truth_ratios():
    rng = np.random.default_rng(0)
    a, b = _synthetic_log(), _synthetic_log()
    n = 40
    for log, shift in ((a, 0.0), (b, 0.4)):
        f = log["eval_log_forget.json"]
        f["avg_paraphrased_loss"] = list(rng.uniform(0.5, 2.0, n))
        f["average_perturb_loss"] = (rng.uniform(0.5, 2.5, (n, 2)) + shift).tolist()
        f["avg_gt_loss"] = list(rng.uniform(0, 1, n))
        f["rougeL_recall"] = list(rng.uniform(0, 1, n))
    res = aggregate(a, b)
    fa, fb = a["eval_log_forget.json"], b["eval_log_forget.json"]
    ra = np.exp(np.mean(fa["average_perturb_loss"], 1) - fa["avg_paraphrased_loss"])
    rb = np.exp(np.mean(fb["average_perturb_loss"], 1) - fb["avg_paraphrased_loss"])
    ks = stats.ks_2samp(ra, rb)
    assert res["forget_quality"] == pytest.approx(ks.pvalue, rel=1e-12)
    assert res["ks_statistic"] == pytest.approx(ks.statistic)
    assert 0 < res["forget_quality"] < 1
    # it is NOT the KS test of min(R, 1/R) (a non-monotone transform changes the ranks)
    assert res["forget_quality"] != pytest.approx(stats.ks_2samp(np.minimum(ra, 1 / ra), np.minimum(rb, 1 / rb)).pvalue)


def test_a_zero_component_gives_zero_utility():
    log = _synthetic_log()
    log["eval_log.json"]["rougeL_recall"] = [0.0, 0.0]
    assert aggregate(log, log)["model_utility"] == 0.0


def test_huge_losses_stay_finite():
    log = _synthetic_log()
    log["eval_real_author_wo_options.json"]["avg_gt_loss"] = [900.0, 2.0]
    log["eval_real_author_wo_options.json"]["average_perturb_loss"] = [[800.0, 1000.0], [3.0, 1.0]]
    log["eval_log_forget.json"]["average_perturb_loss"] = [[1500.0, 1500.0], [0.5, 0.0]]
    res = aggregate(log, _synthetic_log())
    e = math.exp
    assert res["real_authors_prob"] == pytest.approx(
        (e(-100) / (e(-100) + 1 + e(-200)) + e(-2) / (e(-2) + e(-3) + e(-1))) / 2)
    assert all(math.isfinite(v) for k, v in res.items() if isinstance(v, float))


# ---------------------------------------------------------------------------------------------------
# the published reference logs, both layouts
# ---------------------------------------------------------------------------------------------------


def _pairs(root: Path):
    """(ckpt log, retain log) for every model: full vs each retainYY (TOFU dict layout and NPO list
    layout), and each NPO-layout retain log evaluated as a checkpoint against the TOFU retain90 log."""
    pairs = []
    for model_dir in sorted((root / "tofu").iterdir()):
        full = model_dir / "full" / "eval_log_aggregated.json"
        assert full.is_file()
        for layout in ("tofu", "npo"):
            for rdir in sorted((root / layout / model_dir.name).glob("retain*")):
                pairs.append((full, rdir / "eval_log_aggregated.json"))
        for rdir in sorted((root / "npo" / model_dir.name).glob("retain*")):
            pairs.append((rdir / "eval_log_aggregated.json", model_dir / "retain90" / "eval_log_aggregated.json"))
    return pairs


@pytest.fixture(scope="module")
def ref_logs(tofu_reference_logs):
    cache = {}

    def get(path):
        if path not in cache:
            cache[path] = load_log(path)
        return cache[path]

    return tofu_reference_logs, get


def test_reference_logs_every_pair_both_layouts(ref_logs):
    root, get = ref_logs
    pairs = _pairs(root)
    layouts = set()
    for ck, rt in pairs:
        layouts.add(type(get(ck)["eval_log.json"]["avg_gt_loss"]).__name__)
        layouts.add(type(get(rt)["eval_log_forget.json"]["avg_paraphrased_loss"]).__name__)
    assert layouts == {"dict", "list"}
    assert len(pairs) == 2 * 3 + 7 + 3 + 7 + 3  # tofu retain logs, npo retain logs, npo-as-checkpoint
    for ck, rt in pairs:
        res = aggregate(get(ck), get(rt))
        lit = tofu_literal(get(ck), get(rt))
        for k, v in lit.items():
            assert res[k] == pytest.approx(v, rel=1e-9, abs=1e-300), (ck, rt, k)
        for k in ("forget_quality", "model_utility", *UTILITY_KEYS, "forget_prob", "forget_rouge",
                  "forget_truth_ratio"):
            assert math.isfinite(res[k]) and 0.0 <= res[k] <= 1.0, (ck, rt, k, res[k])
        assert (res["n_forget"] != res["n_forget_retain_log"]) == bool(res["notes"])


def test_published_numbers_llama_full_vs_retain90(ref_logs):
    root, get = ref_logs
    res = aggregate(get(root / "tofu/llama2-7b/full/eval_log_aggregated.json"),
                    get(root / "tofu/llama2-7b/retain90/eval_log_aggregated.json"))
    # the fine-tuned target model has not forgotten anything: FQ is tiny, utility as in the TOFU paper
    assert res["forget_quality"] < 1e-10
    assert 0.55 < res["model_utility"] < 0.7
    assert res["forget_rouge"] > 0.9 and res["forget_prob"] > 0.9


def test_retain_model_vs_itself_and_list_to_dict_conversion(ref_logs):
    root, get = ref_logs
    for path in sorted((root / "npo").glob("*/retain*/eval_log_aggregated.json")):
        lst = get(path)
        dct = to_dict_layout(lst)
        assert isinstance(dct["eval_log.json"]["avg_gt_loss"], dict)
        a, b = aggregate(lst, lst), aggregate(dct, dct)
        assert a == b
        assert a["forget_quality"] == 1.0


def test_dict_layout_is_aligned_by_index_not_by_stored_order():
    log = _synthetic_log("dict")
    shuffled = copy.deepcopy(log)
    f = shuffled["eval_log_forget.json"]
    f["avg_paraphrased_loss"] = dict(reversed(list(f["avg_paraphrased_loss"].items())))
    assert aggregate(log, log) == aggregate(shuffled, shuffled)


# ---------------------------------------------------------------------------------------------------
# bad or mismatched logs: one-line error, exit != 0
# ---------------------------------------------------------------------------------------------------


def _write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


def _cli_error(capsys, ck, rt):
    rc = cli.main(["aggregate", "--ckpt-log", str(ck), "--retain-log", str(rt)])
    captured = capsys.readouterr()
    assert rc != 0
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_cli_prints_one_json_object(tmp_path, capsys):
    ck = _write(tmp_path, "ck.json", _synthetic_log("dict"))
    rt = _write(tmp_path, "rt.json", _synthetic_log("list"))
    assert cli.main(["aggregate", "--ckpt-log", str(ck), "--retain-log", str(rt)]) == 0
    res = json.loads(capsys.readouterr().out)
    for k in ("forget_quality", "model_utility", *UTILITY_KEYS, "forget_rouge", "forget_prob", "forget_truth_ratio"):
        assert isinstance(res[k], float)
    assert res["forget_quality"] == 1.0


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda lg: lg.pop("eval_log_forget.json"), "missing eval set 'eval_log_forget.json'"),
        (lambda lg: lg["eval_log.json"].pop("rougeL_recall"), "missing per-sample key 'rougeL_recall'"),
        (lambda lg: lg["eval_real_world_wo_options.json"]["avg_gt_loss"].__setitem__(1, float("nan")), "not finite"),
        (lambda lg: lg["eval_log.json"]["average_perturb_loss"][1].pop(), "2 perturbed answers at sample 0 but 1"),
        (lambda lg: lg["eval_log.json"]["avg_gt_loss"].pop(), "covers samples"),
    ],
)
def test_bad_checkpoint_log(tmp_path, capsys, mutate, message):
    log = _synthetic_log()
    mutate(log)
    ck = _write(tmp_path, "ck.json", log)
    rt = _write(tmp_path, "rt.json", _synthetic_log())
    line = _cli_error(capsys, ck, rt)
    assert message in line and "ck.json" in line
    with pytest.raises(UserError):
        aggregate(log, _synthetic_log())


def test_mismatched_and_missing_logs(tmp_path, capsys):
    ck = _write(tmp_path, "ck.json", _synthetic_log())
    line = _cli_error(capsys, ck, tmp_path / "nope.json")
    assert "not found" in line and "nope.json" in line
    # a retain log whose forget set has 3 perturbed answers instead of 2
    rt = _synthetic_log()
    rt["eval_log_forget.json"]["average_perturb_loss"] = [[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]
    line = _cli_error(capsys, ck, _write(tmp_path, "rt.json", rt))
    assert "2 perturbed answers" in line and "has 3" in line
    # a retain log without the forget set: FQ cannot be computed -> error, never a silent None
    rt = _synthetic_log()
    rt.pop("eval_log_forget.json")
    line = _cli_error(capsys, ck, _write(tmp_path, "rt2.json", rt))
    assert "eval_log_forget.json" in line
    # not JSON at all
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "not valid JSON" in _cli_error(capsys, bad, ck)


def test_task_log_accepts_short_names():
    t = task_log(_synthetic_log(), "forget")
    assert t.n == 2 and t.perturb.shape == (2, 2)
    np.testing.assert_allclose(t.log_truth_ratio, [1.0, -0.25])
