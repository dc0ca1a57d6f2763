"""Dialects: each codebase's unwritten TOFU conventions, as one frozen record per codebase.

The field's numbers disagree across codebases mostly through small conventions nobody writes down
(tokenisation, generation budget, reductions, truth-ratio formula, ...). A :class:`Dialect` names every
one of them; ``--dialect NAME`` on ``finetune``, ``unlearn``, ``eval``, ``aggregate`` and ``study`` selects
one, and the name is saved in ``config.json``, ``run.json`` and every eval log, so runs of different
dialects are never compared silently (``aggregate`` and ``report`` refuse, unless
``--allow-mixed-dialects``).

Each field's comment names the source file whose behaviour it follows. The four dialects:

* ``npo-sim``: this project's own conventions (the default; unchanged behaviour);
* ``tofu``: locuslab/tofu (``data_module.py``'s ``convert_raw_data_to_model_format``,
  ``config/model_config.yaml``, ``config/eval_everything.yaml``, ``evaluate_util.py``,
  ``aggregate_eval_stat.py``);
* ``open-unlearning``: locuslab/open-unlearning, 2025 (``src/data/utils.py`` ``preprocess_chat_instance``,
  ``src/trainer/utils.py`` ``compute_batch_nll``/``compute_kl_divergence``, ``src/trainer/unlearn/simnpo.py``,
  ``src/data/unlearn.py``, ``configs/trainer/SimNPO.yaml``, the ``truth_ratio``/``prob_mean`` metric);
* ``npo-official``: the NPO repository's TOFU code (a fork of tofu: its tokenisation, generation and
  truth ratio; ``utils.get_model_utility`` for MU; summed sequence log-likelihoods in ``dataloader.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from npo_sim.runio import UserError

TOKENIZATIONS = ("separate", "joined")
GENERATION_BUDGETS = ("new_tokens", "total_length")
CE_DTYPES = ("float32", "model")
NLL_REDUCTIONS = ("mean", "pooled", "sum")
KL_POSITIONS = ("answer", "all")
TRUTH_RATIOS = ("tofu", "tofu-utility", "prob_mean")
IDK_SAMPLING = ("fixed", "per_step")
SIMNPO_MARGINS = ("gamma", "beta_delta")


@dataclass(frozen=True)
class Dialect:
    """Every convention that moves TOFU's numbers between codebases (see the module docstring)."""

    name: str
    # ---- tokenisation (data.encode_qa)
    #: "separate": ``[BOS] prompt`` and ``answer_prefix + answer + EOS`` are tokenised apart (npo-sim);
    #: "joined": prompt + answer as one string, the prompt's token count (tokenised alone, with BOS) masks
    #: the labels, EOS appended (tofu ``data_module.py`` ``convert_raw_data_to_model_format``)
    tokenization: str = "separate"
    #: text between the prompt and the answer; None keeps the prompt format's ``answer_prefix`` (" ").
    #: tofu ``config/model_config.yaml``: Llama-2 ``answer_tag: ""`` (``"[INST] q [/INST]answer"``)
    answer_tag: str | None = None
    #: Phi in tofu: the ``"Answer: "`` tag is part of the scored answer, and generation starts without it
    #: (``question_end_tag: "\\n"``, ``answer_tag: "Answer: "``); False keeps it in the prompt (npo-sim)
    score_answer_tag: bool = False
    #: tokens per example, prompt included: 512 (npo-sim), 200 (tofu ``config/finetune.yaml`` /
    #: ``eval_everything.yaml`` ``generation.max_length``), 512 (open-unlearning ``max_length``)
    max_length: int = 512
    #: open-unlearning tokenises the prompt alone to find the mask length; its chat prompt then ends in a
    #: lone space token that merges into the answer's first token in the joined string, so one answer
    #: token too many is masked (``src/data/utils.py``). A faithful dialect reproduces it.
    drop_first_answer_token: bool = False
    # ---- generation (generate / evaluate)
    #: "new_tokens": every answer gets ``max_new_tokens`` (npo-sim, open-unlearning ``max_new_tokens``);
    #: "total_length": ``generation_max_length`` tokens *in total*, so a batch's budget is that minus its
    #: longest prompt (tofu ``evaluate_util.py`` ``run_generation``: ``max_length=200``)
    generation_budget: str = "new_tokens"
    generation_max_length: int = 200
    # ---- precision (logprobs)
    #: the eval cross-entropy: log-softmax in float32 (npo-sim) or in the model's dtype (tofu, bf16:
    #: ``evaluate_util.py`` ``get_batch_loss`` on the model's logits)
    eval_ce_dtype: str = "float32"
    # ---- reductions (tasks)
    #: GA / retain NLL / fine-tuning: per-example token "mean" then a mean over examples (npo-sim), the
    #: token mean "pooled" over the micro-batch (HF's ``outputs.loss``: tofu ``dataloader.py`` GA, grad_diff
    #: and fine-tuning, the NPO repository's GA/retain terms, open-unlearning's GA/NLL), or "sum"
    nll_reduction: str = "mean"
    #: KL(ref‖θ) positions: "answer" tokens (npo-sim) or "all" positions, prompt and padding included
    #: (open-unlearning ``compute_kl_divergence``: ``kl_div(..., reduction="batchmean")`` over the flat logits)
    kl_positions: str = "answer"
    # ---- truth ratio (aggregate)
    #: "tofu": ``R = exp(mean pert loss − para loss)``, forget ``mean(min(R, 1/R))``, others
    #: ``mean(max(0, 1 − 1/R))`` (tofu ``aggregate_eval_stat.py``); "tofu-utility": the perturbed
    #: probabilities averaged first, ``R′ = mean_j p_pert,j / p_para``, forget ``mean(min(R′, 1/R′))``,
    #: others ``mean(max(0, 1 − R′))`` (as the dialects issue reads tofu ``utils.get_model_utility``);
    #: "prob_mean": ``p_para / (p_para + mean_j p_pert,j)`` averaged (open-unlearning 2025)
    truth_ratio: str = "tofu"
    # ---- SimNPO (open-unlearning src/trainer/unlearn/simnpo.py, configs/trainer/SimNPO.yaml)
    #: "gamma": ``logσ(−(β/|y|)·logp − γ)`` (the paper; npo-sim); "beta_delta": ``logσ(−β(logp/|y| + δ))``,
    #: i.e. γ = β·δ (open-unlearning)
    simnpo_margin: str = "gamma"
    #: default β (npo-sim 2.5; open-unlearning 4.5) and the forget-term weight (open-unlearning γ = 0.125:
    #: folded into the retain weight, retain_weight/γ, which AdamW sees as the same update direction)
    simnpo_beta: float = 2.5
    simnpo_forget_weight: float = 1.0
    # ---- IDK answers (DPO, IDK+RT)
    #: "fixed": one seeded IDK answer per question, so its reference caches (npo-sim); "per_step": a new
    #: random IDK answer every time the example is drawn (open-unlearning ``src/data/unlearn.py``
    #: ``__getitem__``), which needs the reference model
    idk_sampling: str = "fixed"

    def __post_init__(self) -> None:
        for name, options in (("tokenization", TOKENIZATIONS), ("generation_budget", GENERATION_BUDGETS),
                              ("eval_ce_dtype", CE_DTYPES), ("nll_reduction", NLL_REDUCTIONS),
                              ("kl_positions", KL_POSITIONS), ("truth_ratio", TRUTH_RATIOS),
                              ("idk_sampling", IDK_SAMPLING), ("simnpo_margin", SIMNPO_MARGINS)):
            if getattr(self, name) not in options:
                raise UserError(f"dialect {self.name}: {name} must be one of {', '.join(options)}, "
                                f"got {getattr(self, name)!r}")
        if self.max_length < 2 or self.generation_max_length < 2:
            raise UserError(f"dialect {self.name}: lengths must be >= 2")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def prompt_format(self, fmt):
        """The prompt format ``fmt`` (a name or :class:`~full_scale.data.PromptFormat`) as this dialect
        tokenises it: joined or separate, its answer tag, and (``score_answer_tag``) tofu's Phi split."""
        from .data import get_format

        f = get_format(fmt)
        if self.tokenization == "separate":
            return f
        template, prefix = f.template, f.answer_prefix if self.answer_tag is None else self.answer_tag
        if self.score_answer_tag and f.name in SCORED_TAGS:
            template, prefix = SCORED_TAGS[f.name]
        return dataclasses.replace(f, template=template, answer_prefix=prefix, joined=True,
                                   mask_prefix_with_prompt=self.drop_first_answer_token)

    def objective_hyperparameters(self, forget_term: str, beta, gamma, retain_weight, registry_retain_weight):
        """``(beta, gamma, retain_weight)`` for a run: the user's values in this dialect's parameterisation,
        else its defaults (open-unlearning's SimNPO β and forget weight); ``None`` keeps the registry's."""
        if forget_term != "simnpo" or self.name == DEFAULT:
            return beta, gamma, retain_weight
        beta = self.simnpo_beta if beta is None else beta
        if gamma is not None and self.simnpo_margin == "beta_delta":
            gamma = beta * gamma                    # δ inside β(·): the paper's γ is β·δ
        w = registry_retain_weight if retain_weight is None else retain_weight
        return beta, gamma, w / self.simnpo_forget_weight


#: prompt format -> (template, scored answer tag) when the tag is part of the answer (tofu
#: ``config/model_config.yaml``: Phi ``question_start_tag "Question: "``, ``question_end_tag "\n"``,
#: ``answer_tag "Answer: "``; Llama-2 ``"[INST] "``, ``" [/INST]"``, ``""``)
SCORED_TAGS = {"phi": ("Question: {question}\n", "Answer: "), "llama2-chat": ("[INST] {question} [/INST]", "")}

DIALECTS: dict[str, Dialect] = {
    "npo-sim": Dialect("npo-sim"),
    "tofu": Dialect("tofu", tokenization="joined", answer_tag="", score_answer_tag=True, max_length=200,
                    generation_budget="total_length", generation_max_length=200, eval_ce_dtype="model",
                    nll_reduction="pooled"),
    "open-unlearning": Dialect("open-unlearning", tokenization="joined", max_length=512,
                               drop_first_answer_token=True, nll_reduction="pooled", kl_positions="all",
                               truth_ratio="prob_mean", simnpo_margin="beta_delta", simnpo_beta=4.5,
                               simnpo_forget_weight=0.125, idk_sampling="per_step"),
    "npo-official": Dialect("npo-official", tokenization="joined", answer_tag="", score_answer_tag=True,
                            max_length=200, generation_budget="total_length", generation_max_length=200,
                            eval_ce_dtype="model", truth_ratio="tofu-utility", nll_reduction="pooled"),
}
DEFAULT = "npo-sim"


def get_dialect(name: str | None) -> Dialect:
    """The named dialect (``None``: the default), or a one-line :class:`UserError` listing the names."""
    name = DEFAULT if name is None else name
    if name not in DIALECTS:
        raise UserError(f"unknown dialect {name!r}; choose from {', '.join(DIALECTS)}")
    return DIALECTS[name]


def check_same(dialects: dict[str, str | None], allow_mixed: bool = False) -> str:
    """The one dialect shared by ``{source: dialect name}`` (``None``: unknown, e.g. a published log, which
    matches any), ``"unknown"`` when none is named, or a :class:`UserError` naming the sources that differ
    (unless ``allow_mixed``: then ``"mixed"``)."""
    names = {src: d for src, d in dialects.items() if d is not None}   # None: a published log, unknown
    distinct = sorted(set(names.values()))
    if len(distinct) > 1 and not allow_mixed:
        detail = "; ".join(f"{src}: {d}" for src, d in names.items())
        raise UserError(f"runs from different dialects ({detail}); pass --allow-mixed-dialects to compare them anyway")
    return distinct[0] if len(distinct) == 1 else ("mixed" if distinct else "unknown")


#: the README's convention table: (convention, field, where each value comes from)
CONVENTIONS = (
    ("tokenisation", "tokenization",
     "tofu data_module.py convert_raw_data_to_model_format; open-unlearning src/data/utils.py"),
    ("answer tag", "answer_tag", "tofu config/model_config.yaml (Llama-2: answer_tag \"\")"),
    ("Phi's \"Answer: \" tag scored", "score_answer_tag", "tofu config/model_config.yaml (phi)"),
    ("max length", "max_length", "tofu config/finetune.yaml, eval_everything.yaml; open-unlearning configs"),
    ("first answer token masked", "drop_first_answer_token",
     "open-unlearning src/data/utils.py (prompt tokenised alone)"),
    ("generation budget", "generation_budget", "tofu evaluate_util.py run_generation (max_length=200 in total)"),
    ("eval cross-entropy dtype", "eval_ce_dtype", "tofu evaluate_util.py get_batch_loss (bf16 logits)"),
    ("GA / NLL reduction", "nll_reduction", "HF outputs.loss, pooled over the batch: tofu and NPO dataloader.py, "
                                            "open-unlearning GA/NLL"),
    ("KL positions", "kl_positions", "open-unlearning src/trainer/utils.py compute_kl_divergence"),
    ("truth ratio", "truth_ratio",
     "tofu aggregate_eval_stat.py; tofu utils.get_model_utility; open-unlearning prob_mean"),
    ("SimNPO margin", "simnpo_margin", "open-unlearning src/trainer/unlearn/simnpo.py (delta inside beta)"),
    ("SimNPO default β", "simnpo_beta", "open-unlearning configs/trainer/SimNPO.yaml (beta 4.5)"),
    ("SimNPO forget weight", "simnpo_forget_weight", "open-unlearning configs/trainer/SimNPO.yaml (gamma 0.125)"),
    ("IDK answer", "idk_sampling", "open-unlearning src/data/unlearn.py __getitem__ (redrawn)"),
)


def convention_table() -> str:
    """Markdown: one row per convention, one column per dialect, and the source."""
    head = "| convention | " + " | ".join(f"`{n}`" for n in DIALECTS) + " | source |"
    rule = "|---" * (len(DIALECTS) + 2) + "|"
    rows = [head, rule]
    for label, field, source in CONVENTIONS:
        vals = [repr(getattr(d, field)) if isinstance(getattr(d, field), str) else str(getattr(d, field))
                for d in DIALECTS.values()]
        rows.append(f"| {label} | " + " | ".join(f"`{v}`" for v in vals) + f" | {source} |")
    return "\n".join(rows)
