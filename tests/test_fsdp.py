"""FSDP2 on 2 gloo CPU processes (``NPO_TOFU_FSDP_CPU=1``, see :mod:`full_scale.train`): npo_kl with its frozen
reference sharded by ``fully_shard`` equals the 1-process run, and a resume from the epoch-1 checkpoint (every
rank's optimizer shard, via accelerate's ``save_state``/``load_state``) gives bit-identical final weights.

Two torchrun launches in all: the uninterrupted 2-process run (2 epochs, both checkpoints kept), and a
resume of a copy of its run directory cut back to what it held after epoch 1 (what ``--stop-after-epoch 1``
leaves). The 1-process run is in process. A run.json assertion rules out a silent DDP fallback.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from full_scale import checkpoint as ckpt_mod
from full_scale.cli import main as cli
from full_scale.models import load_model
from npo_sim.runio import UserError

FAST = ["--no-progress", "--collapse-questions", "1", "--threads", "1"]
#: loss-side columns compared with the 1-process run (not the weights: Adam turns 1e-9 gradient noise, from
#: the cross-process reduction order, into 1e-4 differences on rarely seen embedding rows)
COLUMNS = ("loss", "forget_loss", "forget_logp", "forget_logp_per_token", "retain_nll", "npo_weight", "param_dist")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(base, data, out, *extra):
    return ["unlearn", "--preset", "mini", "--data-dir", str(data), "--model", str(base), "--method", "npo_kl",
            "--out", str(out), "--epochs", "2", "--max-length", "96", "--keep-checkpoints", "2", *FAST, *extra]


def _torchrun(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "NPO_TOFU_FSDP_CPU": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "full_scale.cli", *args, "--cpu"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tiny_ckpt, tofu_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    _torchrun(_args(tiny_ckpt, tofu_data_dir, root / "two", "--batch-size", "10"))
    # the run dir as --stop-after-epoch 1 leaves it, then resumed
    res = root / "resumed"
    shutil.copytree(root / "two", res)
    shutil.rmtree(res / "checkpoints" / "epoch-2")
    shutil.rmtree(res / "model")
    for name in ("run.json", "timing.json"):
        (res / name).unlink()
    log = pd.read_csv(res / "train_log.csv")
    log[log["step"] <= 2].to_csv(res / "train_log.csv", index=False)
    _torchrun(_args(tiny_ckpt, tofu_data_dir, res, "--batch-size", "10", "--resume"))
    assert cli(_args(tiny_ckpt, tofu_data_dir, root / "one", "--batch-size", "20")) == 0
    return root


def test_fsdp2_two_processes_equal_one_process(runs):
    info = json.loads((runs / "two" / "run.json").read_text())
    # really FSDP on 2 processes (accelerate alone silently runs DDP on CPU), the reference sharded too
    assert info["distributed_type"] == "DistributedType.FSDP" and info["world_size"] == 2
    assert info["reference_sharded"] == "fully_shard" and info["ref"] == "frozen-copy"
    assert info["effective_batch"] == 20 and info["steps_done"] == 4
    one, two = (pd.read_csv(runs / d / "train_log.csv") for d in ("one", "two"))
    assert len(one) == len(two) == 4
    for col in COLUMNS:
        assert torch.allclose(torch.tensor(one[col].values), torch.tensor(two[col].values), rtol=1e-5), col
    # the KL term is small (θ ≈ θ_0): compared absolutely
    assert torch.allclose(torch.tensor(one["retain_loss"].values), torch.tensor(two["retain_loss"].values),
                          rtol=0, atol=1e-4)
    assert two["retain_loss"].iloc[-1] > 1e-3  # the reference is really used (KL > 0 once θ moves)


def test_checkpoint_holds_every_ranks_optimizer_shard(runs):
    ck = runs / "two" / "checkpoints" / "epoch-1"
    acc_dir = ck / ckpt_mod.ACCELERATE_DIR
    assert sorted(p.name for p in (acc_dir / "optimizer_0").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert sorted(p.name for p in acc_dir.glob("random_states_*.pkl")) == ["random_states_0.pkl",
                                                                           "random_states_1.pkl"]
    st = torch.load(ck / "trainer_state.pt", weights_only=True)
    assert "optimizer" not in st and {"scheduler", "rng"} <= set(st)  # the optimizer lives in accelerate/ only
    assert (ck / "model.safetensors").is_file()  # the gathered model, as in any run


def test_resume_is_bit_identical(runs):
    a, b = (load_file(str(runs / d / "model" / "model.safetensors")) for d in ("two", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = (pd.read_csv(runs / d / "train_log.csv") for d in ("two", "resumed"))
    pd.testing.assert_frame_equal(la, lb)
    assert json.loads((runs / "resumed" / "run.json").read_text())["steps_done"] == 4


def test_sharded_and_plain_checkpoints_do_not_cross_resume(runs, tofu_data_dir):
    model = load_model("tiny-llama:1m", device="cpu", data_dir=tofu_data_dir, seed=0)[0]
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(UserError, match="written by a sharded"):
        ckpt_mod.restore(runs / "two", model, opt, sched, "cpu", sharded=False)
    with pytest.raises(UserError, match="written by a non-sharded"):
        ckpt_mod.restore(runs / "one", model, opt, sched, "cpu", sharded=True)
