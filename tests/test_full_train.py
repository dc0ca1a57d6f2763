"""npo-tofu finetune / unlearn on tofu-mini with a 1M tiny-llama: every method, reference modes, resume,
batch x accumulation and 1 vs 2 processes, collapse detector, bad input."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from full_scale import data as D
from full_scale.cli import main as cli
from full_scale.generate import is_degenerate
from full_scale.logprobs import batched_sequence_logprobs
from full_scale.models import load_model, save_checkpoint
from full_scale.train import epoch_steps, lr_lambda, micro_parts
from npo_sim.losses import OBJECTIVES

FAST = ["--no-progress", "--collapse-questions", "1", "--threads", "1"]  # 1 thread: 2x faster on a busy 2-core box


@pytest.fixture(scope="module")
def base(tofu_data_dir, tmp_path_factory):
    """A freshly initialised 1M tiny-llama saved as a checkpoint (the 'target model' of these tests)."""
    d = tmp_path_factory.mktemp("base")
    model, tok, fmt = load_model("tiny-llama:1m", device="cpu", data_dir=tofu_data_dir, seed=0)
    save_checkpoint(model, tok, d, {"prompt_format": fmt})
    return str(d)


def unlearn(base, tofu_data_dir, out, method, *extra):
    argv = ["unlearn", "--preset", "mini", "--data-dir", str(tofu_data_dir), "--model", base,
            "--method", method, "--out", str(out), "--epochs", "1", "--batch-size", "40", *FAST, *extra]
    assert cli(argv) == 0
    return pd.read_csv(out / "train_log.csv"), json.loads((out / "run.json").read_text())


def weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


# ------------------------------------------------------------------------------------------- units
def test_schedule_and_batching_units():
    f = lr_lambda(4, 10)
    assert [f(s) for s in range(10)] == [0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]
    steps = epoch_steps(23, 8, seed=1, epoch=0)
    assert [len(s) for s in steps] == [8, 8, 7] and sorted(sum(steps, [])) == list(range(23))
    assert steps == epoch_steps(23, 8, seed=1, epoch=0) != epoch_steps(23, 8, seed=1, epoch=1)
    ids = list(range(8))
    # 2 processes x 2 accumulation: rank r gets parts r and 2 + r
    assert micro_parts(ids, 2, 2, 0) == [[0, 1], [4, 5]] and micro_parts(ids, 2, 2, 1) == [[2, 3], [6, 7]]
    assert micro_parts([0, 1, 2], 2, 2, 0) == [[], [1]]  # short last step: empty parts carry weight 0


def test_degeneracy_detector():
    assert is_degenerate([])
    assert is_degenerate([5, 6, 7, 5, 6, 7, 5, 6, 7])           # repeated 3-gram
    assert is_degenerate([9, 9, 9, 9, 9, 1, 2, 3])              # one token > half
    assert not is_degenerate([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])


# ------------------------------------------------------------------------------------------- methods
@pytest.fixture(scope="module")
def method_runs(base, tofu_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    # β = 0.1 for every method (SimNPO's default 2.5 saturates its weight at a random init: per-token NLL ~8)
    return {m: (root / m, *unlearn(base, tofu_data_dir, root / m, m, "--beta", "0.1")) for m in CLI_METHODS}


#: every method through the CLI but the variants whose inputs others already take (SimNPO+RT: simnpo and
#: the retain NLL; DPO+KL and GA+KL: dpo/ga and the retain KL of npo_kl); the next objectives' one step goes
#: through the same UnlearnTask in-process (tests/test_lm_objectives.py), and tests/test_dialects.py runs
#: ga_kl through the CLI
CLI_METHODS = tuple(m for m in OBJECTIVES if OBJECTIVES[m].family in ("ga", "npo", "idk", "dpo")
                    and m not in ("tnpo", "simnpo_rt", "dpo_kl", "ga_kl"))


def test_every_method_moves_forget_likelihood_the_expected_way(method_runs, base, tofu_data_dir):
    forget, _ = D.mini_splits("forget10", tofu_data_dir)
    idk = D.load_split("idontknow", tofu_data_dir)
    m0, tok, fmt = load_model(base, device="cpu")
    ex = [D.encode_qa(tok, r["question"], r["answer"], fmt) for r in forget]
    ex_idk = [D.encode_qa(tok, r["question"], idk[j], fmt)
              for r, j in zip(forget, D.pair_idk(len(forget), len(idk), 0))]

    def mean_logp(model, exs):
        batches = [D.pad_batch(exs, tok.pad_token_id)]
        return float(batched_sequence_logprobs(model, batches)[0].mean())

    before, before_idk = mean_logp(m0, ex), mean_logp(m0, ex_idk)
    drops = {}
    for name, (out, log, info) in method_runs.items():
        obj = OBJECTIVES[name]
        assert info["steps_done"] == 1 and info["effective_batch"] == 40 and len(log) == 1
        assert info["reference_model_loaded"] == obj.needs_ref_logits, name
        assert sorted(info["objective_needs"]) == sorted(obj.needs)
        m1 = load_model(str(out), device="cpu")[0]
        after = mean_logp(m1, ex)
        if obj.needs & {"logp", "token_logp", "forget_logits"}:   # forget answers become less likely
            drops[name] = before - after
            assert after < before, (name, before, after)
        if "idk_logp" in obj.needs:        # IDK answers become more likely
            after_idk = mean_logp(m1, ex_idk)
            assert after_idk > before_idk + 0.2, (name, before_idk, after_idk)
        assert log["param_dist"].iloc[-1] > 0
        assert log["lr"].tolist() == [1e-3]  # one full-batch step: the 1-step warm-up ends at lr 1e-3
    # one full-batch step at lr 1e-3 lowers the summed forget log-likelihood by nats, except SimNPO+RT,
    # where the retain NLL pull nearly cancels the (length-normalised) forget push at a random init
    assert sorted(drops.values())[1] > 1.0, drops


def test_logged_quantities_match_definitions(method_runs):
    out, log, info = method_runs["npo"]
    first = log.iloc[0]
    # at θ = θ_ref every NPO weight is 1 and the loss is (2/β) log 2
    assert first["npo_weight"] == pytest.approx(1.0, abs=1e-5)
    assert first["loss"] == pytest.approx(20 * torch.log(torch.tensor(2.0)).item(), rel=1e-5)
    assert first["forget_logp_per_token"] > first["forget_logp"]  # per-token mean vs sum
    ga = method_runs["ga"][1].iloc[0]
    # GA, default --ga-reduction mean: the forget term is the per-token forget log-likelihood
    assert ga["forget_loss"] == pytest.approx(ga["forget_logp_per_token"], rel=1e-6)
    assert pd.isna(ga["npo_weight"])
    rt = method_runs["npo_rt"][1].iloc[0]
    assert rt["retain_loss"] == pytest.approx(rt["retain_nll"], rel=1e-6)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "npo" and cfg["ref_mode"] == "cached" and cfg["retain"] == "retain90"
    assert (out / "ref_cache.safetensors").is_file()
    assert {"collapse", "degenerate_frac"} <= set(log.columns)


@pytest.mark.parametrize("method", ["npo_rt", "dpo"])
def test_cached_and_model_reference_give_equal_losses(method_runs, base, tofu_data_dir, tmp_path, method):
    log_model, info = unlearn(base, tofu_data_dir, tmp_path / "m", method, "--beta", "0.1", "--ref-mode", "model")
    assert info["reference_model_loaded"] and not (tmp_path / "m" / "ref_cache.safetensors").exists()
    out, log_cached, info_c = method_runs[method]
    assert not info_c["reference_model_loaded"]
    for col in ("loss", "forget_loss", "retain_loss", "forget_logp"):
        assert torch.allclose(torch.tensor(log_model[col].values), torch.tensor(log_cached[col].values),
                              rtol=1e-5, atol=1e-5), col
    w1, w2 = weights(tmp_path / "m"), weights(out)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)


# ------------------------------------------------------------------------------------------- resume
def test_stop_and_resume_equals_uninterrupted(base, tofu_data_dir, tmp_path):
    args = ["--epochs", "2", "--keep-checkpoints", "2"]
    full_log, _ = unlearn(base, tofu_data_dir, tmp_path / "a", "npo_rt", *args)
    argv = ["unlearn", "--preset", "mini", "--data-dir", str(tofu_data_dir), "--model", base, "--method",
            "npo_rt", "--out", str(tmp_path / "b"), "--batch-size", "40", *FAST, *args]
    assert cli(argv + ["--stop-after-epoch", "1"]) == 0  # as if killed right after the epoch-1 checkpoint
    assert (tmp_path / "b" / "checkpoints" / "epoch-1" / "trainer_state.pt").is_file()
    assert not (tmp_path / "b" / "model").exists()
    assert len(pd.read_csv(tmp_path / "b" / "train_log.csv")) == 1
    resumed_log, info = unlearn(base, tofu_data_dir, tmp_path / "b", "npo_rt", *args, "--resume")
    assert info["steps_done"] == 2
    cols = ["step", "lr", "loss", "forget_logp", "retain_nll", "npo_weight", "param_dist"]
    pd.testing.assert_frame_equal(full_log[cols], resumed_log[cols], rtol=1e-6)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert cli(["unlearn", "--preset", "mini", "--data-dir", str(tofu_data_dir), "--model", base, "--method",
                "npo_rt", "--out", str(tmp_path / "b"), "--epochs", "3", "--resume", *FAST]) == 2  # config differs


# ------------------------------------------------------------------------------------------- batch splits
@pytest.fixture(scope="module")
def batch8(base, tofu_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("b8") / "run"
    return unlearn(base, tofu_data_dir, out, "npo_rt", "--batch-size", "8", "--max-steps", "2")


def test_batch_times_accumulation_is_invariant(base, tofu_data_dir, tmp_path, batch8):
    a, ia = batch8
    b, ib = unlearn(base, tofu_data_dir, tmp_path / "b", "npo_rt", "--batch-size", "4", "--grad-accum", "2",
                    "--max-steps", "2")
    assert ia["effective_batch"] == ib["effective_batch"] == 8 and ib["stopped"] == "max_steps"
    for col in ("loss", "forget_logp", "retain_nll", "npo_weight", "param_dist"):
        assert torch.allclose(torch.tensor(a[col].values), torch.tensor(b[col].values), rtol=1e-5), col


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process(base, tofu_data_dir, tmp_path, batch8):
    one, _ = batch8
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "full_scale.cli", "unlearn", "--preset", "mini", "--data-dir",
           str(tofu_data_dir), "--model", base, "--method", "npo_rt", "--out", str(tmp_path / "two"),
           "--epochs", "1", "--batch-size", "4", "--max-steps", "2", "--cpu", *FAST]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((tmp_path / "two" / "run.json").read_text())
    assert info["world_size"] == 2 and "MULTI_CPU" in info["distributed_type"]  # not a silent 1-process run
    assert info["per_device_batch"] == 4 and info["effective_batch"] == 8
    two = pd.read_csv(tmp_path / "two" / "train_log.csv")
    for col in ("loss", "forget_logp", "retain_nll", "npo_weight", "param_dist"):
        assert torch.allclose(torch.tensor(one[col].values), torch.tensor(two[col].values), rtol=1e-5), col


# ------------------------------------------------------------------------------------------- finetune, collapse
def test_finetune_lowers_loss_and_saves_reloadable_model(tofu_data_dir, tmp_path):
    argv = ["finetune", "--preset", "mini", "--split", "retain", "--model", "tiny-llama:1m", "--data-dir",
            str(tofu_data_dir), "--out", str(tmp_path / "ft"), "--max-steps", "4", "--warmup-epochs", "0",
            "--lr", "0.01", *FAST]
    assert cli(argv) == 0
    log = pd.read_csv(tmp_path / "ft" / "train_log.csv")
    info = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert info["examples"] == 360 + 217 and info["effective_batch"] == 16
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["split"] == "retain90"
    assert log["loss"].iloc[-1] < log["loss"].iloc[0] - 0.5
    assert load_model(str(tmp_path / "ft"), device="cpu")[2] == "plain"


def test_collapse_detector_flags_and_stops(base, tofu_data_dir, tmp_path):
    # retain-NLL criterion only (no greedy check: a random init answers degenerately from the start)
    log, info = unlearn(base, tofu_data_dir, tmp_path / "c", "ga", "--lr", "0.01", "--warmup-epochs", "0",
                        "--batch-size", "8", "--epochs", "10", "--collapse-k", "1.5", "--collapse-questions", "0",
                        "--stop-on-collapse")
    assert info["collapsed"] and info["stopped"] == "collapse" and info["steps_done"] < 50
    assert log["collapse"].iloc[-1] == 1 and log["retain_nll"].iloc[-1] > 1.5 * info["retain_nll0"]
    assert (log["collapse"].iloc[:-1] == 0).all() and (log["retain_nll"].iloc[:-1] <= 1.5 * info["retain_nll0"]).all()
    assert (tmp_path / "c" / "model" / "model.safetensors").is_file()  # the collapsed model is kept for inspection


def test_nan_divergence_is_a_one_line_error_exit_3(base, tofu_data_dir, tmp_path, capsys):
    argv = ["unlearn", "--preset", "mini", "--data-dir", str(tofu_data_dir), "--model", base, "--method", "npo_rt",
            "--out", str(tmp_path / "nan"), "--epochs", "1", "--batch-size", "8", "--lr", "1e6",
            "--warmup-epochs", "0", *FAST]
    assert cli(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite" in err[0]
    assert not (tmp_path / "nan" / "run.json").exists() and not (tmp_path / "nan" / "model").exists()


# ------------------------------------------------------------------------------------------- bad input
def _copy_with(tofu_data_dir, tmp_path, name, text):
    d = tmp_path / f"data-{name}"
    d.mkdir()
    for f in tofu_data_dir.iterdir():
        if f.name != name:
            (d / f.name).symlink_to(f)
    (d / name).write_text(text)
    return d


@pytest.mark.parametrize("case", ["no_data", "split", "method", "beta", "json", "empty_forget"])
def test_bad_input_one_line_error_nothing_written(case, base, tofu_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("NPO_TOFU_DIR", raising=False)
    out = tmp_path / "out"
    data = str(tofu_data_dir)
    common = ["--out", str(out), *FAST]
    argv, msg = {
        "no_data": (["unlearn", "--model", base, "--method", "npo", *common], "TOFU data not found"),
        "split": (["finetune", "--split", "retain42", "--model", "tiny-llama:1m", "--data-dir", data, *common],
                  "unknown split 'retain42'"),
        "method": (["unlearn", "--model", base, "--method", "npo_xx", "--data-dir", data, *common],
                   "unknown method 'npo_xx'"),
        "beta": (["unlearn", "--model", base, "--method", "npo", "--beta", "0", "--data-dir", data, *common],
                 "beta must be finite and > 0"),
        "json": (["unlearn", "--model", base, "--method", "npo", "--preset", "mini", *common, "--data-dir",
                  str(_copy_with(tofu_data_dir, tmp_path, "forget10_perturbed.json", '{"question": "q",\n'))],
                 "forget10_perturbed.json:1: malformed JSON"),
        "empty_forget": (["unlearn", "--model", base, "--method", "npo", *common, "--data-dir",
                          str(_copy_with(tofu_data_dir, tmp_path, "forget10.json", ""))], "forget10.json: no rows"),
    }[case]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err, err
    assert not out.exists()
