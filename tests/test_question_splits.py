"""tofu-mini's mini-forget90 split and the declared val/test split of the evaluation questions
(:func:`full_scale.data.question_subset`): data-level checks without a model, and one ``npo-tofu eval``
round trip on the untrained tiny checkpoint."""

from __future__ import annotations

import json

import pytest

from full_scale import aggregate as A
from full_scale import cli
from full_scale import config as C
from full_scale import data as D
from full_scale import evaluate as E
from npo_sim.runio import UserError


@pytest.fixture(scope="module")
def full_index(tofu_data_dir):
    """(question, answer) -> row index in full.json (one question text occurs twice in full.json)."""
    return {(r["question"], r["answer"]): i for i, r in enumerate(D.load_split("full", tofu_data_dir))}


def _row(full_index, r) -> int:
    return full_index[(r["question"], r["answer"])]


# --------------------------------------------------------------------------------------------------
# mini-forget90
# --------------------------------------------------------------------------------------------------


def test_mini_forget90_is_the_last_18_authors_and_retain10_the_first_2(tofu_data_dir, full_index):
    forget, retain = D.mini_splits("mini-forget90", tofu_data_dir)
    assert len(forget) == 360 and len(retain) == 40
    f_rows = [_row(full_index, r) for r in forget]
    r_rows = [_row(full_index, r) for r in retain]
    assert f_rows == list(range(3640, 4000)) and r_rows == list(range(3600, 3640))  # authors 182-199 / 180-181
    assert not set(f_rows) & set(r_rows)
    pool = [r["question"] for r in D.mini_pool(tofu_data_dir)]
    assert sorted(pool) == sorted(r["question"] for r in forget + retain) and len(pool) == 400
    # the retain side under every name: retain_of, the inverse mapping, the finetune corpus, forget_retain
    assert D.retain_of("mini-forget90") == "retain10" == D.MINI_RETAIN_OF["forget90"]
    assert D.mini_retain("retain10", tofu_data_dir) == retain
    assert C.finetune_spec("retain", "forget90").split == "retain10"
    corpus = D.mini_finetune_corpus("retain10", tofu_data_dir)
    assert [r["question"] for r in corpus[:40]] == [r["question"] for r in retain]
    f2, r2 = D.forget_retain("forget90", "retain10", "mini", tofu_data_dir)
    assert f2 == forget and r2 == retain
    assert "mini-forget90" in E.MINI_SPLITS


def test_mini_forget90_eval_sets_take_small_sets_whole(tofu_data_dir):
    sets, sources, _ = E.eval_sets("mini-forget90", tofu_data_dir, 300)
    assert len(sets["eval_log.json"]) == 40  # only 2 retain authors: ds_size > set size takes the set
    assert len(sets["eval_log_forget.json"]) == 300  # 360 cut to ds_size, as TOFU
    sets, _, _ = E.eval_sets("mini-forget90", tofu_data_dir, 1000, "val")
    assert [len(v) for v in sets.values()] == [8, 20, 24, 72]
    assert not {i.question for i in sets["eval_log_forget.json"]} & {i.question for i in sets["eval_log.json"]}
    spec = C.EvalSpec("mini-forget90", data_dir=str(tofu_data_dir), ds_size=5, questions="test",
                      extra_metrics=True)
    hold, src, _ = E.holdout_set(spec)
    assert len(hold) == 5 and "holdout" in src


# --------------------------------------------------------------------------------------------------
# val / test questions
# --------------------------------------------------------------------------------------------------

AUTHOR_SETS = ("forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed")


@pytest.mark.parametrize("split", AUTHOR_SETS)
def test_val_is_positions_0_5_10_15_of_each_author(split, tofu_data_dir, full_index):
    rows = D.load_split(split, tofu_data_dir)
    val, test = D.question_subset(rows, "val"), D.question_subset(rows, "test")
    q = lambda rs: [r["question"] for r in rs]  # noqa: E731
    assert not set(q(val)) & set(q(test)) and sorted(q(val) + q(test)) == sorted(q(rows))
    assert D.question_subset(rows, "all") == rows
    by_author: dict[int, list[int]] = {}
    for r in val:
        i = _row(full_index, r)
        by_author.setdefault(i // D.AUTHOR_SIZE, []).append(i % D.AUTHOR_SIZE)
    authors = {_row(full_index, r) // D.AUTHOR_SIZE for r in rows}
    assert set(by_author) == authors and all(v == [0, 5, 10, 15] for v in by_author.values())
    assert len(val) == 4 * len(authors) and len(test) == 16 * len(authors)


def test_mini_sets_follow_the_same_author_rule(tofu_data_dir, full_index):
    """The val questions of every mini forget/retain set are the pool's val questions."""
    pool_val_rows = D.question_subset(D.mini_pool(tofu_data_dir), "val")
    assert {_row(full_index, r) % 20 for r in pool_val_rows} == {0, 5, 10, 15} and len(pool_val_rows) == 80
    pool_val = {r["question"] for r in pool_val_rows}
    for name in E.MINI_SPLITS:
        sets, _, _ = E.eval_sets(name, tofu_data_dir, 1000, "val")
        for key in ("eval_log.json", "eval_log_forget.json"):
            got = {it.question for it in sets[key]}
            full_set = {it.question for it in E.eval_sets(name, tofu_data_dir, 1000)[0][key]}
            assert got == full_set & pool_val, (name, key)
        test, _, _ = E.eval_sets(name, tofu_data_dir, 1000, "test")
        for key in sets:
            assert not {i.question for i in sets[key]} & {i.question for i in test[key]}


@pytest.mark.parametrize("split,n", [("real_authors_perturbed", 100), ("world_facts_perturbed", 117)])
def test_non_author_sets_take_every_5th_row(split, n, tofu_data_dir):
    rows = D.load_split(split, tofu_data_dir)
    assert len(rows) == n
    val, test = D.question_subset(rows, "val", author_blocks=False), D.question_subset(rows, "test", False)
    assert val == rows[::5] and len(val) + len(test) == n
    assert not {r["question"] for r in val} & {r["question"] for r in test}


def test_subset_is_taken_before_ds_size_and_bad_input_is_refused(tofu_data_dir):
    sets, _, _ = E.eval_sets("forget10", tofu_data_dir, 3, "test")
    rows = D.load_split("forget10_perturbed", tofu_data_dir)
    assert [it.question for it in sets["eval_log_forget.json"]] == [rows[i]["question"] for i in (1, 2, 3)]
    assert E.eval_sets("forget10", tofu_data_dir, 7) == E.eval_sets("forget10", tofu_data_dir, 7, "all")
    with pytest.raises(UserError, match="question subset"):
        D.question_subset(rows, "train")
    with pytest.raises(UserError, match="not whole authors"):
        D.question_subset(rows[:30], "val")
    with pytest.raises(UserError, match="questions must be one of"):
        C.EvalSpec("mini-forget10", questions="dev")
    # unlearn --eval-questions reaches the per-epoch spec
    argv = ["unlearn", "--preset", "mini", "--forget", "forget90", "--model", "m", "--method", "npo", "--out", "o",
            "--eval-every-epoch", "--retain-log", "r.json"]
    p = cli.parser()
    assert cli.unlearn_job(p.parse_args(argv + ["--eval-questions", "val"])).eval.questions == "val"
    job = cli.unlearn_job(p.parse_args(argv))
    assert job.eval.questions == "all" and job.eval.forget_split == "mini-forget90" and job.task.retain == "retain10"


def test_aggregate_refuses_logs_of_different_subsets(tofu_data_dir):
    one = {"avg_gt_loss": {"0": 1.0, "1": 2.0}, "avg_paraphrased_loss": {"0": 1.0, "1": 2.0},
           "average_perturb_loss": {"0": [2.0, 3.0], "1": [1.0, 4.0]}, "rougeL_recall": {"0": 0.5, "1": 0.2}}
    ck = {k: one for k in A.TASKS} | {"questions": "test"}
    rt = {k: one for k in A.TASKS} | {"questions": "val"}
    with pytest.raises(UserError, match="'test' questions"):
        A.aggregate(ck, rt, allow_mismatched=False)
    out = A.aggregate(ck, rt)
    assert any("question subsets differ" in n for n in out["notes"])
    assert A.aggregate(ck, ck, allow_mismatched=False)["forget_quality"] == 1.0
    assert A.log_questions({}) == "all"


# --------------------------------------------------------------------------------------------------
# npo-tofu eval --questions on the tiny checkpoint
# --------------------------------------------------------------------------------------------------


def test_eval_cli_questions(tiny_ckpt, tofu_data_dir, tmp_path, capsys):
    base = ["eval", "--model", str(tiny_ckpt), "--forget-split", "mini-forget90", "--data-dir", str(tofu_data_dir),
            "--max-new-tokens", "2", "--no-extra-metrics", "--threads", "1"]
    # val: only the val questions, the 8 of the 2 retain authors taken whole under --ds-size 10
    val = tmp_path / "val"
    assert cli.main(base + ["--ds-size", "10", "--questions", "val", "--out", str(val)]) == 0
    log = json.loads((val / "eval_log_aggregated.json").read_text())
    summary = json.loads((val / "summary.json").read_text())
    assert log["questions"] == "val" and summary["questions"] == "val" and summary["config"]["questions"] == "val"
    expect, _, _ = E.eval_sets("mini-forget90", tofu_data_dir, 10, "val")
    n = {k: len(log[k]["avg_gt_loss"]) for k in A.TASKS}
    assert n == {"eval_log.json": 8, "eval_real_author_wo_options.json": 10,
                 "eval_real_world_wo_options.json": 10, "eval_log_forget.json": 10}
    for k in A.TASKS:
        prompts = [log[k]["generated_text"][str(i)][0] for i in range(n[k])]
        assert prompts == [f"Q: {it.question}\nA:" for it in expect[k]], k
        assert summary["eval_sets"][k]["n"] == n[k]
    # an oracle log made on the val questions cannot score a test-question evaluation
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert cli.main(base + ["--ds-size", "10", "--questions", "test", "--retain-log", str(val), "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mismatched logs" in err[0] and "'val'" in err[0] and "'test'" in err[0], err
    assert not bad.exists()
    # --questions all is the default, byte for byte, and writes no questions key into the log
    outs = {}
    for name, extra in (("plain", []), ("all", ["--questions", "all"])):
        outs[name] = tmp_path / name
        assert cli.main(base + ["--ds-size", "2", *extra, "--out", str(outs[name])]) == 0
    a, b = ((outs[k] / "eval_log_aggregated.json").read_bytes() for k in ("plain", "all"))
    assert a == b and "questions" not in json.loads(a)
    sa, sb = (json.loads((outs[k] / "summary.json").read_text()) for k in ("plain", "all"))
    assert sa["questions"] == "all" and sa["config"].pop("out") != sb["config"].pop("out") and sa == sb
