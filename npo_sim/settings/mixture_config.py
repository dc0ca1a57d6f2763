"""The §4 mixture's config: what it supplies, its methods and their Table-1 hyperparameters,
:class:`SyntheticConfig` and the :class:`MixtureData` record (the setting itself is :mod:`.mixture`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .. import losses
from ..losses import DPO_SCALE, OBJECTIVES
from ..runio import UserError
from .mixture_pretrain import PRETRAINERS

ALPHAS = (1.0, 0.0)
PRETRAIN_CHOICES = tuple(PRETRAINERS)
#: what the mixture supplies: per-example and one-token inputs of a two-class model, retain logits; no
#: activations (its random features are fixed, so RMU has nothing to steer)
SUPPLIES = frozenset({"logp", "logp_ref", "idk_logp", "idk_logp_ref", "length", "retain_logp", "retain_logits",
                      "retain_ref_logits", "retain_mask", "token_logp", "ref_token_logp", "token_mask",
                      "forget_logits", "forget_ref_logits", "forget_labels"})
#: every method the setting supports: the paper's Table 1 in its order, then the others (``--methods all``)
SUPPORTED = losses.paper_table1() + tuple(
    m for m in losses.methods(supplies=SUPPLIES) if m not in losses.paper_table1())
#: the methods run by default: Table 1, then the other "synthetic" methods (the step overhead grows with
#: each method, so the next objectives run on request: their laws are the logistic lab's rows)
METHODS = tuple(m for m in SUPPORTED if m in losses.paper_table1() or "synthetic" in OBJECTIVES[m].tags)
#: the Table-1 family whose step size a method of a family outside Table 1 borrows (WGA/SatImp are weighted
#: GA, UNDIAL/CE-U distil towards a target like GA's likelihood terms, KTO is NPO-like)
DONOR_FAMILY = {"weighted": "ga", "distill": "ga", "kto": "npo"}


# --------------------------------------------------------------------------------------------------
# hyperparameters (the paper's Table 1, plus the extras)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MethodSpec:
    """One method: a registered objective (npo_sim.losses.OBJECTIVES) and its step size / β."""

    objective: str
    lr: float
    beta: float | None = None   # None: the objective has no β (or keeps its registry default)
    source: str = "paper Table 1"


#: α -> forget-term family -> (step size, β) of that family's methods in the paper's Table 1 (App. D).
#: IDK+RT uses GA's step size.
PAPER_TABLE1 = {
    1.0: {"ga": (5e-4, None), "idk": (5e-4, None), "npo": (5e-3, 1.0), "dpo": (5e-3, 0.1)},
    0.0: {"ga": (1e-4, None), "idk": (1e-4, None), "npo": (5e-2, 10.0), "dpo": (5e-2, 5.0)},
}


def _spec(name: str, table: Mapping[str, tuple]) -> MethodSpec:
    """A method's hyperparameters: its Table-1 row, or for an extra method those of the first Table-1
    method of its family (its step size; its β too when the forget terms match, else the registry's β).

    A term that needs ``length`` (SimNPO) sees ``|y| = 1`` here, with the registry's margin γ.
    """
    o = OBJECTIVES[name]
    family = o.family if o.family in table else DONOR_FAMILY[o.family]
    lr, beta = table[family]
    if o.paper_row is not None:
        return MethodSpec(name, lr, beta)
    donor = OBJECTIVES[next(m for m in losses.paper_table1() if OBJECTIVES[m].family == family)]
    if not o.uses_beta:
        beta, how = None, ""
    elif o.forget == donor.forget:
        how = " and β"
    else:
        beta, how = o.beta, f", β={o.beta:g}" + (f", γ={o.gamma:g}, |y|=1" if "length" in o.needs else "")
    return MethodSpec(name, lr, beta, source=f"extra (not in the paper): {donor.label}'s lr{how}")


#: alpha -> method -> hyperparameters
HYPERPARAMETERS: dict[float, dict[str, MethodSpec]] = {
    alpha: {m: _spec(m, table) for m in SUPPORTED} for alpha, table in PAPER_TABLE1.items()}


# --------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticConfig:
    """One α of the experiment. The per-method hyperparameters follow from α (:attr:`specs`)."""

    alpha: float = 1.0
    seeds: int = 20                    # outcomes are heavy-tailed across seeds: findings carry seed CIs
    seed0: int = 0                     # seeds used: seed0, ..., seed0 + seeds - 1
    pretrain: str = "newton"           # newton | gd
    compare_pretrain: bool = False     # also run the other recipe and report the difference
    methods: tuple[str, ...] = METHODS
    steps: int = 2000
    record_every: int = 25
    threshold: float = 0.005           # "forget distance below" threshold of the paper's finding
    d: int = 16
    width: int = 128
    n_forget: int = 200
    n_retain: int = 1000
    n_eval: int = 1000
    gd_steps: int = 20000
    gd_lr: float = 0.05
    dtype: str = "float32"             # of the unlearning loop; pretraining and metrics are float64
    #: NPO at these β, at GA's step size, next to GA (the paper's Fig. 3: the NPO trajectory approaches GA's
    #: as β → 0); empty: not run. Its curves are the ``beta_sweep`` table.
    beta_sweep: tuple[float, ...] = ()
    dpo_scale: str = field(default=DPO_SCALE, init=False)

    def __post_init__(self) -> None:
        if self.alpha not in HYPERPARAMETERS:
            raise UserError(f"alpha must be one of {', '.join(f'{a:g}' for a in ALPHAS)} "
                            f"(the paper's Table 1 settings), got {self.alpha:g}")
        if self.seeds < 1:
            raise UserError(f"seeds must be >= 1, got {self.seeds}")
        if self.pretrain not in PRETRAIN_CHOICES:
            raise UserError(f"pretrain must be one of {', '.join(PRETRAIN_CHOICES)}, got {self.pretrain!r}")
        if isinstance(self.methods, str):
            raise UserError(f"methods must be a tuple of method names, got the string {self.methods!r}")
        bad = [m for m in self.methods if m not in HYPERPARAMETERS[self.alpha]]
        unsupported = [m for m in bad if m in OBJECTIVES]
        if unsupported:
            raise UserError(losses.skip_note("the §4 mixture", SUPPLIES, unsupported))
        if bad or not self.methods:
            raise UserError(f"unknown method(s) {', '.join(bad) or '(none given)'}; "
                            f"choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise UserError(f"methods listed twice: {', '.join(self.methods)}")
        for name in ("steps", "record_every", "d", "width", "n_forget", "n_retain", "n_eval", "gd_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.threshold > 0 and self.gd_lr > 0):
            raise UserError("threshold and gd_lr must be > 0")
        if not all(b > 0 for b in self.beta_sweep) or len(set(self.beta_sweep)) != len(self.beta_sweep):
            raise UserError(f"beta_sweep must hold distinct values > 0, got {self.beta_sweep}")
        if self.dtype not in ("float32", "float64"):
            raise UserError(f"dtype must be float32 or float64, got {self.dtype!r}")

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seed0, self.seed0 + self.seeds))

    @property
    def specs(self) -> dict[str, MethodSpec]:
        return {m: HYPERPARAMETERS[self.alpha][m] for m in self.methods}

    @property
    def sweep_specs(self) -> dict[str, MethodSpec]:
        """GA and NPO at each ``beta_sweep`` β, all at GA's Table-1 step size."""
        lr = HYPERPARAMETERS[self.alpha]["ga"].lr
        return {"ga": HYPERPARAMETERS[self.alpha]["ga"], **{
            f"npo@{b:g}": MethodSpec("npo", lr, b, source="β sweep: NPO at GA's lr") for b in self.beta_sweep}}

    @property
    def record_at(self) -> list[int]:
        return sorted(set(range(0, self.steps + 1, self.record_every)) | {self.steps})


# --------------------------------------------------------------------------------------------------
# the data record (drawn by mixture.make_data)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MixtureData:
    """Per-seed arrays stacked on a leading seed axis S. Features are φ = ReLU(Wx) (width 128)."""

    phi_forget: np.ndarray    # (S, n_f, k) forget training features
    y_forget: np.ndarray      # (S, n_f) labels in {0, 1}
    y_idk: np.ndarray         # (S, n_f) the IDK+RT "answer": Bernoulli(0.5) per forget x
    phi_retain: np.ndarray    # (S, n_r, k)
    y_retain: np.ndarray      # (S, n_r)
    phi_eval_forget: np.ndarray  # (S, n_eval, k) fresh forget samples (metrics only)
    phi_eval_retain: np.ndarray  # (S, n_eval, k)
    seeds: tuple[int, ...]
