"""TOFU evaluation of a real (tiny) model: batched NLL and generation against one-at-a-time oracles,
the written log reloading through ``aggregate``, the per-epoch curve, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from full_scale import aggregate as A
from full_scale import cli
from full_scale import evaluate as E
from full_scale import generate as G
from full_scale.config import EvalSpec
from full_scale.data import encode_answer, encode_prompt, encode_qa, pad_batch
from full_scale.models import load_model, save_checkpoint
from npo_sim.runio import UserError

DS = 4  # questions per eval set in these tests


@pytest.fixture(autouse=True, scope="module")
def _one_thread_module():
    # tiny matmuls: 1 thread is as fast on an idle machine and 10x faster than 2 on a busy 2-core one
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread():  # runs after conftest's per-test thread setting
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tofu_data_dir):
    """tiny-llama 1M that has memorised the first DS questions of every mini-forget10 eval set (so greedy
    answers are real sentences that end in EOS at different lengths)."""
    torch.manual_seed(0)
    model, tok, fmt = load_model("tiny-llama:1m", device="cpu", data_dir=tofu_data_dir)
    sets, _, _ = E.eval_sets("mini-forget10", tofu_data_dir, DS)
    items = [it for v in sets.values() for it in v]
    batch = pad_batch([encode_qa(tok, it.question, it.answer, fmt) for it in items], tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.0
    model.eval()
    return model, tok, fmt, sets


@pytest.fixture(scope="module")
def ckpt(tiny, tmp_path_factory):
    model, tok, fmt, _ = tiny
    out = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(model, tok, out, {"prompt_format": fmt})
    return out


def _nll_one(model, tok, fmt, q, a):
    """Oracle: one unpadded sequence, log-softmax over the full logits, answer tokens gathered by hand."""
    p = encode_prompt(tok, q, fmt)
    ans = encode_answer(tok, a, fmt)
    ids = torch.tensor([p + ans])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    picked = [logp[len(p) - 1 + j, t].item() for j, t in enumerate(ans)]
    return -sum(picked), len(ans)


def test_batched_nll_equals_per_sample_unpadded(tiny):
    model, tok, fmt, sets = tiny
    pairs = []
    for items in sets.values():
        for it in items[:2]:
            pairs += [(it.question, it.answer), (it.question, it.base), (it.question, it.perturbed[0])]
    assert len({len(encode_qa(tok, q, a, fmt)["input_ids"]) for q, a in pairs}) > 5  # real padding happens
    loss, count = E.answer_nll(model, tok, fmt, pairs, batch_size=5)
    for (q, a), lo, n in zip(pairs, loss, count):
        ref_loss, ref_n = _nll_one(model, tok, fmt, q, a)
        assert n == ref_n
        assert lo / n == pytest.approx(ref_loss / ref_n, abs=1e-5)
        assert lo == pytest.approx(ref_loss, rel=1e-5)


def _greedy_one_ids(model, tok, fmt, q, max_new):
    """Oracle: greedy decoding by repeated full forwards (no cache, no padding, no generate())."""
    ids = encode_prompt(tok, q, fmt)
    new = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return new


def _greedy_one(model, tok, fmt, q, max_new):
    return tok.decode(_greedy_one_ids(model, tok, fmt, q, max_new), skip_special_tokens=True)


def test_batched_left_padded_generation_equals_unbatched(tiny):
    model, tok, fmt, sets = tiny
    questions = [it.question for items in sets.values() for it in items]
    answers = [it.answer for items in sets.values() for it in items]
    one = G.greedy_generate(model, tok, fmt, questions, batch_size=1, max_new_tokens=24)
    many = G.greedy_generate(model, tok, fmt, questions, batch_size=6, max_new_tokens=24)
    assert many == one
    assert len({len(encode_prompt(tok, q, fmt)) for q in questions}) > 3  # prompts really get left-padded
    lengths = {len(tok(g)["input_ids"]) for g in one}
    assert len(lengths) > 3 and min(lengths) < 24  # EOS reached at different steps inside a batch
    for q, g in list(zip(questions, one))[::4]:
        assert g == _greedy_one(model, tok, fmt, q, 24)
    # the memorised answers come back (ROUGE-L recall 1 on most of them)
    r1, rl = E.rouge_recall(one, answers)
    assert np.mean(np.array(rl) > 0.99) > 0.5


def _hf_generate(model, tok, fmt, questions, batch_size, max_new):
    """Oracle: ``model.generate`` on left-padded, length-sorted batches (the evaluation's former path)."""
    prompts = [encode_prompt(tok, q, fmt) for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [""] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        T = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[tok.pad_token_id] * (T - len(prompts[i])) + prompts[i] for i in idx])
        mask = torch.tensor([[0] * (T - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                 max_new_tokens=max_new, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        for i, t in zip(idx, tok.batch_decode(gen[:, T:], skip_special_tokens=True)):
            out[i] = t
    return out


def test_kv_cache_decoder_equals_no_cache_and_generate(tiny):
    """The one greedy decoder (KV cache, batched) decodes the same tokens as full forwards without a cache
    (the collapse detector's former loop) and the same text as ``model.generate`` (the evaluation's)."""
    model, tok, fmt, sets = tiny
    questions = [it.question for items in sets.values() for it in items]
    ids = G.greedy_ids(model, tok, fmt, questions, batch_size=5, max_new_tokens=24)
    assert len({len(a) for a in ids}) > 3
    assert ids == [_greedy_one_ids(model, tok, fmt, q, 24) for q in questions]
    assert G.greedy_generate(model, tok, fmt, questions, 6, 24) == _hf_generate(model, tok, fmt, questions, 6, 24)
    # the collapse detector's setting: a few retain questions, 32 tokens, in one batch
    assert G.greedy_ids(model, tok, fmt, questions[:4], max_new_tokens=32) == \
        [_greedy_one_ids(model, tok, fmt, q, 32) for q in questions[:4]]


def test_sorted_batches_decode_in_the_original_order_and_drop_finished_rows(tiny):
    """Sorted-length batches, finished rows dropped from the batch and the KV cache: the same tokens as
    one-at-a-time greedy decoding, returned in the caller's order, for any batch size."""
    model, tok, fmt, sets = tiny
    questions = [it.question for items in sets.values() for it in items]
    questions = [questions[i] for i in np.random.default_rng(0).permutation(len(questions))]  # unsorted
    one = [_greedy_one_ids(model, tok, fmt, q, 24) for q in questions]
    widths = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        for bs in (3, 7, len(questions)):
            widths.clear()
            ids = G.greedy_ids(model, tok, fmt, questions, batch_size=bs, max_new_tokens=24)
            assert ids == one, bs
            steps = list(widths)
            assert G.greedy_generate(model, tok, fmt, questions, bs, 24) == \
                [tok.decode(a, skip_special_tokens=True) for a in one]
        # in the one-batch run, rows leave as they reach EOS: the batch narrows step by step
        assert steps[0] == len(questions) and steps[-1] < steps[0]
        assert sorted(steps, reverse=True) == steps
        assert sum(steps) < len(questions) * len(steps)
    finally:
        hook.remove()
    assert len({len(a) for a in one}) > 3 and max(len(a) for a in one) <= 24
    # the evaluation's own generation batch (--gen-batch-size): the same log at any size
    logs = [E.evaluate_model(model, tok, fmt, sets, batch_size=4, max_new_tokens=24, gen_batch_size=g)
            for g in (None, 1, 16)]
    assert logs[1] == logs[0] and logs[2] == logs[0]


def test_eval_sets_threads_like_the_training_commands(ckpt, tofu_data_dir, tmp_path):
    out = tmp_path / "ev"
    argv = ["eval", "--model", str(ckpt), "--forget-split", "mini-forget10", "--ds-size", "1", "--max-new-tokens",
            "4", "--data-dir", str(tofu_data_dir), "--out", str(out)]
    torch.set_num_threads(2)
    assert cli.main(argv + ["--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    assert "threads" not in json.loads((out / "summary.json").read_text())["config"]  # results don't depend on it
    # same flag, default and help as finetune/unlearn (whose Launch.threads also covers --eval-every-epoch)
    p = cli.parser()
    acts = {c: {a.dest: a for a in p._subparsers._group_actions[0].choices[c]._actions}["threads"]
            for c in ("eval", "finetune", "unlearn")}
    assert {(a.default, a.help, a.type) for a in acts.values()} == {(None, "torch threads per process", int)}
    args = p.parse_args(["unlearn", "--preset", "mini", "--model", "m", "--method", "npo", "--out", "o",
                         "--threads", "2", "--eval-every-epoch", "--retain-log", "r.json",
                         "--eval-gen-batch-size", "8"])
    assert cli._launch(args).threads == 2 and cli.unlearn_job(args).eval.gen_batch_size == 8
    assert cli.eval_job(p.parse_args(argv + ["--gen-batch-size", "5"])).eval.gen_batch_size == 5
    with pytest.raises(UserError, match="gen_batch_size"):
        EvalSpec("mini-forget10", gen_batch_size=0)


def test_rouge_recall_with_stemming():
    r1, rl = E.rouge_recall(["the cats were running home", "nothing here"], ["cat runs home", "a b"])
    assert rl[0] == pytest.approx(1.0)  # cats->cat, running/runs->run: LCS covers the whole target
    assert rl[1] == 0.0 and r1[1] == 0.0


def test_eval_cli_writes_tofu_log_that_reloads_through_aggregate(ckpt, tofu_data_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    argv = ["eval", "--model", str(ckpt), "--forget-split", "mini-forget10", "--ds-size", str(DS),
            "--max-new-tokens", "24", "--batch-size", "3", "--data-dir", str(tofu_data_dir), "--out", str(out)]
    assert cli.main(argv) == 0
    log = json.loads((out / "eval_log_aggregated.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert list(log) == [*A.TASKS, "eval_extra_metrics", "dialect"]  # TOFU's four, the extra block, the dialect
    assert log["dialect"] == "npo-sim"
    for key, task in ((k, log[k]) for k in A.TASKS):
        for m in ("avg_gt_loss", "avg_paraphrased_loss", "average_perturb_loss", "rougeL_recall", "generated_text"):
            assert list(task[m]) == [str(i) for i in range(DS)], (key, m)  # TOFU's {index: value} layout
        for i in task["avg_gt_loss"]:
            assert task["avg_gt_loss"][i] == pytest.approx(task["gt_loss"][i] / task["num_token_gt"][i])
            n_pert = len(task["average_perturb_loss"][i])
            assert n_pert == (5 if key in ("eval_log.json", "eval_log_forget.json") else 3)
            prompt, _, answer = task["generated_text"][i]
            assert prompt.startswith("Q: ") and answer
    ra = log["eval_real_author_wo_options.json"]
    assert ra["avg_paraphrased_loss"] == ra["avg_gt_loss"]  # base answer = answer
    assert summary["forget_rouge"] > 0.5  # memorised
    assert any("tofu-mini" in n for n in summary["notes"])
    # the log reloads through `aggregate`; against itself FQ = 1, and MU matches the eval summary
    capsys.readouterr()
    assert cli.main(["aggregate", "--ckpt-log", str(out / "eval_log_aggregated.json"), "--retain-log", str(out)]) == 0
    agg = json.loads(capsys.readouterr().out)
    assert agg["forget_quality"] == 1.0
    for k in ("model_utility", *A.UTILITY_KEYS, *A.FORGET_KEYS):
        assert agg[k] == pytest.approx(summary[k], rel=1e-12)
    # and the TOFU per-sample numbers equal the one-at-a-time oracle
    model, tok, fmt = load_model(str(ckpt), device="cpu")
    it = E.eval_sets("mini-forget10", tofu_data_dir, DS)[0]["eval_log_forget.json"][1]
    assert log["eval_log_forget.json"]["avg_paraphrased_loss"]["1"] == pytest.approx(
        np.divide(*_nll_one(model, tok, fmt, it.question, it.base)), abs=1e-5)
    # with a retain log, summary.json carries FQ
    out2 = tmp_path / "ev2"
    argv2 = argv[:-1] + [str(out2), "--retain-log", str(out / "eval_log_aggregated.json")]
    assert cli.main(argv2) == 0
    assert json.loads((out2 / "summary.json").read_text())["forget_quality"] == 1.0


def test_forget_splits_without_perturbed_file_say_so(tofu_data_dir):
    sets, sources, notes = E.eval_sets("forget50", tofu_data_dir, 300)
    assert sources["eval_log_forget.json"] == "forget10_perturbed" and "forget10_perturbed" in notes[0]
    assert [len(v) for v in sets.values()] == [300, 100, 117, 300]
    sets, sources, notes = E.eval_sets("forget05", tofu_data_dir, 300)
    assert sources["eval_log_forget.json"] == "forget05_perturbed" and notes == []
    assert len(sets["eval_log_forget.json"]) == 200
    for name, n_forget in (("mini-forget10", 40), ("mini-forget20", 80), ("mini-forget50", 200)):
        sets, _, _ = E.eval_sets(name, tofu_data_dir, 300)
        assert len(sets["eval_log_forget.json"]) == n_forget
        assert not {i.question for i in sets["eval_log_forget.json"]} & {i.question for i in sets["eval_log.json"]}


def test_bad_eval_input_fails_before_writing(ckpt, tofu_data_dir, tmp_path, capsys):
    base = ["eval", "--model", str(ckpt), "--data-dir", str(tofu_data_dir), "--ds-size", "2"]
    cases = [
        (["--forget-split", "forget42"], "unknown forget split"),
        (["--forget-split", "forget10", "--retain-log", str(tmp_path / "none.json")], "not found"),
        (["--forget-split", "forget10", "--batch-size", "0"], "batch_size"),
    ]
    for extra, msg in cases:
        out = tmp_path / "o"
        assert cli.main(base + extra + ["--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
        assert not out.exists()


def test_evaluate_epoch_grows_the_curve(tiny, tofu_data_dir, tmp_path):
    model, tok, fmt, _ = tiny
    retain = tmp_path / "retain_log.json"
    log, _ = E.run_eval(model, tok, fmt, EvalSpec("mini-forget10", data_dir=str(tofu_data_dir), ds_size=DS,
                                                  max_new_tokens=8))
    retain.write_text(json.dumps(log))
    argv = ["unlearn", "--preset", "mini", "--forget", "forget10", "--model", "m", "--method", "npo", "--out", "o",
            "--data-dir", str(tofu_data_dir), "--eval-every-epoch", "--eval-ds-size", str(DS), "--eval-batch-size", "4",
            "--eval-max-new-tokens", "8"]
    spec = cli.unlearn_job(cli.parser().parse_args(argv + ["--retain-log", str(retain)])).eval
    assert spec.forget_split == "mini-forget10" and spec.batch_size == 4  # the eval split of a mini run
    prepared = E.prepare_eval(spec)  # what the unlearning run loads and checks before training
    run = tmp_path / "run"
    rows = [E.evaluate_epoch(model, tok, fmt, run, ep, spec, prepared) for ep in (1, 2)]
    assert rows[0]["forget_quality"] == 1.0  # same model, same eval -> same truth ratios as the retain log
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)  # a different model at epoch 2 (restored below)
    try:
        again = E.evaluate_epoch(model, tok, fmt, run, 2, spec)  # a resumed run re-evaluates epoch 2
    finally:
        model.load_state_dict(saved)
    curve = pd.read_csv(run / "eval_curve.csv")
    assert list(curve.columns) == list(E.CURVE_COLUMNS)
    assert curve["epoch"].tolist() == [1, 2]
    assert curve.loc[1, "model_utility"] == pytest.approx(again["model_utility"])
    assert curve.loc[0, "model_utility"] == pytest.approx(rows[0]["model_utility"])
    assert (run / "eval" / "epoch_002" / "eval_log_aggregated.json").is_file()
    assert not model.training
    with pytest.raises(UserError, match="retain_log"):
        cli.unlearn_job(cli.parser().parse_args(argv))


def test_eval_epochs_last_is_the_last_row_of_every(ckpt, tofu_data_dir, tmp_path):
    """--eval-epochs last evaluates once, after the last epoch, and that row equals the same run's last row
    under --eval-epochs every (training does not depend on the evaluation)."""
    logdir = tmp_path / "oracle"
    assert cli.main(["eval", "--model", str(ckpt), "--forget-split", "mini-forget10", "--ds-size", "2",
                     "--max-new-tokens", "4", "--data-dir", str(tofu_data_dir), "--out", str(logdir)]) == 0
    base = ["unlearn", "--preset", "mini", "--forget", "forget10", "--model", str(ckpt), "--method", "npo",
            "--data-dir", str(tofu_data_dir), "--epochs", "2", "--batch-size", "20",
            "--eval-every-epoch", "--eval-ds-size", "2", "--eval-max-new-tokens", "4", "--no-progress",
            "--retain-log", str(logdir / "eval_log_aggregated.json")]
    every, last = tmp_path / "every", tmp_path / "last"
    assert cli.main(base + ["--out", str(every)]) == 0
    assert cli.main(base + ["--eval-epochs", "last", "--out", str(last)]) == 0
    a, b = pd.read_csv(every / "eval_curve.csv"), pd.read_csv(last / "eval_curve.csv")
    assert a["epoch"].tolist() == [1, 2] and b["epoch"].tolist() == [2]
    cols = ["forget_quality", "model_utility", "forget_rouge", "forget_prob"]
    assert b[cols].iloc[0].tolist() == pytest.approx(a[cols].iloc[1].tolist())
    assert json.loads((last / "config.json").read_text())["eval"]["epochs"] == "last"
