"""Memorization and membership-inference privacy of a Markov run (issue 14: the exact counterparts).

For a parameter list and each forget source (``forget1``, ``forget2``) this scores

* **exact memorization**: the share of scored positions of the forget *train* sequences where the
  model's teacher-forced argmax next state equals the observed state (:func:`metrics.exact_memorization`
  on per-position hit masks, averaged over sequences; every position is scored, the first one by the
  initial distribution, as in the objectives' ``logp``);
* **MIA AUC (LOSS)**: the AUC of the LOSS attack (:func:`metrics.mia_loss`, the mean per-token
  log-prob) with the forget train sequences as members and the forget *test* sequences of the same
  chain as non-members (sampled from the same chain, never trained on by any model);
* **privleak** against the oracle (retain-only) model on the same two sets (:func:`metrics.privleak`);
* **MIA AUC (reference = true chain)**: the same AUC with the score ``log p_model(x) − log p_chain(x)``
  per token (:func:`metrics.mia_reference`), possible only here because the chain is known.

What "exact" means. Every number is computed from the model's own next-state distribution at every
prefix, read off the parameters (for the tabular model the softmax of its transition table; for the
transformer one teacher-forced forward pass): no generation is sampled, no probability is estimated,
and the AUC counts every member/non-member pair (ties ½). So each value is exactly the attack's AUC on
these finite member and non-member sets — what an attacker with the model's exact per-token
log-probs gets. The only randomness left is which sequences were sampled into the two sets.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from torch import Tensor

from .. import metrics
from .markov_chains import Chain, SeqSet, rows_tensor

FORGET_SETS = ("forget1", "forget2")
COLUMNS = ["model", "method", "step", "forget_set", "exact_memorization", "mia_auc_loss", "privleak",
           "mia_auc_ref_true"]


class Snapshots:
    """An evaluator that passes every call through and keeps the parameters of the latest one.

    The unlearning loop calls the evaluator at each record step, so after a run ``last`` holds the
    parameters of its last recorded step (for a diverged run: the last step before it diverged);
    :meth:`keep` files them under a method's name.
    """

    def __init__(self, evaluator) -> None:
        self.evaluator, self.last, self.final = evaluator, None, {}

    def __call__(self, params: Sequence[Tensor]) -> dict[str, Tensor]:
        self.last = [p.detach().clone() for p in params]
        return self.evaluator(params)

    def keep(self, methods: Sequence[str], replicas: bool = False) -> None:
        """File ``last`` under each method (``replicas``: replica ``r`` of ``last`` is ``methods[r]``)."""
        for r, m in enumerate(methods):
            self.final[m] = [p[r] for p in self.last] if replicas else self.last


def token_scores(model, params: Sequence[Tensor], data: SeqSet) -> tuple[Tensor, Tensor]:
    """Per-position (observed-state log-prob ``(n, L)``, argmax hit ``(n, L)``) under the model."""
    with torch.no_grad():
        lp = model.next_logprobs(params, data).double()
    return lp.gather(-1, data.seqs.unsqueeze(-1)).squeeze(-1), lp.argmax(-1) == data.seqs


def true_token_logp(chain: Chain, data: SeqSet) -> Tensor:
    """``(n, L)`` per-position log-prob of the observed state under the true chain."""
    return torch.log(rows_tensor(chain))[data.rows, data.seqs]


def score(model, params, members: SeqSet, nonmembers: SeqSet, chain: Chain) -> dict[str, float]:
    """Exact memorization on the members and the two MIA AUCs (members vs non-members) of ``params``."""
    lp_in, hits = token_scores(model, params, members)
    lp_out, _ = token_scores(model, params, nonmembers)
    ref_in, ref_out = true_token_logp(chain, members), true_token_logp(chain, nonmembers)
    return {
        "exact_memorization": float(metrics.exact_memorization(hits, members.mask).mean()),
        "mia_auc_loss": metrics.auc(metrics.mia_loss(lp_in, members.mask), metrics.mia_loss(lp_out, nonmembers.mask)),
        "mia_auc_ref_true": metrics.auc(metrics.mia_reference(lp_in, ref_in, members.mask),
                                        metrics.mia_reference(lp_out, ref_out, nonmembers.mask)),
    }


def privacy_table(model, model_name: str, chains: dict[str, Chain], members: dict[str, SeqSet],
                  nonmembers: dict[str, SeqSet], target, oracle, final: dict, last_step: dict) -> pd.DataFrame:
    """Tidy rows: the oracle (step 0), then per method the target (step 0) and its last recorded step.

    ``final``: method -> parameters at its last recorded step ``last_step[method]``.
    """
    rows = []

    def scores(params) -> dict[str, dict]:
        return {s: score(model, params, members[s], nonmembers[s], chains[s]) for s in FORGET_SETS}

    def add(method: str, step: int, got: dict[str, dict]) -> None:
        for s in FORGET_SETS:
            rows.append({"model": model_name, "method": method, "step": int(step), "forget_set": s, **got[s],
                         "privleak": metrics.privleak(got[s]["mia_auc_loss"], at_oracle[s]["mia_auc_loss"])})

    at_oracle, at_target = scores(oracle), scores(target)   # the shared step-0 rows, scored once
    add("oracle", 0, at_oracle)
    for method, params in final.items():
        add(method, 0, at_target)
        add(method, last_step[method], scores(params))
    return pd.DataFrame(rows, columns=COLUMNS)


def privacy_summary(table: pd.DataFrame) -> dict:
    """``{"oracle": {set: metrics}, "methods": {method: {set: {"target": …, "end": …}}}, "end_step": …}``."""
    keys = ("exact_memorization", "mia_auc_loss", "privleak", "mia_auc_ref_true")
    out: dict = {"members": "forget train sequences", "nonmembers": "forget test sequences (never trained on)",
                 "oracle": {}, "methods": {}, "end_step": {}}
    for r in table.to_dict("records"):
        vals = {k: float(r[k]) for k in keys}
        if r["method"] == "oracle":
            out["oracle"][r["forget_set"]] = vals
            continue
        end = int(table.step[table.method == r["method"]].max())
        out["end_step"][r["method"]] = end
        at = out["methods"].setdefault(r["method"], {}).setdefault(r["forget_set"], {})
        at["end" if "target" in at else "target"] = vals   # rows come target first, then the last step
    return out


def run_privacy(model, model_name: str, chains: dict[str, Chain], snapshots: Snapshots, target, oracle,
                curves: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The ``privacy`` table and summary block of a finished run: members are the evaluator's forget train
    sequences, non-members its forget test sequences (both capped at ``eval_max`` like every metric)."""
    ev = snapshots.evaluator
    table = privacy_table(model, model_name, chains, ev.forget_eval, {s: ev.test[s] for s in FORGET_SETS}, target,
                          oracle, snapshots.final, curves.groupby("method").step.max().to_dict())
    return table, privacy_summary(table)
