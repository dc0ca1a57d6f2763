"""The frozen records of an ``npo-tofu`` job, each validated when it is built and saved with its results.

* :class:`RunConfig`: what every training run shares (model, data, optimiser, schedule, checkpoints,
  the collapse detector);
* the task, one of :class:`FinetuneSpec` (what to fit) or :class:`UnlearnSpec` (what to forget, with
  which objective, against which reference);
* :class:`EvalSpec`: an evaluation (eval sets, answer length), used by ``npo-tofu eval`` and by the
  per-epoch evaluation of an unlearning run;
* :class:`TrainJob` puts the three together; :class:`EvalJob` is what ``npo-tofu eval`` runs.
  ``to_json()`` gives the flat ``config.json`` of the run directory (one key per field, plus
  ``command``), which ``--resume`` compares and ``npo-tofu report`` reads.

:class:`Launch` holds how one invocation runs (resume, stop early, threads); it is not part of the
run's identity and is not saved. Defaults that depend on the preset are resolved by the factory
functions (:func:`run_config`, :func:`finetune_spec`, :func:`unlearn_spec`), never by a record changing
itself. Errors are :class:`~npo_sim.runio.UserError`, in the records' own words.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from npo_sim.losses import Objective, get_objective
from npo_sim.runio import UserError

from .data import PROMPT_FORMATS, eval_split, retain_of
from .dialects import get_dialect

#: preset -> command -> defaults for settings left unset
PRESETS: dict[str, dict[str, dict]] = {
    # the paper's recipe (Llama-2-7b-chat on TOFU): effective batch 32 on one device via accumulation
    "tofu": {"finetune": {"lr": 1e-5, "epochs": 5, "batch_size": 4, "grad_accum": 8},
             "unlearn": {"lr": 1e-5, "epochs": 10, "batch_size": 4, "grad_accum": 8}},
    # tofu-mini on CPU with tiny-llama: high lr, small batches
    "mini": {"finetune": {"lr": 2e-3, "epochs": 10, "batch_size": 16, "grad_accum": 1, "model": "tiny-llama:5m"},
             "unlearn": {"lr": 1e-3, "epochs": 10, "batch_size": 8, "grad_accum": 1}},
}
REF_MODES = ("cached", "model")
#: default LoRA targets: the attention projections of Llama-family models (q, k, v, o), as in the LoRA
#: paper's recipe; ``--lora-targets`` takes any module names of the model (or ``all-linear``)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
GA_REDUCTIONS = ("mean", "pooled", "sum")
DTYPES = ("auto", "float32", "bfloat16")
#: ``adamw``: torch AdamW (decoupled weight decay); ``sgd``: plain gradient steps θ ← θ − lr·(∇L + wd·θ)
#: (torch SGD, no momentum: the setting the divergence law is stated in)
OPTIMIZERS = ("adamw", "sgd")
#: ``linear``: warm-up, then linear decay to 0; ``constant``: warm-up, then lr for every step
#: (``warmup_epochs=0`` for a constant step size from the first step)
LR_SCHEDULES = ("linear", "constant")
#: when ``--eval-every-epoch`` evaluates: after ``every`` epoch, or after the ``last`` one only
EVAL_EPOCHS = ("every", "last")
_MODEL_REQUIRED = "model is required (an HF id, a local checkpoint or tiny-llama[:SIZE])"


def _at_least_1(record, names) -> None:
    for name in names:
        value = getattr(record, name)
        if value < 1:
            raise UserError(f"{name} must be ≥ 1, got {value}")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


@dataclass(frozen=True)
class RunConfig:
    """What every training run shares. ``ga_reduction`` reduces the plain likelihood terms (fine-tuning,
    GA, IDK, the retain NLL): per-example token ``mean`` or ``sum``; terms that compare with a reference
    or normalise by length always use the sum (the registry's ``sequence_reduction``)."""

    model: str
    out: str
    epochs: int
    lr: float
    batch_size: int              #: per-device micro-batch
    grad_accum: int
    preset: str = "tofu"
    data_dir: str | None = None
    warmup_epochs: float = 1.0
    weight_decay: float = 0.01
    optimizer: str = "adamw"     #: :data:`OPTIMIZERS`
    lr_schedule: str = "linear"  #: :data:`LR_SCHEDULES` (the warm-up of ``warmup_epochs`` applies to both)
    seed: int = 0
    max_length: int = 512
    ga_reduction: str = "mean"
    save_every: int = 1          #: checkpoint every N epochs
    keep_checkpoints: int = 1    #: keep the last N epoch checkpoints
    collapse_k: float = 5.0      #: collapse when the retain NLL exceeds k × its initial value
    collapse_questions: int = 4  #: retain questions answered greedily after every epoch
    stop_on_collapse: bool = False
    dtype: str = "auto"
    prompt_format: str | None = None
    #: the codebase whose conventions the run follows (:mod:`full_scale.dialects`)
    dialect: str = "npo-sim"
    #: LoRA rank (peft); ``None``: every weight trains (no adapters)
    lora_r: int | None = None
    #: LoRA α: the update is scaled by α/r (``None`` with ``lora_r``: 2·r, resolved by :func:`run_config`)
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    #: module names that get adapters (``None`` with ``lora_r``: :data:`LORA_TARGETS`; ``("all-linear",)``: peft's)
    lora_targets: tuple[str, ...] | None = None
    merge_lora: bool = False     #: the final ``model/`` is the merged model (else the adapter directory)

    def __post_init__(self) -> None:
        if not self.model:
            raise UserError(_MODEL_REQUIRED)
        self._check_lora()
        _choice("preset", self.preset, tuple(PRESETS))
        _at_least_1(self, ("epochs", "batch_size", "grad_accum", "save_every", "keep_checkpoints", "max_length"))
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"lr must be > 0, got {self.lr}")
        if self.warmup_epochs < 0 or self.weight_decay < 0 or self.collapse_k <= 1:
            raise UserError("warmup_epochs and weight_decay must be ≥ 0 and collapse_k > 1")
        if self.collapse_questions < 0:
            raise UserError(f"collapse_questions must be ≥ 0, got {self.collapse_questions}")
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("ga_reduction", self.ga_reduction, GA_REDUCTIONS)
        _choice("dtype", self.dtype, DTYPES)
        get_dialect(self.dialect)
        if self.prompt_format is not None:
            _choice("prompt_format", self.prompt_format, tuple(PROMPT_FORMATS))

    def _check_lora(self) -> None:
        if self.lora_r is None:
            given = [f"--{n.replace('_', '-')}" for n, v in (("lora_alpha", self.lora_alpha),
                     ("lora_targets", self.lora_targets), ("merge_lora", self.merge_lora or None),
                     ("lora_dropout", self.lora_dropout or None)) if v is not None]
            if given:
                raise UserError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} --lora-r (the LoRA rank)")
            return
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise UserError(f"lora_r must be an integer ≥ 1, got {self.lora_r}")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise UserError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not (0 <= self.lora_dropout < 1):
            raise UserError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_targets is not None:
            if not self.lora_targets or not all(isinstance(t, str) and t.strip() for t in self.lora_targets):
                raise UserError(f"lora_targets must be a non-empty list of module names, got {self.lora_targets!r}")
            if "all-linear" in self.lora_targets and len(self.lora_targets) > 1:
                raise UserError("lora_targets: all-linear stands alone")

    @property
    def lora(self) -> dict | None:
        """The resolved LoRA settings (``r``, ``alpha``, ``dropout``, ``targets``), or ``None`` without LoRA."""
        if self.lora_r is None:
            return None
        return {"r": self.lora_r, "alpha": float(self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_r),
                "dropout": float(self.lora_dropout), "targets": list(self.lora_targets or LORA_TARGETS)}


@dataclass(frozen=True)
class FinetuneSpec:
    """Fine-tune on ``split``: ``full`` or ``retainYY`` (under the mini preset, tofu-mini's versions)."""

    command: ClassVar[str] = "finetune"
    split: str

    def __post_init__(self) -> None:
        if not self.split:
            raise UserError("split is required (full or retainYY)")


@dataclass(frozen=True)
class UnlearnSpec:
    """Unlearn ``forget`` (keeping ``retain``) with the registered objective ``method``. ``None``
    hyperparameters keep the objective's defaults. ``ref_mode``: reference log-likelihoods ``cached``
    once before training, or computed by a frozen ``model`` copy (the A/B check)."""

    command: ClassVar[str] = "unlearn"
    forget: str
    retain: str
    method: str
    beta: float | None = None
    gamma: float | None = None
    retain_weight: float | None = None
    ref_mode: str = "cached"

    def __post_init__(self) -> None:
        _choice("ref_mode", self.ref_mode, REF_MODES)
        self.objective()  # unknown method or bad hyperparameter: fail now

    def objective(self, dialect: str | None = None) -> Objective:
        """The registry objective with this spec's hyperparameters, read in ``dialect``'s parameterisation
        (open-unlearning's SimNPO: its β default, δ inside β, its forget weight)."""
        try:
            reg = get_objective(self.method)
            beta, gamma, weight = get_dialect(dialect).objective_hyperparameters(
                reg.forget, self.beta, self.gamma, self.retain_weight, reg.retain_weight)
            return get_objective(self.method, beta=beta, gamma=gamma, retain_weight=weight)
        except ValueError as exc:
            raise UserError(str(exc)) from None


@dataclass(frozen=True)
class EvalSpec:
    """A TOFU evaluation: the eval sets of ``forget_split`` (first ``ds_size`` questions of each),
    greedy answers of at most ``max_new_tokens`` for ROUGE, and the retain model's log for forget
    quality (optional for ``npo-tofu eval``, required for the per-epoch evaluation). With
    ``extra_metrics``: memorization, MIA AUCs against the holdout (``holdout_file``, or tofu-mini's),
    privleak against the retain log's AUCs, fluency (judged by ``judge_model`` when given) and
    bootstrap CIs (:mod:`full_scale.extra_metrics`)."""

    forget_split: str
    retain_log: str | None = None
    data_dir: str | None = None
    ds_size: int = 300
    batch_size: int = 16
    max_new_tokens: int = 128
    allow_mismatched_logs: bool = False  #: retain log with another forget sample count: a note, not an error
    gen_batch_size: int | None = None  #: greedy generation's batch (default: batch_size); same answers at any size
    holdout_file: str | None = None  #: non-member QA for the MIAs/privleak (tofu-mini: its own holdout if unset)
    judge_model: str | None = None   #: scores the greedy forget answers' log-likelihood (fluency); None: omitted
    n_boot: int = 1000               #: bootstrap resamples of every CI
    extra_metrics: bool = True       #: memorization, MIA, privleak, fluency and CIs (False: TOFU's metrics only)
    dialect: str = "npo-sim"         #: tokenisation, generation budget, CE precision, truth ratio (full_scale.dialects)
    allow_mixed_dialects: bool = False  #: a retain log of another dialect: compared anyway (else an error)
    questions: str = "all"           #: all, or the val/test questions of every eval set (full_scale.data)
    epochs: str = "every"            #: the per-epoch evaluation after every epoch, or only after the ``last``

    def __post_init__(self) -> None:
        from .data import QUESTION_SUBSETS

        _at_least_1(self, ("ds_size", "batch_size", "max_new_tokens", "n_boot"))
        get_dialect(self.dialect)
        _choice("questions", self.questions, QUESTION_SUBSETS)
        _choice("epochs", self.epochs, EVAL_EPOCHS)
        if self.gen_batch_size is not None:
            _at_least_1(self, ("gen_batch_size",))


@dataclass(frozen=True)
class Launch:
    """How this invocation runs a job (not saved: a resumed run may change any of it)."""

    resume: bool = False
    stop_after_epoch: int | None = None  #: stop (as if killed) after checkpointing this epoch
    max_steps: int | None = None         #: stop after this many optimizer steps (benchmarks)
    threads: int | None = None           #: torch threads per process
    cpu: bool = False                    #: CPU even when a GPU is present
    progress: bool = True                #: a tqdm bar on the main process
    allow_pickle_weights: bool = False   #: load a local pickle-only (pytorch_model.bin) --model
    #: recompute activations in the backward pass (non-reentrant; same losses, less memory; in run.json)
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class TrainJob:
    """One ``npo-tofu finetune`` or ``unlearn`` run; ``eval`` is the per-epoch evaluation (unlearning only)."""

    run: RunConfig
    task: FinetuneSpec | UnlearnSpec
    eval: EvalSpec | None = None

    def __post_init__(self) -> None:
        if self.eval is not None and not isinstance(self.task, UnlearnSpec):
            raise UserError("per-epoch evaluation is only defined for unlearning runs")
        if self.eval is not None and self.eval.retain_log is None:
            raise UserError("per-epoch evaluation needs the retain model's eval log (retain_log) to compute "
                            "forget quality")

    @property
    def command(self) -> str:
        return self.task.command

    def to_json(self) -> dict:
        """The flat ``config.json``: ``command``, every run and task field, and ``eval``."""
        return {"command": self.command, **dataclasses.asdict(self.run), **dataclasses.asdict(self.task),
                "eval": dataclasses.asdict(self.eval) if self.eval is not None else None}


@dataclass(frozen=True)
class EvalJob:
    """One ``npo-tofu eval``: evaluate ``model`` by ``eval``, writing into ``out``."""

    model: str
    out: str
    eval: EvalSpec
    device: str | None = None  #: default: cuda if available, else cpu
    allow_pickle_weights: bool = False  #: load a local pickle-only (pytorch_model.bin) --model
    threads: int | None = None  #: torch threads per process (as Launch.threads; not in the results)
    base_model: str | None = None  #: the base of an adapter ``model`` (default: its adapter_config's)

    def to_json(self) -> dict:
        return {"command": "eval", "model": self.model, "out": self.out, "device": self.device,
                **({"base_model": self.base_model} if self.base_model is not None else {}),
                **dataclasses.asdict(self.eval)}


def saved_defaults(command: str) -> tuple[dict, dict]:
    """``(top-level, eval)`` field defaults of a ``config.json`` written by ``command``. A field added after
    a run was saved is given a default that keeps the old behaviour, so an older ``config.json`` that lacks
    it is read as that default (:func:`full_scale.checkpoint.check_run_dir`: the run still resumes)."""
    def defaults(*classes) -> dict:
        return {f.name: f.default for c in classes for f in dataclasses.fields(c)
                if f.default is not dataclasses.MISSING}

    task = FinetuneSpec if command == "finetune" else UnlearnSpec
    return defaults(RunConfig, task), defaults(EvalSpec)


def check_out_file(path) -> None:
    """Fail in one line, before any work, unless ``path`` can be written as a file (not a directory,
    in a writable place); :func:`npo_sim.runio.check_out_dir` checks its directory."""
    from pathlib import Path

    from npo_sim.runio import check_out_dir

    p = Path(path)
    if p.is_dir():
        raise UserError(f"--out {p} is a directory; give a file name (e.g. {p / 'aggregate.json'})")
    check_out_dir(p.parent)


# --------------------------------------------------------------------------------------------------
# factories: preset defaults and derived names, resolved before a record is built
# --------------------------------------------------------------------------------------------------
def run_config(command: str, preset: str, **settings) -> RunConfig:
    """A :class:`RunConfig` whose unset (``None``) settings take the preset's default for ``command``."""
    _choice("preset", preset, tuple(PRESETS))
    resolved = {**PRESETS[preset][command], **{k: v for k, v in settings.items() if v is not None}}
    if "model" not in resolved:
        raise UserError(_MODEL_REQUIRED)
    if resolved.get("lora_r") is not None:  # LoRA defaults (α = 2·r, the attention projections), saved explicitly
        if resolved.get("lora_alpha") is None and not isinstance(resolved["lora_r"], bool) \
                and isinstance(resolved["lora_r"], int) and resolved["lora_r"] >= 1:
            resolved["lora_alpha"] = float(2 * resolved["lora_r"])
        resolved.setdefault("lora_targets", LORA_TARGETS)
    if resolved.get("lora_targets") is not None:
        resolved["lora_targets"] = tuple(resolved["lora_targets"])
    return RunConfig(preset=preset, **resolved)


def finetune_spec(split: str, forget: str) -> FinetuneSpec:
    """``split`` ``retain`` (mini preset) stands for the complement of ``forget``."""
    return FinetuneSpec(split=retain_of(forget) if split == "retain" else split)


def unlearn_spec(forget: str, retain: str | None, method: str, **hyperparameters) -> UnlearnSpec:
    """``retain`` defaults to the complement of ``forget``."""
    return UnlearnSpec(forget=forget, retain=retain or retain_of(forget), method=method, **hyperparameters)


def epoch_eval_spec(run: RunConfig, spec: UnlearnSpec, retain_log: str | None, **settings) -> EvalSpec:
    """The per-epoch evaluation of an unlearning run: its forget split's eval sets; ``None`` settings
    keep :class:`EvalSpec`'s defaults."""
    return EvalSpec(forget_split=eval_split(spec.forget, run.preset), retain_log=retain_log, data_dir=run.data_dir,
                    dialect=run.dialect, **{k: v for k, v in settings.items() if v is not None})
