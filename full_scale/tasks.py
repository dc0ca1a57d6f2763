"""The two training tasks: what one micro-batch computes, each task's setup and its per-step/epoch hooks.

:class:`FinetuneTask` minimises the NLL of a corpus. :class:`UnlearnTask` computes exactly
``objective.needs`` per micro-batch (:mod:`npo_sim.losses` holds every loss): the forget
log-likelihood and its length, IDK-answer log-likelihoods, the retain log-likelihood, or retain logits
for the KL terms. How a sequence log-likelihood is reduced is a registry fact
(``objective.sequence_reduction``): ``"sum"`` for the terms that compare with a reference or
normalise by length (NPO, SimNPO, DPO); ``"token_mean"`` follows ``ga_reduction`` (per-example token
mean by default, or sum), as do fine-tuning and the retain NLL. Every loss is a mean over *examples*,
so batch × accumulation × processes splits are exact.

**Reference.** :class:`ReferenceSource` decides once, from the objective and ``ref_mode``, where π_ref
comes from: forget-side log-likelihoods (``logp_ref``, ``idk_logp_ref``) cached once at θ_0 (saved in
``ref_cache.safetensors``, reloaded on resume), and/or a frozen copy of θ_0 (needed for the retain
logits of the ``*_kl`` methods, or with ``ref_mode="model"``; both modes give the same losses).
With LoRA (``--lora-r``) there is no copy: θ_0 is the same model with its adapters disabled
(``adapter-disabled`` in ``run.json``), for every method. :class:`Reference` is the built object the
micro-batches read.

**Sharded runs.** Under FSDP the frozen copy is sharded like the policy (FSDP2 ``fully_shard`` on each
decoder layer, then on the whole model, over the policy's device mesh; every rank first takes rank 0's
weights) and is not registered with accelerate, so ``save_state`` never writes it. Under DeepSpeed it
is a ``deepspeed.initialize`` engine without an optimizer (ZeRO-3: partitioned; the TRL recipe;
untested here: DeepSpeed needs an accelerator). With LoRA θ_0 is the sharded policy itself, adapters
disabled. ``run.json`` records ``reference_sharded``: ``fully_shard``, ``deepspeed``, ``policy`` or None.

**Retain pass.** The retain batch is forwarded only when the objective reads a retain input (or
``--stop-on-collapse`` needs the per-step retain NLL). Otherwise ``retain_nll`` is NaN in
``train_log.csv`` and the collapse detector uses ``retain_nll_monitor``, the mean NLL of the
:data:`NLL_MONITOR` retain examples after every epoch (the set ``retain_nll0`` is measured on).

**Hooks** (called by :func:`full_scale.train.run`): ``start`` before the first step, ``after_step``
on each logged row, ``end_epoch`` after each epoch. Unlearning uses them for the collapse detector
(retain NLL > k × its initial value, or most greedy answers to a few retain questions degenerate) and
the optional per-epoch evaluation (``eval_curve.csv``).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from npo_sim.losses import nll, npo_weight
from npo_sim.runio import UserError, write_bytes, write_csv, write_json

from . import data as D
from .config import FinetuneSpec, TrainJob, UnlearnSpec
from .dialects import get_dialect
from .generate import greedy_ids, is_degenerate
from .logprobs import (
    forward,
    forward_logits,
    logprobs_from_logits,
    sequence_logprobs,
    shifted,
    token_logits,
    token_logprobs_from_logits,
)

REF_CACHE = "ref_cache.safetensors"
GREEDY_LOG = "greedy_samples.json"
#: reference inputs cacheable at θ_0: per-example log-likelihoods, and the forget set's per-token
#: log-probs (``ref_token_logp``, stored right-padded ``(N, L_max − 1)``: a right-padded batch keeps each
#: example's positions, so a batch reads its first ``T − 1`` columns)
REF_KEYS = ("logp_ref", "idk_logp_ref", "ref_token_logp")
#: RMU steers the output of decoder layer ``round(7/32 · n_layers)`` (0-based): layer 7 of a 32-layer
#: 7B model, as WMDP (Li et al., 2024) and open-unlearning's ``configs/trainer/RMU.yaml`` (``model.layers.7``)
RMU_LAYER_FRACTION = 7 / 32
NLL_MONITOR = 32    #: retain examples whose NLL the collapse detector compares with its initial value
GREEDY_TOKENS = 32  #: answer length of the collapse detector's greedy check
#: the objective inputs that need a forward pass on the retain batch
RETAIN_INPUTS = frozenset({"retain_logp", "retain_logits", "retain_hidden"})


@contextmanager
def adapters_disabled(model):
    """θ_0 of a LoRA (peft) model: its adapters disabled, in eval mode (as a frozen copy would be), restored after."""
    was_training = model.training
    model.eval()
    peft = model if hasattr(model, "disable_adapter") else model.module  # FSDP1/DeepSpeed wrap the peft model
    try:
        with peft.disable_adapter():
            yield model
    finally:
        model.train(was_training)


def reduce_logp(lp_sum, count, how: str):
    """Summed answer log-likelihood -> ``how``: ``"sum"``, the per-example token ``"mean"``, or ``"pooled"``:
    ``lp_i·B/Σ_j n_j``, whose mean over the B examples is the token mean pooled over the micro-batch (HF's
    ``outputs.loss``; open-unlearning's GA/NLL). Pooled weighs long answers more and depends on how a
    batch is split, so batch × accumulation invariance does not hold for it (that is the convention)."""
    if how == "mean":
        return lp_sum / count.clamp_min(1)
    if how == "pooled":
        return lp_sum * len(count) / count.sum().clamp_min(1)
    return lp_sum


def _device(model):
    return next(model.parameters()).device


def rmu_layer(model) -> int:
    """The decoder layer RMU steers (0-based), :data:`RMU_LAYER_FRACTION` of the depth."""
    return int(round(RMU_LAYER_FRACTION * model.config.num_hidden_layers))


def rmu_control(d: int, coeff: float, seed: int) -> torch.Tensor:
    """RMU's control vector ``c·u/‖u‖`` with ``u ~ U[0, 1)^d`` drawn from ``seed`` (WMDP's recipe), ``(d,)``."""
    u = torch.rand(d, generator=torch.Generator().manual_seed(seed))
    return coeff * u / u.norm()


def _on(dev, batch: dict) -> dict:
    return {k: v.to(dev) for k, v in batch.items()}


@torch.no_grad()
def mean_nll(model, examples, pad_id: int) -> float:
    """Mean per-token answer NLL of ``examples`` (one padded batch)."""
    b = _on(_device(model), D.pad_batch(examples, pad_id))
    lp, n = sequence_logprobs(model, **b)
    return float((-lp / n).mean())


@dataclass
class Session:
    """What the hooks see of a running job: the prepared model and what the loop keeps across steps."""

    acc: Any
    model: Any
    tokenizer: Any
    fmt: str
    out: Path
    state: dict                                   #: saved with every checkpoint (``state.json``)
    log_rows: list[dict] = field(default_factory=list)
    resumed: bool = False

    def write_log(self) -> None:
        if self.acc.is_main_process:
            write_csv(self.out / "train_log.csv", self.log_rows)


# --------------------------------------------------------------------------------------------------
# the reference source
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReferenceSource:
    """Where π_ref comes from in one run, decided once."""

    cached: tuple[str, ...] = ()  #: reference log-likelihoods computed once at θ_0
    model: bool = False           #: whether θ_0 is run during training (a frozen copy, or the adapter-disabled model)
    adapter: bool = False         #: LoRA: θ_0 is the model with its adapters disabled, never a copy

    @classmethod
    def choose(cls, objective, ref_mode: str, uncacheable: tuple[str, ...] = (),
               adapter: bool = False) -> ReferenceSource:
        """``uncacheable``: reference keys that change during the run (a dialect's per-step IDK answer);
        ``adapter``: the run trains LoRA adapters, so θ_0 is the adapter-disabled model."""
        cached = tuple(k for k in REF_KEYS if k in objective.needs and k not in uncacheable) \
            if ref_mode == "cached" else ()
        keep = (objective.needs_ref_logits or (ref_mode == "model" and objective.uses_reference)
                or bool(set(uncacheable) & objective.needs))
        return cls(cached, keep, adapter)

    @property
    def frozen_model(self) -> bool:
        """Whether a second copy of the weights is loaded (never with LoRA)."""
        return self.model and not self.adapter

    @property
    def kind(self) -> str | None:
        """What ``run.json`` records as ``ref``: adapter-disabled, frozen-copy, cached or None (no reference)."""
        if self.model:
            return "adapter-disabled" if self.adapter else "frozen-copy"
        return "cached" if self.cached else None

    def frozen_copy(self, model):
        """A frozen copy of θ_0 when this source needs one (take it before any weights are resumed)."""
        return copy.deepcopy(model).requires_grad_(False).eval() if self.frozen_model else None


@dataclass(frozen=True)
class Reference:
    """π_ref as the micro-batches read it: cached per-example values first, else the frozen model (or,
    with ``adapter``, the peft ``model`` with its adapters disabled)."""

    logps: Mapping[str, torch.Tensor] = field(default_factory=dict)
    model: Any = None
    adapter: bool = False
    sharded: str | None = None  #: how θ_0 is sharded across processes (``run.json``'s ``reference_sharded``)

    @contextmanager
    def _theta0(self):
        with torch.no_grad(), (adapters_disabled(self.model) if self.adapter else nullcontext(self.model)) as m:
            yield m

    def logp(self, key: str, ids, batch: dict, reduction: str) -> torch.Tensor:
        if key in self.logps:
            return self.logps[key][ids].to(batch["input_ids"].device)
        with self._theta0() as m:
            lp, n = sequence_logprobs(m, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return reduce_logp(lp, n, reduction)

    def token_logp(self, ids, batch: dict) -> torch.Tensor:
        """Per-token reference log-probs ``(B, T-1)`` of the forget batch (cached, or the frozen model)."""
        width = batch["input_ids"].shape[1] - 1
        if "ref_token_logp" in self.logps:
            return self.logps["ref_token_logp"][ids][:, :width].to(batch["input_ids"].device)
        with self._theta0() as m:
            return token_logprobs_from_logits(forward_logits(m, batch["input_ids"], batch["attention_mask"]),
                                              batch["labels"])[0]

    def logits(self, batch: dict) -> torch.Tensor:
        with self._theta0() as m:
            return forward_logits(m, batch["input_ids"], batch["attention_mask"])[:, :-1]

    def hidden(self, batch: dict, layer: int) -> torch.Tensor:
        with self._theta0() as m:
            return forward(m, batch["input_ids"], batch["attention_mask"], layer)[1]

    def save(self, out: Path) -> None:
        """Write the cached values to ``out/ref_cache.safetensors`` (once; a resumed run reloads them)."""
        if self.logps and not (out / REF_CACHE).is_file():
            from safetensors.torch import save

            # atomic, with the usual permissions (safetensors' own save_file leaves 0600)
            write_bytes(out / REF_CACHE, save({k: v.contiguous() for k, v in self.logps.items()}))


def _sharded_type(acc) -> str | None:
    from accelerate.utils import DistributedType

    t = acc.distributed_type
    return {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DEEPSPEED"}.get(t)


def fully_shard_reference(acc, frozen):
    """The frozen θ_0 sharded like an FSDP policy: rank 0's weights on every rank, then FSDP2 ``fully_shard`` on
    each decoder layer (the policy's wrap classes, else the model's ``_no_split_modules``) and on the whole model,
    over the accelerator's device mesh. Not registered with accelerate (``save_state`` does not write it)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if any(t.is_meta for t in frozen.parameters()):  # a rank that loaded on meta (cpu-RAM-efficient loading)
            frozen.to_empty(device=acc.device)
        with torch.no_grad():
            for t in (*frozen.parameters(), *frozen.buffers()):
                dist.broadcast(t.data, src=0)
    plugin = acc.state.fsdp_plugin
    names = set(getattr(plugin, "transformer_cls_names_to_wrap", None)
                or getattr(frozen, "_no_split_modules", None) or ())
    kw: dict[str, Any] = {"reshard_after_forward": True}
    if acc.torch_device_mesh is not None:
        kw["mesh"] = acc.torch_device_mesh
    if isinstance(getattr(plugin, "mixed_precision_policy", None), MixedPrecisionPolicy):
        kw["mp_policy"] = plugin.mixed_precision_policy
    for m in list(frozen.modules())[1:]:
        if type(m).__name__ in names:
            fully_shard(m, **kw)
    fully_shard(frozen, **kw)
    return frozen.requires_grad_(False).eval()


def deepspeed_reference(acc, frozen):
    """The frozen θ_0 as a DeepSpeed engine without an optimizer (TRL's ``prepare_deepspeed``): partitioned under
    ZeRO-3, whole (stage 0) under ZeRO-1/2, which shard only optimizer state. UNTESTED: DeepSpeed does not run
    on CPU, and it is not installed in the test environment."""
    import deepspeed

    config = copy.deepcopy(acc.state.deepspeed_plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        h = getattr(frozen.config, "hidden_size", None)
        if h:
            zero.update(reduce_bucket_size=h * h, stage3_param_persistence_threshold=10 * h,
                        stage3_prefetch_bucket_size=int(0.9 * h * h))
    else:
        zero["stage"] = 0
    engine, *_ = deepspeed.initialize(model=frozen, config=config)
    return engine.eval()


# --------------------------------------------------------------------------------------------------
# fine-tuning
# --------------------------------------------------------------------------------------------------
class FinetuneTask:
    """Minimise the retain-style NLL (``npo_sim.losses.nll``) over the corpus."""

    stat_names = ("loss", "nll_per_token", "logp_sum")

    @staticmethod
    def load(job: TrainJob) -> dict:
        """The corpus rows (bad input fails here, before anything is written)."""
        split, data_dir = job.task.split, D.resolve_data_dir(job.run.data_dir)
        if job.run.preset == "mini":
            return {"train": D.mini_finetune_corpus(split, data_dir)}
        if split != "full" and not split.startswith("retain"):
            raise UserError(f"split must be full or retainYY, got {split!r}")
        return {"train": D.load_split(split, data_dir)}

    def __init__(self, job: TrainJob, rows: dict, tokenizer, fmt: str):
        self.job, self.reduction, self.pad_id = job, job.run.ga_reduction, tokenizer.pad_token_id
        fmt = get_dialect(job.run.dialect).prompt_format(fmt)
        self.examples = D.encode_rows(tokenizer, rows["train"], fmt, job.run.max_length)
        self.n = len(self.examples)
        self.source = ReferenceSource()

    def info(self) -> dict:
        return {"method": None, "objective_needs": ["retain_logp"], "reference_model_loaded": False, "ref": None}

    def reference(self, acc, model, frozen, out: Path, state: dict, resumed: bool) -> Reference:
        return Reference()

    def micro(self, model, reference: Reference, ids, epoch: int):
        b = _on(_device(model), D.pad_batch([self.examples[i] for i in ids], self.pad_id))
        lp, n = sequence_logprobs(model, b["input_ids"], b["attention_mask"], b["labels"])
        loss = nll(reduce_logp(lp, n, self.reduction))
        stats = {"loss": loss.detach() * len(ids), "nll_per_token": (-lp / n).detach().sum(),
                 "logp_sum": lp.detach().sum()}
        return loss, stats, int(b["attention_mask"].sum())

    def start(self, s: Session) -> None:
        if "retain_nll0" not in s.state:  # reported in run.json; fine-tuning runs no collapse check
            s.state["retain_nll0"] = mean_nll(s.model, self.examples[:1], self.pad_id)

    def after_step(self, s: Session, row: dict) -> bool:
        return False

    def end_epoch(self, s: Session, epoch: int) -> bool:
        return False


# --------------------------------------------------------------------------------------------------
# unlearning
# --------------------------------------------------------------------------------------------------
class UnlearnTask:
    """Forget/retain inputs for ``objective.needs``; reference inputs from :class:`Reference`."""

    stat_names = ("loss", "forget_loss", "retain_loss", "forget_logp", "forget_logp_per_token",
                  "retain_nll", "npo_weight")

    @staticmethod
    def load(job: TrainJob) -> dict:
        """Forget, retain and IDK rows, and the per-epoch evaluation's inputs (bad input fails here)."""
        spec, data_dir = job.task, D.resolve_data_dir(job.run.data_dir)
        forget, retain = D.forget_retain(spec.forget, spec.retain, job.run.preset, data_dir)
        rows = {"forget": forget, "retain": retain, "idk": D.load_split("idontknow", data_dir)}
        if job.eval is not None:
            from .evaluate import prepare_eval

            rows["eval"] = prepare_eval(job.eval)
        return rows

    def __init__(self, job: TrainJob, rows: dict, tokenizer, fmt: str):
        run, spec = job.run, job.task
        self.dialect = get_dialect(run.dialect)
        self.job, self.obj, self.pad_id = job, spec.objective(run.dialect), tokenizer.pad_token_id
        fmt = self.dialect.prompt_format(fmt)
        self.forget = D.encode_rows(tokenizer, rows["forget"], fmt, run.max_length)
        self.retain = D.encode_rows(tokenizer, rows["retain"], fmt, run.max_length)
        self._encode_idk = lambda seed: [D.encode_qa(tokenizer, r["question"], rows["idk"][j], fmt, run.max_length)
                                         for r, j in zip(rows["forget"], D.pair_idk(len(rows["forget"]),
                                                                                     len(rows["idk"]), seed))]
        self.idk = self._encode_idk(run.seed)
        self._idk_epoch: tuple[int, list] | None = None
        self._control: torch.Tensor | None = None   # RMU's control vector
        self.n = len(self.forget)
        self.reduction = "sum" if self.obj.sequence_reduction == "sum" else run.ga_reduction
        # a per-step IDK answer (open-unlearning) has no fixed reference to cache
        uncacheable = ("idk_logp_ref",) if self.dialect.idk_sampling == "per_step" else ()
        self.source = ReferenceSource.choose(self.obj, spec.ref_mode, uncacheable, adapter=run.lora_r is not None)
        # the retain batch is forwarded only when something reads it: the objective, or the per-step collapse stop
        self.step_retain = bool(self.obj.needs & RETAIN_INPUTS) or run.stop_on_collapse
        self.monitor_questions = [r["question"] for r in rows["retain"][:run.collapse_questions]]
        self.eval_inputs = rows.get("eval")
        self.greedy_log: dict[str, list[str]] = {}

    def info(self) -> dict:
        return {"method": self.job.task.method, "objective_needs": sorted(self.obj.needs),
                "reference_model_loaded": self.source.frozen_model, "ref": self.source.kind,
                "retain_pass": "every step" if self.step_retain else "epoch end (retain_nll_monitor)"}

    # ---- the reference, built once after the model is prepared
    def reference(self, acc, model, frozen, out: Path, state: dict, resumed: bool) -> Reference:
        sharded = _sharded_type(acc)
        if self.source.adapter:  # LoRA: θ_0 is the same (unwrapped peft) model with its adapters disabled
            # (sharded: the prepared model itself, whose forward gathers the shards)
            ref_model = (model if sharded else acc.unwrap_model(model)) \
                if self.source.model or self.source.cached else None
            how = "policy" if sharded and ref_model is not None else None
        elif frozen is None:
            ref_model, how = None, None
        elif sharded == "FSDP":
            ref_model, how = fully_shard_reference(acc, frozen), "fully_shard"
        elif sharded == "DEEPSPEED":
            ref_model, how = deepspeed_reference(acc, frozen), "deepspeed"
        else:
            ref_model, how = acc.prepare_model(frozen, evaluation_mode=True), None
        path, logps = out / REF_CACHE, {}
        if resumed and path.is_file():
            from safetensors.torch import load_file

            logps = load_file(str(path))
        elif self.source.cached:
            if resumed:
                raise UserError(f"--resume: {path} is missing")
            t0 = time.time()
            with adapters_disabled(ref_model) if self.source.adapter else nullcontext():
                logps = self._cache(ref_model if self.source.adapter else model, self.job.run.batch_size)
            state["ref_cache_seconds"] = time.time() - t0
        return Reference(logps, ref_model if self.source.model else None, adapter=self.source.adapter,
                         sharded=how if self.source.model else None)

    @torch.no_grad()
    def _cache(self, model, batch_size: int) -> dict[str, torch.Tensor]:
        """``logp_ref``, ``idk_logp_ref`` and ``ref_token_logp`` (as needed) for every forget example, once, at θ_0."""
        out, dev = {}, _device(model)
        for key, exs in (("logp_ref", self.forget), ("idk_logp_ref", self.idk)):
            if key not in self.source.cached:
                continue
            vals = []
            for s in range(0, len(exs), batch_size):
                b = _on(dev, D.pad_batch(exs[s:s + batch_size], self.pad_id))
                lp, n = sequence_logprobs(model, b["input_ids"], b["attention_mask"], b["labels"])
                vals.append(reduce_logp(lp, n, self.reduction).float().cpu())
            out[key] = torch.cat(vals)
        if "ref_token_logp" in self.source.cached:
            width = max(len(e["input_ids"]) for e in self.forget) - 1
            table = torch.zeros(len(self.forget), width, dtype=torch.float32)
            for s in range(0, len(self.forget), batch_size):
                b = _on(dev, D.pad_batch(self.forget[s:s + batch_size], self.pad_id))
                tok = token_logprobs_from_logits(forward_logits(model, b["input_ids"], b["attention_mask"]),
                                                 b["labels"])[0]
                table[s:s + len(tok), :tok.shape[1]] = tok.float().cpu()
            out["ref_token_logp"] = table
        return out

    # ---- one micro-batch
    def micro(self, model, reference: Reference, ids, epoch: int):
        dev, needs, red, pad_id = _device(model), self.obj.needs, self.reduction, self.pad_id
        pairs = D.pair_retain(self.n, len(self.retain), self.job.run.seed, epoch)
        fb = _on(dev, D.pad_batch([self.forget[i] for i in ids], pad_id))
        rb = _on(dev, D.pad_batch([self.retain[pairs[i]] for i in ids], pad_id)) if self.step_retain else None
        x: dict[str, torch.Tensor] = {}
        ib = None
        # forget side: always computed (logged even when the objective does not read it)
        layer = rmu_layer(model) if needs & {"hidden", "retain_hidden"} else None
        with torch.set_grad_enabled(bool(needs & {"logp", "length", "token_logp", "forget_logits", "hidden"})):
            logits, hidden = forward(model, fb["input_ids"], fb["attention_mask"], layer if "hidden" in needs else None)
            lp, n = logprobs_from_logits(logits, fb["labels"])
        x["logp"], x["length"] = reduce_logp(lp, n, red), n.to(lp.dtype)
        x.update(self._token_inputs(logits, hidden, fb, ids, reference, layer))
        if "idk_logp" in needs:
            ib = _on(dev, D.pad_batch([self._idk(epoch)[i] for i in ids], pad_id))
            ilp, icount = sequence_logprobs(model, ib["input_ids"], ib["attention_mask"], ib["labels"])
            x["idk_logp"] = reduce_logp(ilp, icount, red)
        for key, b in (("logp_ref", fb), ("idk_logp_ref", ib)):
            if key in needs:
                x[key] = reference.logp(key, ids, b, red)
        # retain side: forwarded when read (the objective, or the per-step collapse stop); gradients only
        # when the objective reads it
        rlp = rn = None
        if rb is None:
            pass
        elif "retain_logits" in needs:
            rlp, rn, rlogits, rmask = token_logits(model, rb["input_ids"], rb["attention_mask"], rb["labels"])
            if self.dialect.kl_positions == "all":   # open-unlearning: every position, prompt and padding too
                rmask = None
            x.update(retain_logits=rlogits, retain_ref_logits=reference.logits(rb), retain_mask=rmask)
        elif "retain_hidden" in needs:
            rlogits, rhidden = forward(model, rb["input_ids"], rb["attention_mask"], layer)
            rlp, rn = logprobs_from_logits(rlogits, rb["labels"])
            x.update(retain_hidden=rhidden, retain_ref_hidden=reference.hidden(rb, layer),
                     retain_hidden_mask=rb["labels"] != D.IGNORE_INDEX)
        else:
            with torch.set_grad_enabled("retain_logp" in needs):
                rlp, rn = sequence_logprobs(model, rb["input_ids"], rb["attention_mask"], rb["labels"])
        if rlp is not None:
            x["retain_logp"] = reduce_logp(rlp, rn, self.job.run.ga_reduction)
        terms = self.obj(x)
        tokens = int(fb["attention_mask"].sum() + (rb["attention_mask"].sum() if rb is not None else 0))
        return terms.loss, self._stats(terms, lp, n, rlp, rn, x), tokens

    def _idk(self, epoch: int) -> list:
        """The IDK answers of ``epoch``: fixed for the run, or (``idk_sampling="per_step"``) redrawn each epoch,
        i.e. each time an example is drawn (open-unlearning's ``__getitem__``)."""
        if self.dialect.idk_sampling == "fixed":
            return self.idk
        if self._idk_epoch is None or self._idk_epoch[0] != epoch:
            self._idk_epoch = (epoch, self._encode_idk(self.job.run.seed * 1_000 + epoch + 1))
        return self._idk_epoch[1]

    def _token_inputs(self, logits, hidden, fb: dict, ids, reference: Reference, layer) -> dict[str, torch.Tensor]:
        """The per-token, logit-level and activation inputs of the forget batch that the objective reads."""
        needs, x = self.obj.needs, {}
        if needs & {"token_logp", "token_mask"}:
            x["token_logp"], x["token_mask"] = token_logprobs_from_logits(logits, fb["labels"])
        if "ref_token_logp" in needs:
            x["ref_token_logp"] = reference.token_logp(ids, fb)
        if needs & {"forget_logits", "forget_labels"}:
            lg, targets, mask = shifted(logits, fb["labels"])
            x.update(forget_logits=lg.float(), forget_labels=targets.clamp_min(0), token_mask=mask)
        if "forget_ref_logits" in needs:
            x["forget_ref_logits"] = reference.logits(fb).float()
        if "hidden" in needs:
            if self._control is None:   # fixed for the run: drawn once from the seed
                self._control = rmu_control(hidden.shape[-1], float(self.obj.gamma), self.job.run.seed)
            x.update(hidden=hidden.float(), hidden_mask=fb["labels"] != D.IGNORE_INDEX,
                     rmu_control=self._control.to(hidden))
        return x

    def _stats(self, terms, lp, n, rlp, rn, x) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            B = len(lp)
            stats = {"loss": terms.loss.detach() * B, "forget_loss": terms.forget.detach() * B,
                     "retain_loss": terms.retain.detach() * B, "forget_logp": lp.detach().sum(),
                     "forget_logp_per_token": (lp / n).detach().sum()}
            if rlp is not None:
                stats["retain_nll"] = (-rlp / rn).detach().sum()
            if "logp_ref" in x:
                stats["npo_weight"] = npo_weight(reduce_logp(lp, n, "sum").detach(), x["logp_ref"],
                                                 self.obj.beta).sum()
        return stats

    # ---- hooks: collapse detector and per-epoch evaluation
    def _greedy(self, s: Session, key: str) -> float:
        """Answer the monitored retain questions greedily; log them under ``key``; the degenerate fraction."""
        answers = greedy_ids(s.model, s.tokenizer, s.fmt, self.monitor_questions, max_new_tokens=GREEDY_TOKENS)
        answers = [a if s.tokenizer.decode(a, skip_special_tokens=True).strip() else [] for a in answers]
        self.greedy_log[key] = [s.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        return sum(is_degenerate(a) for a in answers) / len(answers)

    def start(self, s: Session) -> None:
        st = s.state
        if "retain_nll0" not in st:
            st["retain_nll0"] = mean_nll(s.model, self.retain[:NLL_MONITOR], self.pad_id)
        path = s.out / GREEDY_LOG
        if s.resumed and path.is_file():
            self.greedy_log = json.loads(path.read_text())
        if self.monitor_questions and "degenerate_frac0" not in st:  # the starting model's own baseline
            st["degenerate_frac0"] = self._greedy(s, "0")

    def after_step(self, s: Session, row: dict) -> bool:
        """Flag the step: retain NLL > k × initial, or the last greedy check degenerate."""
        if "logp_ref" not in self.obj.needs:
            row["npo_weight"] = math.nan
        if not self.step_retain:  # not computed per step: checked after the epoch (end_epoch)
            row["retain_nll"] = math.nan
        row["collapse_nll"] = int(row["retain_nll"] > self.job.run.collapse_k * s.state["retain_nll0"])
        row["degenerate_frac"] = math.nan
        return self._flag(s, row)

    def _flag(self, s: Session, row: dict) -> bool:
        collapsed = bool(row["collapse_nll"]) or bool(s.state.get("greedy_bad"))
        row["collapse"] = int(collapsed)
        s.state["ever_collapsed"] = bool(s.state.get("ever_collapsed")) or collapsed
        return collapsed

    def end_epoch(self, s: Session, epoch: int) -> bool:
        """Greedy degeneration check (more than half the answers, and more than at the start), then
        the per-epoch evaluation. Returns whether the run counts as collapsed now."""
        last = s.log_rows[-1]
        collapsed = bool(last["collapse"])
        if not self.step_retain:  # the retain NLL of the monitor set (retain_nll0's), measured here instead of per step
            nll_now = mean_nll(s.model, self.retain[:NLL_MONITOR], self.pad_id)
            last["retain_nll_monitor"] = nll_now
            last["collapse_nll"] = int(nll_now > self.job.run.collapse_k * s.state["retain_nll0"])
            collapsed = self._flag(s, last)
            s.write_log()
        if self.monitor_questions:
            frac = self._greedy(s, str(epoch))
            last["degenerate_frac"] = frac
            s.state["greedy_bad"] = frac > max(0.5, s.state.get("degenerate_frac0", 0.0))
            collapsed = self._flag(s, last)
            s.write_log()
            if s.acc.is_main_process:
                write_json(s.out / GREEDY_LOG, self.greedy_log)
        if self.eval_inputs is not None and (self.job.eval.epochs == "every" or epoch == self.job.run.epochs):
            if s.acc.is_main_process:
                from .evaluate import evaluate_epoch

                evaluate_epoch(s.acc.unwrap_model(s.model), s.tokenizer, s.fmt, s.out, epoch, self.job.eval,
                               self.eval_inputs)
            s.acc.wait_for_everyone()
        return collapsed


#: the task of each spec type
TASKS = {FinetuneSpec: FinetuneTask, UnlearnSpec: UnlearnTask}
