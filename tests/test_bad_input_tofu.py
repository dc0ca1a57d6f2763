"""Bad input to ``npo-tofu``, table-driven: every case is one stderr line naming the problem, its exit
code, no traceback, and nothing new (or changed) in the output location.

Each case builds its inputs under ``tmp_path``, then the whole of ``tmp_path`` is snapshotted around
the in-process ``full_scale.cli.main`` call (captured at the file-descriptor level, so warnings that
bypass ``sys.stderr`` count too).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from full_scale.cli import main as cli

FAST = ["--no-progress", "--collapse-questions", "1", "--threads", "1"]


def fake_tofu_log(n_forget: int, n: int = 3, k: int = 5) -> dict:
    """A synthetic TOFU-format eval log (dict layout) with ``n_forget`` forget samples: enough for
    ``full_scale.aggregate`` (FQ and MU); no model needed."""
    def task(m: int) -> dict:
        idx = [str(i) for i in range(m)]
        return {"avg_gt_loss": {i: 1.0 + 0.1 * int(i) for i in idx},
                "avg_paraphrased_loss": {i: 1.2 + 0.1 * int(i) for i in idx},
                "average_perturb_loss": {i: [2.0 + 0.05 * j for j in range(k)] for i in idx},
                "rougeL_recall": {i: 0.5 for i in idx}}
    return {"eval_log.json": task(n), "eval_real_author_wo_options.json": task(n),
            "eval_real_world_wo_options.json": task(n), "eval_log_forget.json": task(n_forget)}


class _Evil:
    """Unpickling this runs a shell command: ``--resume`` must never do it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def stopped_run(tiny_ckpt, tofu_data_dir, tmp_path_factory):
    """A 2-epoch unlearning run stopped after its epoch-1 checkpoint (what --resume continues)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    argv = ["unlearn", "--preset", "mini", "--data-dir", str(tofu_data_dir), "--model", str(tiny_ckpt),
            "--method", "npo", "--out", str(out), "--epochs", "2", "--batch-size", "40", "--stop-after-epoch", "1",
            *FAST]
    assert cli(argv) == 0
    assert (out / "checkpoints" / "epoch-1" / "trainer_state.pt").is_file()
    return out, argv


# ------------------------------------------------------------------------------------------- case builders
def _model_copy(c, name, edit):
    d = c["tmp"] / name
    shutil.copytree(c["ckpt"], d)
    edit(d)
    return str(d)


def _truncate(path, keep=0.5):
    b = path.read_bytes()
    path.write_bytes(b[:int(len(b) * keep)])


def _no_tokenizer(d):
    for f in d.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()


def _pickle_only(d):
    from safetensors.torch import load_file

    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()


def _data_copy(c, name, text):
    d = c["tmp"] / f"data-{name}"
    d.mkdir()
    for f in c["data"].iterdir():
        if f.name != name:
            (d / f.name).symlink_to(f)
    (d / name).write_text(text)
    return str(d)


def _log_file(c, name, log):
    p = c["tmp"] / name
    p.write_text(json.dumps(log))
    return str(p)


def _run_copy(c, edit=None):
    d = c["tmp"] / "run"
    shutil.copytree(c["run"][0], d)
    if edit is not None:
        edit(d / "checkpoints" / "epoch-1")
    return d


def _resume_argv(c, run, *extra):
    argv = list(c["run"][1])
    argv[argv.index("--out") + 1] = str(run)
    argv.remove("--stop-after-epoch")
    argv.remove("1")
    return [*argv, "--resume", *extra]


def _evil_state(c):
    def edit(ck):
        torch.save({"optimizer": _Evil(c["tmp"] / "PWNED")}, ck / "trainer_state.pt")
    return edit


def _unlearn(c, *extra, out=None, model=None, method="npo", data=None):
    return ["unlearn", "--preset", "mini", "--data-dir", str(data or c["data"]), "--model", str(model or c["ckpt"]),
            "--method", method, "--out", str(out or c["tmp"] / "out"), *FAST, *extra]


def _eval(c, *extra, model=None, out=None, split="mini-forget10"):
    return ["eval", "--model", str(model or c["ckpt"]), "--forget-split", split, "--data-dir",
            str(c["data"]), "--ds-size", "4", "--max-new-tokens", "4", "--out", str(out or c["tmp"] / "ev"), *extra]


def _aggregate(c, *extra, ckpt=None, retain=None):
    ckpt = ckpt or _log_file(c, "ckpt_log.json", fake_tofu_log(4))
    retain = retain or _log_file(c, "retain_log.json", fake_tofu_log(4))
    return ["aggregate", "--ckpt-log", ckpt, "--retain-log", retain, *extra]


def _a_file(c):
    p = c["tmp"] / "a_file"
    p.write_text("x")
    return p


#: case -> (build argv from the context, exit code, a substring of the one stderr line)
CASES = {
    # the cases 3-10 (11 and 12, Ctrl-C and a kill while saving, are in test_durability_tofu.py)
    "truncated_safetensors": (lambda c: _unlearn(c, model=_model_copy(
        c, "trunc", lambda d: _truncate(d / "model.safetensors"))), 2,
        "model.safetensors: truncated or corrupt safetensors file"),
    "truncated_safetensors_header": (lambda c: _eval(c, model=_model_copy(
        c, "trunc5", lambda d: _truncate(d / "model.safetensors", 1e-6))), 2, "truncated or corrupt safetensors"),
    "no_tokenizer": (lambda c: _eval(c, model=_model_copy(c, "notok", _no_tokenizer)), 2,
                     "no tokenizer files in"),
    "pickle_only_weights": (lambda c: _eval(c, model=_model_copy(c, "pkl", _pickle_only)), 2,
                            "holds only pickle weights (pytorch_model.bin), which are not loaded"),
    "mismatched_logs_eval": (lambda c: _eval(c, "--retain-log", _log_file(c, "r2.json", fake_tofu_log(2))), 2,
                             "mismatched logs: the retain log"),
    "mismatched_logs_aggregate": (lambda c: _aggregate(c, retain=_log_file(c, "r2.json", fake_tofu_log(2))), 2,
                                  "has 2; pass --allow-mismatched-logs"),
    "aggregate_out_is_dir": (lambda c: _aggregate(c, "--out", str(c["tmp"])), 2, "is a directory; give a file name"),
    "resume_empty_dir": (lambda c: _unlearn(c, "--resume", out=(c["tmp"] / "empty").mkdir() or c["tmp"] / "empty"),
                         2, "nothing to resume in"),
    "resume_missing_dir": (lambda c: _unlearn(c, "--resume", out=c["tmp"] / "nowhere"), 2, "nothing to resume in"),
    "finetune_resume_missing_dir": (lambda c: ["finetune", "--preset", "mini", "--split", "retain", "--model",
                                               "tiny-llama:1m", "--data-dir", str(c["data"]), "--out",
                                               str(c["tmp"] / "ft"), "--resume", *FAST], 2, "nothing to resume in"),
    "resume_malicious_trainer_state": (lambda c: _resume_argv(c, _run_copy(c, _evil_state(c))), 2,
                                       "trainer_state.pt: refusing to unpickle it"),
    # more resume inputs
    "resume_truncated_trainer_state": (lambda c: _resume_argv(c, _run_copy(
        c, lambda ck: _truncate(ck / "trainer_state.pt"))), 2, "trainer_state.pt: truncated or corrupt"),
    "resume_truncated_checkpoint_weights": (lambda c: _resume_argv(c, _run_copy(
        c, lambda ck: _truncate(ck / "model.safetensors"))), 2, "truncated or corrupt safetensors file"),
    "resume_config_differs": (lambda c: _resume_argv(c, _run_copy(c), "--lr", "0.5"), 2,
                              "config differs from the saved run in lr"),
    "existing_run_without_resume": (lambda c: _resume_argv(c, _run_copy(c))[:-1], 2, "already holds a run"),
    # bad settings
    "unknown_method": (lambda c: _unlearn(c, method="npo_xx"), 2,
                       "unknown method 'npo_xx'"),
    "unknown_split": (lambda c: ["finetune", "--split", "retain42", "--model", "tiny-llama:1m", "--data-dir",
                                 str(c["data"]), "--out", str(c["tmp"] / "ft"), *FAST], 2, "unknown split 'retain42'"),
    "unknown_forget_split_eval": (lambda c: _eval(c, split="forget42"), 2,
                                  "unknown forget split 'forget42'"),
    "bad_lr": (lambda c: _unlearn(c, "--lr", "0"), 2, "lr must be > 0"),
    "bad_epochs": (lambda c: _unlearn(c, "--epochs", "0"), 2, "epochs must be ≥ 1"),
    "bad_batch_size": (lambda c: _unlearn(c, "--batch-size", "0"), 2, "batch_size must be ≥ 1"),
    "bad_beta": (lambda c: _unlearn(c, "--beta", "0"), 2, "beta must be finite and > 0"),
    "bad_eval_batch_size": (lambda c: _eval(c, "--batch-size", "0"), 2, "batch_size must be ≥ 1"),
    "unknown_tiny_size": (lambda c: ["finetune", "--preset", "mini", "--split", "retain", "--model", "tiny-llama:3m",
                                     "--data-dir", str(c["data"]), "--out", str(c["tmp"] / "ft"), *FAST], 2,
                          "unknown tiny-llama size '3m'"),
    # bad data and logs
    "missing_data_dir": (lambda c: _unlearn(c, data=c["tmp"] / "no-data"), 2, "TOFU data not found"),
    "malformed_json_line": (lambda c: _unlearn(c, data=_data_copy(
        c, "forget10_perturbed.json", '{"question": "q",\n')), 2,
        "forget10_perturbed.json:1: malformed JSON"),
    "unfinished_run_as_model": (lambda c: _eval(c, model=c["run"][0]), 2,
                                "is a run directory without its final model/"),
    "missing_model_dir": (lambda c: _eval(c, model=c["tmp"] / "no-model"), 2, "model directory not found"),
    "retain_log_not_json": (lambda c: _eval(c, "--retain-log", str(_a_file(c))), 2, "not valid JSON"),
    "ckpt_log_missing": (lambda c: _aggregate(c, ckpt=str(c["tmp"] / "none.json")), 2, "not found"),
    # the evaluation beyond FQ/MU: holdout, judge, bootstrap
    "missing_holdout_file": (lambda c: _eval(c, "--holdout-file", c["tmp"] / "none.json"), 2,
                             "holdout file not found"),
    "holdout_file_not_qa": (lambda c: _eval(c, "--holdout-file", _log_file(c, "h.json", [{"question": "q"}])), 2,
                            "row 0: missing field 'answer'"),
    "judge_dir_without_model": (lambda c: _eval(c, "--judge-model", (c["tmp"] / "judge").mkdir() or c["tmp"] / "judge"),
                                2, "no model in it (config.json missing)"),
    "missing_judge_dir": (lambda c: _eval(c, "--judge-model", c["tmp"] / "no-judge"), 2,
                          "judge model directory not found"),
    "unlearn_judge_dir_without_model": (lambda c: _unlearn(c, "--eval-every-epoch", "--retain-log",
                                                           _log_file(c, "r.json", fake_tofu_log(40)),
                                                           "--eval-judge-model",
                                                           (c["tmp"] / "j2").mkdir() or c["tmp"] / "j2"), 2,
                                        "no model in it"),
    "bad_n_boot": (lambda c: _eval(c, "--n-boot", "0"), 2, "n_boot must be ≥ 1"),
    # bad output locations
    "out_is_a_file_unlearn": (lambda c: _unlearn(c, out=_a_file(c)), 2, "is an existing file, not a directory"),
    "out_is_a_file_eval": (lambda c: _eval(c, out=_a_file(c)), 2, "is an existing file, not a directory"),
    "out_under_a_file": (lambda c: _unlearn(c, out=_a_file(c) / "sub"), 2, "is a file, not a directory"),
    "out_not_writable": (lambda c: _unlearn(c, out="/proc/npo-run"), 2, "is not writable"),
    "aggregate_out_not_writable": (lambda c: _aggregate(c, "--out", "/proc/npo-agg.json"), 2, "is not writable"),
    # usage errors (argparse), one line too
    "epochs_not_an_int": (lambda c: _unlearn(c, "--epochs", "two"), 2, "argument --epochs: invalid int value: 'two'"),
    "method_missing": (lambda c: [a for a in _unlearn(c) if a not in ("--method", "npo")], 2,
                       "the following arguments are required: --method"),
    "unknown_ref_mode": (lambda c: _unlearn(c, "--ref-mode", "frozen"), 2, "argument --ref-mode: invalid choice"),
    "report_out_is_a_file": (lambda c: ["report", str(c["run"][0]), "--out", str(_a_file(c))], 2,
                             "is an existing file, not a directory"),
}


def _snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in root.rglob("*")}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line(case, tiny_ckpt, tofu_data_dir, stopped_run, tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("NPO_DEBUG", raising=False)
    build, code, msg = CASES[case]
    ctx = {"tmp": tmp_path, "ckpt": tiny_ckpt, "data": tofu_data_dir, "run": stopped_run}
    argv = [str(a) for a in build(ctx)]
    before = _snapshot(tmp_path)
    capfd.readouterr()
    try:
        rc = cli(argv)
    except SystemExit as exc:  # argparse usage errors exit from the parser
        rc = exc.code
    out, err = capfd.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == code, (case, rc, err[-2000:])
    assert len(lines) == 1, (case, err[-2000:])
    assert lines[0].startswith(f"npo-tofu {argv[0]}: error: ") and msg in lines[0], (case, lines[0])
    assert "Traceback" not in err + out
    assert _snapshot(tmp_path) == before, case  # nothing new, nothing changed
    assert not (tmp_path / "PWNED").exists()     # the malicious pickle was never unpickled
    print(f"{case}\t{rc}\t{lines[0]}")


def test_opt_in_flags_allow_what_the_table_refuses(tiny_ckpt, tofu_data_dir, tmp_path, capfd):
    """--allow-pickle-weights loads a pickle-only model dir; --allow-mismatched-logs turns the error into a note."""
    ctx = {"tmp": tmp_path, "ckpt": tiny_ckpt, "data": tofu_data_dir}
    pkl = _model_copy(ctx, "pkl", _pickle_only)
    argv = _eval(ctx, "--retain-log", _log_file(ctx, "r2.json", fake_tofu_log(2)), model=pkl) + [
        "--allow-pickle-weights", "--allow-mismatched-logs"]
    assert cli(argv) == 0, capfd.readouterr().err
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert any("forget sets differ in size" in n for n in summary["notes"])
    assert summary["n_forget"] == 4 and summary["n_forget_retain_log"] == 2
    assert "eval_seconds" not in summary and "eval_seconds" in json.loads((tmp_path / "ev" / "timing.json").read_text())
    assert not list((tmp_path / "ev").glob(".*"))  # no temporary file left behind
    assert cli(_aggregate(ctx, "--allow-mismatched-logs", retain=_log_file(ctx, "r2.json", fake_tofu_log(2)))) == 0
