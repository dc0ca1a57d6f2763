"""--optimizer sgd|adamw and --lr-schedule linear|constant: a constant step size is logged as such, one SGD step
is θ − lr·∇L by hand, SGD is batch × accumulation invariant, bad values are one line, old runs still resume, and
the planner counts no moments for SGD."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from full_scale import config as C
from full_scale import plan as P
from full_scale.checkpoint import check_run_dir
from full_scale.cli import finetune_job, parser, plan_request
from full_scale.cli import main as cli
from full_scale.models import load_model
from full_scale.tasks import FinetuneTask, Reference
from full_scale.train import epoch_steps, lr_lambda
from npo_sim.runio import UserError

FAST = ["--no-progress", "--collapse-questions", "0", "--threads", "1"]
SGD = ["--optimizer", "sgd", "--lr-schedule", "constant", "--warmup-epochs", "0", "--weight-decay", "0"]


def _unlearn(model, data, out, *extra):
    argv = ["unlearn", "--preset", "mini", "--data-dir", str(data), "--model", str(model), "--method", "npo_rt",
            "--out", str(out), "--epochs", "1", "--max-steps", "2", *FAST, *extra]
    assert cli(argv) == 0
    return pd.read_csv(out / "train_log.csv"), load_file(str(out / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def sgd8(tiny_ckpt, tofu_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sgd8") / "run"
    return (out, *_unlearn(tiny_ckpt, tofu_data_dir, out, *SGD, "--lr", "0.01", "--batch-size", "8"))


def test_schedule_units():
    assert [lr_lambda(0, 5, "constant")(s) for s in range(5)] == [1.0] * 5
    assert [lr_lambda(2, 5, "constant")(s) for s in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]
    assert lr_lambda(4, 10)(9) == lr_lambda(4, 10, "linear")(9) == 1 / 6  # the default is today's linear decay


def test_constant_schedule_logs_lr_every_step(sgd8):
    out, log, _ = sgd8
    assert len(log) == 2 and (log["lr"] == 0.01).all()
    saved = json.loads((out / "config.json").read_text())
    assert (saved["optimizer"], saved["lr_schedule"], saved["warmup_epochs"]) == ("sgd", "constant", 0.0)


def test_one_sgd_step_is_theta_minus_lr_grad(tiny_ckpt, tofu_data_dir, tmp_path):
    lr, out = 0.1, tmp_path / "ft"
    argv = ["finetune", "--preset", "mini", "--split", "retain", "--model", str(tiny_ckpt), "--data-dir",
            str(tofu_data_dir), "--out", str(out), "--epochs", "1", "--max-steps", "1", "--lr", str(lr), *SGD, *FAST]
    assert cli(argv) == 0
    after = load_file(str(out / "model" / "model.safetensors"))
    # by hand: the first step's examples, the task's loss, autograd, θ − lr·∇L
    job = finetune_job(parser().parse_args(argv))
    model, tok, fmt = load_model(str(tiny_ckpt), device="cpu")
    task = FinetuneTask(job, FinetuneTask.load(job), tok, job.run.prompt_format or fmt)
    ids = epoch_steps(task.n, job.run.batch_size, job.run.seed, 0)[0]
    model.train()
    loss, _, _ = task.micro(model, Reference(), ids, 0)
    loss.backward()
    checked = 0
    for name, p in model.named_parameters():
        if name in after and p.grad is not None and p.grad.abs().max() > 0:
            expected = p.detach() - lr * p.grad
            assert not torch.allclose(expected, p.detach()), name  # the step is visible at this tolerance
            torch.testing.assert_close(after[name], expected, rtol=0, atol=1e-6, msg=name)
            checked += 1
    assert checked >= 3


def test_sgd_batch_times_accumulation_is_invariant(sgd8, tiny_ckpt, tofu_data_dir, tmp_path):
    _, a, wa = sgd8
    b, wb = _unlearn(tiny_ckpt, tofu_data_dir, tmp_path / "b", *SGD, "--lr", "0.01", "--batch-size", "4",
                     "--grad-accum", "2")
    assert a["param_dist"].iloc[-1] > 0.1  # the steps moved the weights
    for col in ("loss", "forget_logp", "retain_nll", "param_dist"):  # fp32 sums in another order: ~1e-7 relative
        torch.testing.assert_close(torch.tensor(a[col].values), torch.tensor(b[col].values), rtol=1e-6, atol=0,
                                   msg=col)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("flag,value", [("--optimizer", "adam"), ("--lr-schedule", "cosine")])
def test_bad_value_is_one_line_exit_2(flag, value, tiny_ckpt, tofu_data_dir, tmp_path, capsys):
    argv = ["unlearn", "--preset", "mini", "--data-dir", str(tofu_data_dir), "--model", str(tiny_ckpt),
            "--method", "npo", "--out", str(tmp_path / "x"), flag, value, *FAST]
    with pytest.raises(SystemExit) as exc:  # an argparse choice: the parser's one-line usage error
        cli(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and value in err[0]
    assert not (tmp_path / "x").exists()
    with pytest.raises(UserError, match="optimizer must be one of adamw, sgd"):
        C.RunConfig(model="m", out="o", epochs=1, lr=1.0, batch_size=1, grad_accum=1, optimizer="adam")


def test_old_config_without_the_fields_resumes_with_the_defaults(tmp_path):
    job = C.TrainJob(C.RunConfig(model="m", out=str(tmp_path), epochs=1, lr=1.0, batch_size=1, grad_accum=1),
                     C.FinetuneSpec(split="full"))
    new = job.to_json()
    assert (new["optimizer"], new["lr_schedule"]) == ("adamw", "linear")
    old = {k: v for k, v in new.items() if k not in ("optimizer", "lr_schedule", "dialect", "lora_r")}
    (tmp_path / "config.json").write_text(json.dumps(old))
    check_run_dir(tmp_path, new, resume=True)  # a missing key is its (old-behaviour) default
    unlearn = C.TrainJob(C.RunConfig(model="m", out=str(tmp_path / "u"), epochs=1, lr=1.0, batch_size=1,
                                     grad_accum=1), C.UnlearnSpec(forget="forget10", retain="retain90", method="npo"),
                         C.EvalSpec(forget_split="forget10", retain_log="r.json")).to_json()
    saved = {**unlearn, "eval": {k: v for k, v in unlearn["eval"].items() if k not in ("questions", "dialect")}}
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "config.json").write_text(json.dumps(saved))
    check_run_dir(tmp_path / "u", unlearn, resume=True)  # in the eval record too
    sgd = C.TrainJob(C.RunConfig(model="m", out=str(tmp_path), epochs=1, lr=1.0, batch_size=1, grad_accum=1,
                                 optimizer="sgd"), C.FinetuneSpec(split="full"))
    with pytest.raises(UserError, match="differs from the saved run in optimizer"):
        check_run_dir(tmp_path, sgd.to_json(), resume=True)


def test_plan_counts_no_moments_for_sgd():
    assert P.OPTIMIZERS == C.OPTIMIZERS
    for dtype, per_param in (("fp32", 0), ("bf16", 4), ("bf16-pure", 0)):  # bf16 mixed: the fp32 master copy only
        adamw = P.make_plan(P.PlanRequest(model="tiny-llama:1m", method="npo", dtype=dtype))
        sgd = P.make_plan(P.PlanRequest(model="tiny-llama:1m", method="npo", dtype=dtype, optimizer="sgd"))
        n = adamw.trainable
        assert sgd.memory.parts["optimizer"] == n * per_param
        assert adamw.memory.parts["optimizer"] == n * (P.PRECISIONS[dtype]["moments"] + P.PRECISIONS[dtype]["master"])
    args = parser().parse_args(["plan", "--model", "tiny-llama:1m", "--method", "npo", "--optimizer", "sgd"])
    assert plan_request(args).optimizer == "sgd"
    with pytest.raises(UserError, match="optimizer must be one of"):
        P.make_plan(P.PlanRequest(model="tiny-llama:1m", method="npo", optimizer="adam"))
