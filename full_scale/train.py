"""``npo-tofu finetune`` and ``npo-tofu unlearn``: one training loop under accelerate.

Read top to bottom: config -> data -> model -> (reference cache) -> loop -> checkpoints.

* **Losses** come only from :mod:`npo_sim.losses` (``get_objective(method)``); this module computes
  exactly ``objective.needs`` per micro-batch: the forget log-likelihood, its length, IDK-answer
  log-likelihoods, the retain log-likelihood, or retain logits for the KL terms.
* **Reductions.** Terms that compare with a reference or normalise by length (npo, dpo, simnpo) use
  the *summed* answer log-likelihood, as their definitions require. Plain likelihood terms (ga, idk,
  retain nll, and fine-tuning) use ``--ga-reduction``: ``mean`` (default; per-example token mean,
  like the HF ``outputs.loss`` used for GA and the retain loss in the TOFU/NPO code) or ``sum``.
  Every loss is a mean over *examples*, so batch × accumulation × processes splits are exact.
* **Reference.** Forget-side reference log-likelihoods (``logp_ref``, ``idk_logp_ref``) are computed
  once before training and cached in ``ref_cache.safetensors`` (``--ref-mode cached``, default). A
  frozen reference model is kept only for the ``*_kl`` methods (retain logits) or with
  ``--ref-mode model`` (the A/B check; both give the same losses).
* **Schedule.** AdamW (weight decay 0.01), ``--warmup-epochs`` of linear warm-up (lr·(s+1)/warm) then
  linear decay to 0 at the end. The effective batch (per-device × accumulation × processes) is printed
  and saved in ``run.json``.
* **Run dir.** ``config.json`` (frozen :class:`TrainConfig`), ``run.json``, ``train_log.csv`` (one row
  per optimizer step), ``checkpoints/epoch-K/`` (model + tokenizer via ``save_pretrained`` and
  ``trainer_state.pt``: optimizer, scheduler, RNG; loaded with ``weights_only=True``), and the final
  model in ``model/``. ``--resume`` continues from the last checkpoint and gives the same result as
  an uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from npo_sim.losses import FORGET_TERMS, get_objective, nll, npo_weight
from npo_sim.runio import UserError, write_csv, write_json
from npo_sim.unlearn import NonFiniteLoss

from . import data as D
from .logprobs import forward_logits, sequence_logprobs, token_logits
from .models import load_model, save_checkpoint

#: per-preset defaults for flags left unset: (finetune, unlearn)
PRESET_DEFAULTS = {
    # the paper's recipe (Llama-2-7b-chat on TOFU): effective batch 32 on one device via accumulation
    "tofu": ({"lr": 1e-5, "epochs": 5, "batch_size": 4, "grad_accum": 8, "model": None},
             {"lr": 1e-5, "epochs": 10, "batch_size": 4, "grad_accum": 8}),
    # tofu-mini on CPU with tiny-llama: high lr, small batches
    "mini": ({"lr": 2e-3, "epochs": 10, "batch_size": 16, "grad_accum": 1, "model": "tiny-llama:5m"},
             {"lr": 1e-3, "epochs": 10, "batch_size": 8, "grad_accum": 1}),
}
REF_PREFIX = "ref_"


@dataclass(frozen=True)
class TrainConfig:
    command: str                 # "finetune" | "unlearn"
    model: str
    out: str
    data_dir: str | None
    preset: str                  # "tofu" | "mini"
    split: str | None            # finetune corpus
    forget: str | None           # unlearn
    retain: str | None
    method: str | None
    beta: float | None
    gamma: float | None
    retain_weight: float | None
    epochs: int
    lr: float
    batch_size: int
    grad_accum: int
    warmup_epochs: float
    weight_decay: float
    seed: int
    max_length: int
    ref_mode: str
    ga_reduction: str
    save_every: int
    keep_checkpoints: int
    collapse_k: float
    collapse_questions: int
    stop_on_collapse: bool
    dtype: str
    prompt_format: str | None


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF id, local dir, run dir, or tiny-llama[:1m|5m|20m]")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--data-dir", default=None, help="TOFU JSON-lines directory (default $NPO_TOFU_DIR)")
    p.add_argument("--preset", choices=("tofu", "mini"), default="tofu",
                   help="tofu: the real splits; mini: tofu-mini (the 20 authors of forget10)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="per-device micro-batch")
    p.add_argument("--grad-accum", type=int, default=None, help="gradient accumulation steps")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--ga-reduction", choices=("mean", "sum"), default="mean",
                   help="reduction of plain likelihood terms (ga, idk, retain nll, fine-tuning): per-token "
                        "mean (HF/TOFU convention, default) or sum over answer tokens")
    p.add_argument("--save-every", type=int, default=1, help="checkpoint every N epochs")
    p.add_argument("--keep-checkpoints", type=int, default=1, help="keep the last N epoch checkpoints")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--prompt-format", choices=tuple(D.PROMPT_FORMATS), default=None,
                   help="override the model family's prompt format")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--stop-after-epoch", type=int, default=None,
                   help="stop (as if killed) after checkpointing this epoch; for resume tests")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (benchmarks)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--cpu", action="store_true", help="force CPU even when a GPU is present")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    # collapse detector (logged for finetune too, where it rarely fires)
    p.add_argument("--collapse-k", type=float, default=5.0,
                   help="flag collapse when the retain NLL exceeds k x its initial value")
    p.add_argument("--collapse-questions", type=int, default=4,
                   help="retain questions answered greedily after every epoch to detect degenerate output")
    p.add_argument("--stop-on-collapse", action="store_true")


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", required=True,
                   help="full or retainYY (with --preset mini also 'retain' = the complement of --forget)")
    p.add_argument("--forget", default="forget10", help="with --split retain: whose complement to fit")
    _common_arguments(p)


def add_unlearn_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--forget", default="forget10", help="forgetXX")
    p.add_argument("--retain", default=None, help="retainYY (default: the complement of --forget)")
    p.add_argument("--method", required=True, help="an npo_sim.losses.OBJECTIVES name (ga, npo_rt, ...)")
    p.add_argument("--beta", type=float, default=None, help="default: the objective's (0.1; 2.5 for simnpo)")
    p.add_argument("--gamma", type=float, default=None)
    p.add_argument("--retain-weight", type=float, default=None)
    p.add_argument("--ref-mode", choices=("cached", "model"), default="cached",
                   help="cached: reference log-probs computed once before training; model: a frozen copy")
    # per-epoch evaluation hook, implemented in full_scale.evaluate.evaluate_epoch
    p.add_argument("--eval-every-epoch", action="store_true",
                   help="evaluate (full_scale.evaluate.evaluate_epoch) after every epoch")
    p.add_argument("--eval-ds-size", type=int, default=None, help="questions per eval set (default: TOFU's 300)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="per-epoch eval batch (default 16)")
    p.add_argument("--eval-max-new-tokens", type=int, default=None,
                   help="greedy answer length for the per-epoch ROUGE (default 128)")
    p.add_argument("--retain-log", default=None,
                   help="retain model's TOFU-format eval log, for forget quality in the per-epoch eval")
    _common_arguments(p)


def _retain_of(forget: str) -> str:
    pct = forget.removeprefix("mini-").removeprefix("forget")
    if not (pct.isdigit() and len(pct) == 2):
        raise UserError(f"--forget must look like forgetXX, got {forget!r}")
    return f"retain{100 - int(pct):02d}"


def config_from_args(command: str, args) -> TrainConfig:
    ft, ul = PRESET_DEFAULTS[args.preset]
    dflt = ft if command == "finetune" else ul
    pick = lambda name: getattr(args, name) if getattr(args, name, None) is not None else dflt.get(name)  # noqa: E731
    model = args.model if args.model is not None else (ft.get("model") if command == "finetune" else None)
    if model is None:
        raise UserError("--model is required (an HF id, a local checkpoint or tiny-llama[:SIZE])")
    split = forget = retain = method = None
    if command == "finetune":
        split = "retain" + _retain_of(args.forget)[6:] if args.split == "retain" else args.split
    else:
        forget, method = args.forget, args.method
        retain = args.retain or _retain_of(forget)
    cfg = TrainConfig(
        command=command, model=model, out=str(args.out), data_dir=args.data_dir, preset=args.preset,
        split=split, forget=forget, retain=retain, method=method,
        beta=getattr(args, "beta", None), gamma=getattr(args, "gamma", None),
        retain_weight=getattr(args, "retain_weight", None),
        epochs=pick("epochs"), lr=pick("lr"), batch_size=pick("batch_size"), grad_accum=pick("grad_accum"),
        warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay, seed=args.seed,
        max_length=args.max_length, ref_mode=getattr(args, "ref_mode", "cached"),
        ga_reduction=args.ga_reduction, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        collapse_k=args.collapse_k, collapse_questions=args.collapse_questions,
        stop_on_collapse=args.stop_on_collapse, dtype=args.dtype, prompt_format=args.prompt_format)
    for name in ("epochs", "batch_size", "grad_accum", "save_every", "keep_checkpoints", "max_length"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise UserError(f"--lr must be > 0, got {cfg.lr}")
    if cfg.warmup_epochs < 0 or cfg.weight_decay < 0 or cfg.collapse_k <= 1:
        raise UserError("--warmup-epochs and --weight-decay must be >= 0 and --collapse-k > 1")
    return cfg


# --------------------------------------------------------------------------------------------------
# tasks: what one micro-batch computes
# --------------------------------------------------------------------------------------------------
def _reduce(lp_sum, count, how: str):
    return lp_sum / count.clamp_min(1) if how == "mean" else lp_sum


class FinetuneTask:
    """Minimise the retain-style NLL (``npo_sim.losses.nll``) over the corpus."""

    stat_names = ("loss", "nll_per_token", "logp_sum")

    def __init__(self, cfg, examples):
        self.cfg, self.examples, self.n = cfg, examples, len(examples)

    def micro(self, model, ids, epoch, pad_id):
        b = D.pad_batch([self.examples[i] for i in ids], pad_id)
        b = {k: v.to(_device(model)) for k, v in b.items()}
        lp, n = sequence_logprobs(model, b["input_ids"], b["attention_mask"], b["labels"])
        loss = nll(_reduce(lp, n, self.cfg.ga_reduction))
        stats = {"loss": loss.detach() * len(ids), "nll_per_token": (-lp / n).detach().sum(),
                 "logp_sum": lp.detach().sum()}
        return loss, stats, int(b["attention_mask"].sum())


class UnlearnTask:
    """Forget/retain inputs for ``objective.needs``; reference inputs from the cache or a frozen model."""

    stat_names = ("loss", "forget_loss", "retain_loss", "forget_logp", "forget_logp_per_token",
                  "retain_nll", "npo_weight")

    def __init__(self, cfg, objective, forget, idk, retain, ref_cache, ref_model):
        self.cfg, self.obj = cfg, objective
        self.forget, self.idk, self.retain = forget, idk, retain  # lists of encoded examples
        self.n = len(forget)
        self.ref_cache, self.ref_model = ref_cache, ref_model
        needs = objective.needs
        term_needs = FORGET_TERMS[objective.forget].needs
        # summed log-likelihood wherever the term compares with a reference or normalises by length
        self.forget_red = "sum" if term_needs & {"logp_ref", "idk_logp_ref", "length"} else cfg.ga_reduction
        self.need_retain_logits = "retain_logits" in needs

    def micro(self, model, ids, epoch, pad_id):
        dev, needs = _device(model), self.obj.needs
        pairs = D.pair_retain(self.n, len(self.retain), self.cfg.seed, epoch)
        batch = lambda exs: {k: v.to(dev) for k, v in D.pad_batch(exs, pad_id).items()}  # noqa: E731
        fb = batch([self.forget[i] for i in ids])
        rb = batch([self.retain[pairs[i]] for i in ids])
        x: dict[str, torch.Tensor] = {}
        ib = None
        # forget side: always computed (logged even when the objective does not read it)
        grad_forget = bool(needs & {"logp", "length"})
        with torch.set_grad_enabled(grad_forget):
            lp, n = sequence_logprobs(model, fb["input_ids"], fb["attention_mask"], fb["labels"])
        x["logp"], x["length"] = _reduce(lp, n, self.forget_red), n.to(lp.dtype)
        if needs & {"idk_logp"}:
            ib = batch([self.idk[i] for i in ids])
            ilp, icount = sequence_logprobs(model, ib["input_ids"], ib["attention_mask"], ib["labels"])
            x["idk_logp"] = _reduce(ilp, icount, self.forget_red)
        for key in ("logp_ref", "idk_logp_ref"):
            if key in needs:
                x[key] = self._reference(key, ids, fb, ib if key == "idk_logp_ref" else None, dev)
        # retain side: retain NLL is always logged; gradients only when the objective reads it
        if self.need_retain_logits:
            rlp, rn, rlogits, rmask = token_logits(model, rb["input_ids"], rb["attention_mask"], rb["labels"])
            with torch.no_grad():
                ref_logits = forward_logits(self.ref_model, rb["input_ids"], rb["attention_mask"])[:, :-1]
            x.update(retain_logits=rlogits, retain_ref_logits=ref_logits, retain_mask=rmask)
        else:
            with torch.set_grad_enabled("retain_logp" in needs):
                rlp, rn = sequence_logprobs(model, rb["input_ids"], rb["attention_mask"], rb["labels"])
        x["retain_logp"] = _reduce(rlp, rn, self.cfg.ga_reduction)
        terms = self.obj(x)
        with torch.no_grad():
            B = len(ids)
            stats = {"loss": terms.loss.detach() * B, "forget_loss": terms.forget.detach() * B,
                     "retain_loss": terms.retain.detach() * B, "forget_logp": lp.detach().sum(),
                     "forget_logp_per_token": (lp / n).detach().sum(),
                     "retain_nll": (-rlp / rn).detach().sum()}
            if "logp_ref" in x:
                stats["npo_weight"] = npo_weight(_reduce(lp, n, "sum").detach(), x["logp_ref"],
                                                 self.obj.beta).sum()
        tokens = int(fb["attention_mask"].sum() + rb["attention_mask"].sum())
        return terms.loss, stats, tokens

    def _reference(self, key, ids, fb, ib, dev):
        if self.cfg.ref_mode == "cached" or self.ref_model is None:
            return self.ref_cache[key][ids].to(dev)
        b = fb if key == "logp_ref" else ib
        with torch.no_grad():
            lp, n = sequence_logprobs(self.ref_model, b["input_ids"], b["attention_mask"], b["labels"])
        return _reduce(lp, n, self.forget_red)


def _device(model):
    return next(model.parameters()).device


@torch.no_grad()
def compute_reference_cache(model, task: UnlearnTask, pad_id: int, batch_size: int) -> dict[str, torch.Tensor]:
    """``logp_ref`` (and ``idk_logp_ref``) for every forget example, once, at the initial weights."""
    out = {}
    dev = _device(model)
    for key, exs in (("logp_ref", task.forget), ("idk_logp_ref", task.idk)):
        if key not in task.obj.needs:
            continue
        vals = []
        for s in range(0, len(exs), batch_size):
            b = {k: v.to(dev) for k, v in D.pad_batch(exs[s:s + batch_size], pad_id).items()}
            lp, n = sequence_logprobs(model, b["input_ids"], b["attention_mask"], b["labels"])
            vals.append(_reduce(lp, n, task.forget_red).float().cpu())
        out[key] = torch.cat(vals)
    return out


# --------------------------------------------------------------------------------------------------
# schedule, batching, checkpoints
# --------------------------------------------------------------------------------------------------
def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up lr·(s+1)/warm, then linear decay to 0 at ``total_steps``."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return f


def epoch_steps(n: int, per_step: int, seed: int, epoch: int) -> list[list[int]]:
    """The seeded example order of ``epoch``, cut into optimizer steps of ``per_step`` examples."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7_777 + int(epoch))
    order = torch.randperm(n, generator=g).tolist()
    return [order[s:s + per_step] for s in range(0, n, per_step)]


def micro_parts(step_ids: list[int], world: int, accum: int, rank: int) -> list[list[int]]:
    """This rank's ``accum`` micro-batches of one step: part ``m·world + rank`` of a near-equal split."""
    P, L = world * accum, len(step_ids)
    parts = [step_ids[k * L // P:(k + 1) * L // P] for k in range(P)]
    return [parts[m * world + rank] for m in range(accum)]


def _rng_state() -> dict[str, torch.Tensor]:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    root = out / "checkpoints"
    found = []
    for p in root.glob("epoch-*") if root.is_dir() else []:
        if (p / "trainer_state.pt").is_file() and p.name[6:].isdigit():
            found.append((int(p.name[6:]), p))
    return sorted(found)


def _param_distance(params, params0) -> torch.Tensor:
    sq = sum(((p.detach().float() - q.float()) ** 2).sum() for p, q in zip(params, params0))
    return torch.as_tensor(sq)


def is_degenerate(ids: list[int], min_len: int = 1) -> bool:
    """Empty output, a 3-gram occurring 3+ times, or one token making up over half of 8+ tokens."""
    if len(ids) < min_len:
        return True
    grams: dict[tuple, int] = {}
    for i in range(len(ids) - 2):
        g = tuple(ids[i:i + 3])
        grams[g] = grams.get(g, 0) + 1
        if grams[g] >= 3:
            return True
    if len(ids) >= 8:
        top = max(ids.count(t) for t in set(ids))
        if top > len(ids) / 2:
            return True
    return False


@torch.no_grad()
def greedy_answers(model, tokenizer, questions, fmt, max_new_tokens: int = 32) -> list[list[int]]:
    """Greedy continuations (no KV cache; runs through the wrapped model on every rank)."""
    dev, outs = _device(model), []
    for q in questions:
        ids = D.encode_prompt(tokenizer, q, fmt)
        new: list[int] = []
        for _ in range(max_new_tokens):
            x = torch.tensor([ids + new], device=dev)
            nxt = int(forward_logits(model, x, torch.ones_like(x))[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            new.append(nxt)
        text = tokenizer.decode(new, skip_special_tokens=True)
        outs.append(new if text.strip() else [])
    return outs


# --------------------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------------------
def _setup(command: str, args):
    """Everything that can fail on bad input, before anything is written."""
    cfg = config_from_args(command, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    objective = None
    if command == "unlearn":
        objective = get_objective(cfg.method, beta=cfg.beta, gamma=cfg.gamma, retain_weight=cfg.retain_weight)
        if getattr(args, "eval_every_epoch", False):
            import importlib
            ev = importlib.import_module("full_scale.evaluate")
            if not hasattr(ev, "evaluate_epoch"):
                raise UserError("--eval-every-epoch: full_scale.evaluate.evaluate_epoch is not available")
            if getattr(args, "retain_log", None) is None:
                raise UserError("--eval-every-epoch needs --retain-log (the retain model's TOFU-format eval log)")
    data_dir = D.resolve_data_dir(cfg.data_dir)
    if command == "finetune":
        if cfg.preset == "mini":
            rows, extra = D.mini_finetune_corpus(cfg.split, data_dir), {}
        else:
            if cfg.split != "full" and not cfg.split.startswith("retain"):
                raise UserError(f"--split must be full or retainYY, got {cfg.split!r}")
            rows, extra = D.load_split(cfg.split, data_dir), {}
        rows_by_role = {"train": rows, **extra}
    else:
        forget, retain = D.forget_retain(cfg.forget, cfg.retain, cfg.preset, data_dir)
        rows_by_role = {"forget": forget, "retain": retain, "idk": D.load_split("idontknow", data_dir)}
    out = Path(cfg.out)
    if (out / "config.json").exists() and not args.resume:
        raise UserError(f"{out} already holds a run: pass --resume or choose a new --out")
    if args.resume and (out / "config.json").exists():
        old = json.loads((out / "config.json").read_text())
        new = json.loads(json.dumps(dataclasses.asdict(cfg)))
        diff = sorted(k for k in new if old.get(k) != new[k])
        if diff:
            raise UserError(f"--resume: config differs from the saved run in {', '.join(diff)}")
    return cfg, objective, data_dir, rows_by_role


def run(command: str, args) -> int:
    cfg, objective, data_dir, rows = _setup(command, args)
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    acc = Accelerator(cpu=args.cpu or not torch.cuda.is_available(), gradient_accumulation_steps=cfg.grad_accum)
    world, rank = acc.num_processes, acc.process_index
    dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    model, tokenizer, fmt = load_model(cfg.model, device=acc.device, dtype=dtype, data_dir=data_dir, seed=cfg.seed)
    fmt = cfg.prompt_format or fmt
    pad_id = tokenizer.pad_token_id
    enc = lambda rs, key="answer": D.encode_rows(tokenizer, rs, fmt, cfg.max_length, key)  # noqa: E731

    ref_model = None
    if command == "finetune":
        task = FinetuneTask(cfg, enc(rows["train"]))
        retain_rows = rows["train"]
    else:
        forget_rows, retain_rows = rows["forget"], rows["retain"]
        idk_idx = D.pair_idk(len(forget_rows), len(rows["idk"]), cfg.seed)
        idk = [D.encode_qa(tokenizer, r["question"], rows["idk"][j], fmt, cfg.max_length)
               for r, j in zip(forget_rows, idk_idx)]
        if objective.needs_ref_logits or (cfg.ref_mode == "model" and objective.uses_reference):
            import copy
            ref_model = copy.deepcopy(model).requires_grad_(False).eval()
        task = UnlearnTask(cfg, objective, enc(forget_rows), idk, enc(retain_rows), {}, ref_model)

    # ---- sizes and schedule
    per_step = cfg.batch_size * cfg.grad_accum * world
    steps_per_epoch = math.ceil(task.n / per_step)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = max(1, round(cfg.warmup_epochs * steps_per_epoch)) if cfg.warmup_epochs > 0 else 0
    params0 = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total_steps))

    out = Path(cfg.out)
    start_epoch, log_rows, state = 0, [], {}
    ckpts = _checkpoints(out) if args.resume else []
    if ckpts:
        ep, path = ckpts[-1]
        from safetensors.torch import load_file
        sd = {}
        for f in sorted(path.glob("*.safetensors")):
            sd.update(load_file(str(f), device=str(acc.device)))
        missing, unexpected = model.load_state_dict(sd, strict=False)
        tied = {k for k in missing if "lm_head" in k} if getattr(model.config, "tie_word_embeddings", False) else set()
        if unexpected or set(missing) - tied:
            raise UserError(f"--resume: checkpoint {path} does not match the model "
                            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
        st = torch.load(path / "trainer_state.pt", weights_only=True, map_location="cpu")
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng"]["torch"])
        state = json.loads((path / "state.json").read_text())
        start_epoch = ep
        if (out / "train_log.csv").is_file():
            import pandas as pd
            df = pd.read_csv(out / "train_log.csv")
            log_rows = df[df["step"] <= state["step"]].to_dict("records")
        if acc.is_main_process:
            print(f"[{command}] resuming from {path} (epoch {ep}, step {state['step']})")

    model, opt = acc.prepare(model, opt)  # AcceleratedOptimizer steps only at accumulation boundaries
    if ref_model is not None:
        ref_model = acc.prepare_model(ref_model, evaluation_mode=True)
    task.ref_model = ref_model

    # ---- reference cache (once, at θ_0; reloaded on resume)
    if command == "unlearn":
        cache_path = out / "ref_cache.safetensors"
        if ckpts and cache_path.is_file():
            from safetensors.torch import load_file
            task.ref_cache = load_file(str(cache_path))
        elif cfg.ref_mode == "cached" and objective.needs & {"logp_ref", "idk_logp_ref"}:
            if ckpts:
                raise UserError(f"--resume: {cache_path} is missing")
            t0 = time.time()
            task.ref_cache = compute_reference_cache(model, task, pad_id, cfg.batch_size)
            state["ref_cache_seconds"] = time.time() - t0

    # ---- run info (printed and saved)
    info = {"command": command, "world_size": world, "per_device_batch": cfg.batch_size,
            "grad_accum": cfg.grad_accum, "effective_batch": per_step, "examples": task.n,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "warmup_steps": warmup,
            "prompt_format": fmt, "distributed_type": str(acc.distributed_type),
            "n_parameters": sum(p.numel() for p in params0),
            "method": cfg.method, "objective_needs": sorted(objective.needs) if objective else ["retain_logp"],
            "reference_model_loaded": ref_model is not None}
    if acc.is_main_process:
        print(f"[{command}] effective batch = {cfg.batch_size} per device x {cfg.grad_accum} accumulation x "
              f"{world} processes = {per_step} examples/step; {task.n} examples, {steps_per_epoch} steps/epoch, "
              f"{total_steps} steps, warm-up {warmup}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", cfg)
        if command == "unlearn" and task.ref_cache and not (out / "ref_cache.safetensors").is_file():
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in task.ref_cache.items()}, str(out / "ref_cache.safetensors"))

    # ---- collapse detector (unlearning only): baseline retain NLL on the monitored retain questions
    detect = command == "unlearn"
    monitor_q = [r["question"] for r in retain_rows[: cfg.collapse_questions]]
    monitor = task.retain[:32] if detect else task.examples[:1]  # NLL baseline: the first 32 retain QA
    if "retain_nll0" not in state:
        with torch.no_grad():
            b = {k: v.to(acc.device) for k, v in D.pad_batch(monitor, pad_id).items()}
            lp, n = sequence_logprobs(model, **b)
            state["retain_nll0"] = float((-lp / n).mean())
    greedy_path = out / "greedy_samples.json"
    greedy_log = json.loads(greedy_path.read_text()) if ckpts and greedy_path.is_file() else {}
    if detect and monitor_q and "degenerate_frac0" not in state:  # the starting model's own baseline
        answers = greedy_answers(model, tokenizer, monitor_q, fmt)
        state["degenerate_frac0"] = sum(is_degenerate(a) for a in answers) / len(answers)
        greedy_log["0"] = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]

    # ---- the loop
    step = int(state.get("step", 0))
    # collapse = retain NLL > k x initial (per step) or the last greedy check degenerate (per epoch):
    # more than half the answers degenerate and more than at the start
    t_start, tokens_total, stop_reason = time.time(), 0, None
    greedy_bad, collapsed = bool(state.get("greedy_bad")), False
    ever = bool(state.get("ever_collapsed"))
    bar = tqdm(total=total_steps, initial=step, disable=args.no_progress or not acc.is_main_process,
               desc=command, dynamic_ncols=True)
    stats_keys = task.stat_names
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        for step_ids in epoch_steps(task.n, per_step, cfg.seed, epoch):
            if args.max_steps is not None and step >= args.max_steps:
                stop_reason = "max_steps"
                break
            t0 = time.time()
            sums = {k: torch.zeros((), dtype=torch.float64) for k in stats_keys}
            n_real, tokens = 0, 0
            for part in micro_parts(step_ids, world, cfg.grad_accum, rank):
                ids, weight_n = (part, len(part)) if part else (step_ids[:1], 0)  # empty part: weight 0
                with acc.accumulate(model):
                    loss, st, tok = task.micro(model, ids, epoch, pad_id)
                    if not torch.isfinite(loss):
                        raise NonFiniteLoss(f"{command}: loss became non-finite at step {step} (epoch {epoch}); "
                                            f"lower --lr (now {cfg.lr:g})")
                    acc.backward(loss * (weight_n * world * cfg.grad_accum / len(step_ids)))
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                if weight_n:
                    n_real += weight_n
                    tokens += tok
                    for k, v in st.items():
                        sums[k] += v.double().cpu()
            lr_used = sched.get_last_lr()[0]
            sched.step()
            step += 1
            vec = torch.tensor([*(sums[k] for k in stats_keys), n_real, tokens], dtype=torch.float64, device=acc.device)
            if world > 1:
                vec = acc.reduce(vec, reduction="sum")
            vec = vec.cpu()
            N = float(vec[-2])
            row = {"step": step, "epoch": epoch + 1, "lr": lr_used}
            row.update({k: float(vec[i]) / N for i, k in enumerate(stats_keys)})
            if command == "unlearn" and "logp_ref" not in objective.needs and "npo_weight" in row:
                row["npo_weight"] = float("nan")
            dist = _param_distance([p for p in model.parameters() if p.requires_grad], params0)
            if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
                dist = acc.reduce(dist.to(acc.device), reduction="sum").cpu()
            row["param_dist"] = float(dist) ** 0.5
            row["tokens"] = int(vec[-1])
            tokens_total += int(vec[-1])
            if detect:
                row["collapse_nll"] = int(row["retain_nll"] > cfg.collapse_k * state["retain_nll0"])
                row["degenerate_frac"] = float("nan")
                collapsed = bool(row["collapse_nll"]) or greedy_bad
                row["collapse"] = int(collapsed)
                ever = ever or collapsed
            row["step_seconds"] = time.time() - t0
            log_rows.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            if acc.is_main_process:
                write_csv(out / "train_log.csv", log_rows)
            if collapsed and cfg.stop_on_collapse:
                stop_reason = "collapse"
                break
        if stop_reason is not None:
            break
        # ---- end of epoch: greedy degeneration check, eval hook, checkpoint
        model.eval()
        if detect and monitor_q:
            answers = greedy_answers(model, tokenizer, monitor_q, fmt)
            frac = sum(is_degenerate(a) for a in answers) / len(answers)
            greedy_log[str(epoch + 1)] = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
            log_rows[-1]["degenerate_frac"] = frac
            greedy_bad = frac > max(0.5, state.get("degenerate_frac0", 0.0))
            collapsed = bool(log_rows[-1]["collapse_nll"]) or greedy_bad
            log_rows[-1]["collapse"] = int(collapsed)
            ever = ever or collapsed
            if acc.is_main_process:
                write_csv(out / "train_log.csv", log_rows)
                write_json(greedy_path, greedy_log)
        if getattr(args, "eval_every_epoch", False):
            if acc.is_main_process:
                from .evaluate import evaluate_epoch
                evaluate_epoch(acc.unwrap_model(model), tokenizer, fmt, out, epoch + 1, args)
            acc.wait_for_everyone()
        state.update(step=step, epoch=epoch + 1, greedy_bad=greedy_bad, ever_collapsed=ever)
        last = epoch + 1 == cfg.epochs
        stop_now = args.stop_after_epoch is not None and epoch + 1 >= args.stop_after_epoch
        if (epoch + 1) % cfg.save_every == 0 or last or stop_now:
            _save(acc, model, tokenizer, opt, sched, out, epoch + 1, state, fmt, cfg)
        if collapsed and cfg.stop_on_collapse:
            stop_reason = "collapse"
            break
        if stop_now and not last:
            stop_reason = "stop_after_epoch"
            break
    bar.close()

    # ---- final model and run info
    elapsed = time.time() - t_start
    if stop_reason != "stop_after_epoch":
        _save_model(acc, model, tokenizer, out / "model", fmt, cfg, state)
    if acc.is_main_process:
        info.update(steps_done=step, stopped=stop_reason, collapsed=collapsed, ever_collapsed=ever,
                    first_collapse_step=next((r["step"] for r in log_rows if r.get("collapse") == 1), None),
                    degenerate_frac0=state.get("degenerate_frac0"), train_seconds=elapsed,
                    tokens=tokens_total, tokens_per_second=tokens_total / elapsed if elapsed > 0 else None,
                    peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    retain_nll0=state["retain_nll0"], ref_cache_seconds=state.get("ref_cache_seconds"))
        write_csv(out / "train_log.csv", log_rows)
        write_json(out / "run.json", info)
        print(f"[{command}] done: {step} steps in {elapsed:.1f}s"
              + (f" (stopped: {stop_reason})" if stop_reason else "") + f" -> {out}", flush=True)
    acc.wait_for_everyone()
    acc.end_training()
    return 0


def _save_model(acc, model, tokenizer, path: Path, fmt, cfg, state):
    sd = acc.get_state_dict(model)
    save_checkpoint(acc.unwrap_model(model), tokenizer, path,
                    {"prompt_format": fmt, "command": cfg.command, "method": cfg.method, "base_model": cfg.model,
                     "epoch": state.get("epoch"), "step": state.get("step")},
                    state_dict=sd, is_main_process=acc.is_main_process)


def _save(acc, model, tokenizer, opt, sched, out: Path, epoch: int, state, fmt, cfg):
    path = out / "checkpoints" / f"epoch-{epoch}"
    tmp = out / "checkpoints" / f".epoch-{epoch}.tmp"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    _save_model(acc, model, tokenizer, tmp, fmt, cfg, state)
    if acc.is_main_process:
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state()},
                   tmp / "trainer_state.pt")
        write_json(tmp / "state.json", state)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        for _, old in _checkpoints(out)[:-cfg.keep_checkpoints]:
            shutil.rmtree(old)
    acc.wait_for_everyone()


def finetune_main(args) -> int:
    return run("finetune", args)


def unlearn_main(args) -> int:
    return run("unlearn", args)


if __name__ == "__main__":  # torchrun entry: python -m full_scale.train {finetune|unlearn} ...
    from .cli import main as _cli_main
    sys.exit(_cli_main())
