"""The next objectives on the LM: each one, built from the registry by UnlearnTask, takes one gradient step
on a tiny-llama and moves what it should (forget likelihood down; RMU's activations towards its control)."""

from __future__ import annotations

import copy

import pytest
import torch

from full_scale import data as D
from full_scale.config import RunConfig, TrainJob, UnlearnSpec
from full_scale.logprobs import forward, sequence_logprobs
from full_scale.models import load_model
from full_scale.tasks import Reference, UnlearnTask, rmu_control, rmu_layer
from npo_sim.losses import OBJECTIVES

#: the next objectives' forget terms (``wga_rt``/``satimp_rt`` add the retain NLL to ``wga``/``satimp``: at a random
#: init their p^β weights are ~1e-5, so the retain pull dominates one step; they are run by the CLI tests)
NEW = ("wga", "tnpo", "satimp", "undial", "ce_u", "rmu", "kto")
N = 4   # forget examples per step (a 32k-vocabulary logit tensor per example is what costs)


@pytest.fixture(scope="module")
def setup(tofu_data_dir):
    model, tok, fmt = load_model("tiny-llama:1m", device="cpu", data_dir=tofu_data_dir, seed=0)
    run = RunConfig(model="tiny-llama:1m", out="unused", epochs=1, lr=1e-3, batch_size=N, grad_accum=1,
                    preset="mini", data_dir=str(tofu_data_dir))
    rows = UnlearnTask.load(TrainJob(run, UnlearnSpec(forget="mini-forget10", retain="retain90", method="ga")))
    return model, tok, fmt, run, rows


#: β for the p^β-weighted terms: their registry defaults (WGA 1, SatImp 5) leave a random init's p ~ 1/V inert
BETA = {"wga": 0.2, "satimp": 0.2}


def _one_step(setup, method, lr=1e-3):
    model0, tok, fmt, run, rows = setup
    job = TrainJob(run, UnlearnSpec(forget="mini-forget10", retain="retain90", method=method, beta=BETA.get(method)))
    task = UnlearnTask(job, rows, tok, fmt)
    model = copy.deepcopy(model0)
    frozen = task.source.frozen_copy(model)
    ids = list(range(N))
    ref = Reference({k: v for k, v in task._cache(model, N).items()} if task.source.cached else {}, frozen)
    loss, stats, _ = task.micro(model, ref, ids, epoch=0)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:   # (RMU: the layers above the steered one get none)
                p -= lr * p.grad / (p.grad.norm() + 1e-12)  # a normalised gradient step: one scale for every method
    return task, model, ids


@pytest.mark.parametrize("method", NEW)
def test_each_new_objective_moves_the_forget_side_the_right_way(setup, method):
    task, model, ids = _one_step(setup, method)
    b = D.pad_batch([task.forget[i] for i in ids], task.pad_id)
    m0 = setup[0]
    with torch.no_grad():
        if OBJECTIVES[method].forget == "rmu":   # activations move towards the control vector
            layer = rmu_layer(model)
            c = rmu_control(model.config.hidden_size, OBJECTIVES["rmu"].gamma, 0)
            mask = (b["labels"] != D.IGNORE_INDEX).unsqueeze(-1)
            dist = [float((((forward(m, b["input_ids"], b["attention_mask"], layer)[1] - c) ** 2) * mask).sum())
                    for m in (m0, model)]
            assert dist[1] < dist[0], dist
        else:                                     # forget answers become less likely
            lp = [float(sequence_logprobs(m, **b)[0].mean()) for m in (m0, model)]
            assert lp[1] < lp[0] - 1e-3, (method, lp)
    assert task.info()["objective_needs"] == sorted(OBJECTIVES[method].needs)
    assert task.source.model == OBJECTIVES[method].needs_ref_logits


def test_cached_per_token_reference_equals_the_reference_model(setup):
    """tnpo's cached per-token log-probs (padded table) equal the frozen model's, batch by batch."""
    model, tok, fmt, run, rows = setup
    task = UnlearnTask(TrainJob(run, UnlearnSpec(forget="mini-forget10", retain="retain90", method="tnpo")),
                       rows, tok, fmt)
    assert task.source.cached == ("ref_token_logp",) and not task.source.model
    cached, live = Reference(task._cache(model, 7)), Reference({}, model)
    for ids in ([0, 1, 2], [5, 3, 9, 11]):
        b = D.pad_batch([task.forget[i] for i in ids], task.pad_id)
        a, w = cached.token_logp(ids, b), live.token_logp(ids, b)
        assert a.shape == w.shape and torch.allclose(a.double(), w.double(), atol=1e-5)
