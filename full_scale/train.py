"""``npo-tofu finetune`` and ``npo-tofu unlearn``: the one training loop, under accelerate.

Read top to bottom: data -> model -> reference -> schedule -> (resume) -> loop -> checkpoints. What a
micro-batch computes, and what happens around the steps, belongs to the task
(:mod:`full_scale.tasks`); checkpoints to :mod:`full_scale.checkpoint`; the settings to the frozen
:class:`~full_scale.config.TrainJob`.

* **Schedule.** ``--optimizer``: ``adamw`` (default; decoupled ``weight_decay``) or ``sgd`` (torch SGD,
  no momentum: θ ← θ − lr_s·(∇L + weight_decay·θ), the plain gradient steps the divergence law is
  stated for). ``--lr-schedule``: ``linear`` (default) is ``warmup_epochs`` of linear warm-up
  (lr·(s+1)/warm) then linear decay to 0 at the end; ``constant`` is the same warm-up, then lr for
  every remaining step, so ``--lr-schedule constant --warmup-epochs 0`` is a constant step size from
  the first step (the warm-up default is 1 epoch under both). The effective batch (per-device ×
  accumulation × processes) is printed and saved in ``run.json``.
* **Batches.** Each epoch's seeded example order is cut into optimizer steps; each step into
  ``processes × accumulation`` near-equal parts (an empty part carries weight 0). Each part's loss is
  weighted by its share of the step, so any split gives the same update.
* **Run dir.** ``config.json`` (the job), ``run.json``, ``train_log.csv`` (one row per optimizer step),
  ``checkpoints/epoch-K/``, and the final model in ``model/`` (written to ``.model.tmp`` and renamed
  into place). Timings (seconds, tokens/s, peak RSS) go to ``timing.json`` only, so the same seed gives
  byte-identical ``config.json``, ``run.json``, ``train_log.csv`` and weights.
* **LoRA** (``--lora-r``): peft adapters on the loaded model (the base, or the fine-tuned target for
  unlearning); only they train, and θ_0 is the same model with its adapters disabled (no copy of the
  weights). Checkpoints and ``model/`` hold the adapter directory (safetensors); ``--merge-lora``
  makes ``model/`` the merged, plain HF model. ``param_dist`` is then the distance of the adapter
  weights from their init. ``--gradient-checkpointing``: non-reentrant activation checkpointing.
* **Sharded runs** (FSDP, DeepSpeed ZeRO-3; ``full_scale/accelerate/fsdp.yaml``,
  ``deepspeed_zero3.yaml``). The frozen θ_0 of the ``*_kl`` (and other reference-model) methods is
  sharded like the policy (FSDP2 ``fully_shard`` per decoder layer, then the whole model; ZeRO-3:
  ``deepspeed.initialize`` without an optimizer) and never registered for checkpointing; with LoRA it
  is the adapter-disabled policy. Checkpoints gain ``accelerate/`` (``save_state``: every rank's
  optimizer shard), restored by ``load_state`` after ``prepare``. ``--merge-lora`` and the per-epoch
  evaluation are refused there (merge or evaluate the saved ``model/`` afterwards).
* **FSDP on CPU** (tests, debugging): accelerate ignores an FSDP plugin on CPU and silently runs DDP
  (``MULTI_CPU``). ``NPO_TOFU_FSDP_CPU=1`` under ``torchrun --nproc_per_node N ... --cpu`` forces
  FSDP2 on gloo (fully sharded, decoder layers as the wrap unit, sharded state dicts); ``run.json``
  records ``distributed_type`` (``DistributedType.FSDP``) and ``world_size``, so a silent DDP
  fallback shows. (FSDP1 is not supported on CPU; on GPUs use the accelerate config.)
* **Interrupts.** Ctrl-C is one line, ``interrupted at step N; continue with --resume`` (exit 130): what
  the run leaves (complete checkpoints, an atomically written log) is valid, and ``--resume`` gives
  the same result as an uninterrupted run.
"""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path

import torch

from npo_sim.runio import NonFiniteLoss, UserError, check_out_dir, write_csv, write_json

from . import checkpoint
from .config import LR_SCHEDULES, Launch, TrainJob
from .models import add_lora, enable_gradient_checkpointing, load_model, resolve_checkpoint
from .tasks import TASKS, Session

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
#: set to 1 (under torchrun, with --cpu or no GPU) to force FSDP2 on gloo CPU processes
FSDP_CPU_ENV = "NPO_TOFU_FSDP_CPU"


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str = "linear"):
    """The lr factor of step ``s``: linear warm-up (s+1)/warm, then ``linear`` decay to 0 at
    ``total_steps`` or ``constant`` 1."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}")

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return f


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over ``params`` at ``cfg.lr`` with ``cfg.weight_decay`` (SGD: no momentum, so its
    coupled L2 decay is the same step as a decoupled one)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.0, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter (an FSDP2 DTensor's shard, a ZeRO-3 partition; the tensor itself otherwise)."""
    if hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3 (untested on CPU: deepspeed needs an accelerator)
        return p.ds_tensor
    return p.to_local() if hasattr(p, "to_local") else p


def _param_distance(params, params0) -> torch.Tensor:
    sq = sum(((p.detach().float() - q.float()) ** 2).sum() for p, q in zip(params, params0))
    return torch.as_tensor(sq)


def _step(acc, task, model, opt, reference, step_ids: list[int], epoch: int, step: int, cfg):
    """Forward and backward every micro-batch of one optimizer step on this rank; returns the step's
    stat sums, its number of (real) examples and tokens. Each part's loss is weighted by its share."""
    world, rank = acc.num_processes, acc.process_index
    sums = {k: torch.zeros((), dtype=torch.float64) for k in task.stat_names}
    n_real, tokens = 0, 0
    for part in micro_parts(step_ids, world, cfg.grad_accum, rank):
        ids, weight_n = (part, len(part)) if part else (step_ids[:1], 0)  # empty part: weight 0
        with acc.accumulate(model):
            loss, st, tok = task.micro(model, reference, ids, epoch)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"{task.job.command}: loss became non-finite at step {step} (epoch {epoch}); "
                                    f"lower --lr (now {cfg.lr:g})")
            acc.backward(loss * (weight_n * world * cfg.grad_accum / len(step_ids)))
            opt.step()
            opt.zero_grad(set_to_none=True)
        if weight_n:
            n_real += weight_n
            tokens += tok
            for k, v in st.items():
                sums[k] += v.double().cpu()
    return sums, n_real, tokens


def _log_row(acc, stat_names, sums, n_real: int, tokens: int, model, params0) -> dict:
    """The means of one step over all processes (example-weighted), ‖θ − θ_0‖ and the token count."""
    from accelerate.utils import DistributedType

    vec = torch.tensor([*(sums[k] for k in stat_names), n_real, tokens], dtype=torch.float64, device=acc.device)
    if acc.num_processes > 1:
        vec = acc.reduce(vec, reduction="sum")
    vec = vec.cpu()
    N = float(vec[-2])
    row = {k: float(vec[i]) / N for i, k in enumerate(stat_names)}
    dist = _param_distance([_local(p) for p in model.parameters() if p.requires_grad], params0)
    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        dist = acc.reduce(dist.to(acc.device), reduction="sum").cpu()
    row["param_dist"] = float(dist) ** 0.5
    row["tokens"] = int(vec[-1])
    return row


def _base_name(model: str) -> str:
    """What an adapter directory records as its base: a local checkpoint as an absolute path (a run directory as
    its ``model/``), anything else (an HF id, tiny-llama) as given."""
    p = Path(resolve_checkpoint(model))
    return str(p.resolve()) if p.exists() else model


def is_sharded(acc) -> bool:
    """Whether parameters and optimizer state are sharded across the processes (FSDP, DeepSpeed)."""
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def make_accelerator(launch: Launch, grad_accum: int):
    """The accelerator; with ``NPO_TOFU_FSDP_CPU=1`` on CPU, FSDP2 forced onto the gloo processes (accelerate
    itself would silently fall back to DDP there)."""
    import os

    from accelerate import Accelerator

    cpu = launch.cpu or not torch.cuda.is_available()
    force = os.environ.get(FSDP_CPU_ENV, "").strip() not in ("", "0")
    if not force:
        return Accelerator(cpu=cpu, gradient_accumulation_steps=grad_accum)
    if not cpu:
        raise UserError(f"{FSDP_CPU_ENV}=1 forces FSDP on CPU processes: pass --cpu, or on GPUs launch with "
                        "--config_file full_scale/accelerate/fsdp.yaml instead")
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            reshard_after_forward=True, state_dict_type="SHARDED_STATE_DICT",
                                            cpu_ram_efficient_loading=False)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum, fsdp_plugin=plugin)
    # AcceleratorState re-reads PartialState on each call, so both are switched
    PartialState().distributed_type = DistributedType.FSDP
    acc.state.distributed_type = DistributedType.FSDP
    acc.state.fsdp_plugin = plugin
    return acc


def run(job: TrainJob, launch: Launch) -> int:
    cfg, command, out = job.run, job.command, Path(job.run.out)
    Task = TASKS[type(job.task)]
    # everything that can fail on bad input, before anything is written
    check_out_dir(out)
    checkpoint.check_run_dir(out, job.to_json(), launch.resume)
    rows = Task.load(job)
    if launch.threads:
        torch.set_num_threads(launch.threads)
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    # ---- model, data, and the reference copy of θ_0 (taken before any resumed weights are loaded)
    acc = make_accelerator(launch, cfg.grad_accum)
    world, sharded = acc.num_processes, is_sharded(acc)
    if sharded and cfg.lora is not None and cfg.merge_lora:
        raise UserError(f"--merge-lora is not supported under {acc.distributed_type}: the adapters are sharded; "
                        "save them (drop --merge-lora) and load the adapter directory, which merges it")
    if sharded and job.eval is not None:
        raise UserError(f"the per-epoch evaluation runs on one process and is not supported under "
                        f"{acc.distributed_type}; evaluate the saved model/ afterwards")
    model, tokenizer, fmt = load_model(cfg.model, device=acc.device, dtype=DTYPES[cfg.dtype], data_dir=cfg.data_dir,
                                       seed=cfg.seed, allow_pickle=launch.allow_pickle_weights)
    fmt = cfg.prompt_format or fmt
    task = Task(job, rows, tokenizer, fmt)
    frozen = task.source.frozen_copy(model)  # never with LoRA: θ_0 is the adapter-disabled model
    if launch.gradient_checkpointing:
        enable_gradient_checkpointing(model, lora=cfg.lora is not None)
    if cfg.lora is not None:  # bad --lora-targets fail here, before anything is written
        model = add_lora(model, cfg.lora, base=_base_name(cfg.model), seed=cfg.seed)

    # ---- sizes and schedule
    per_step = cfg.batch_size * cfg.grad_accum * world
    steps_per_epoch = math.ceil(task.n / per_step)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = max(1, round(cfg.warmup_epochs * steps_per_epoch)) if cfg.warmup_epochs > 0 else 0
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable, n_total = sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())
    # θ_0 of param_dist, taken before resumed weights load (sharded runs: this rank's shards, after prepare)
    params0 = None if sharded else [p.detach().clone() for p in trainable]
    opt = make_optimizer(trainable, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total_steps, cfg.lr_schedule))

    # ---- resume, prepare, the reference (built once)
    if acc.distributed_type.name == "DEEPSPEED":  # no dataloader is prepared, so accelerate cannot fill in "auto"
        ds_config = acc.state.deepspeed_plugin.deepspeed_config
        if ds_config.get("train_micro_batch_size_per_gpu") in (None, "auto"):
            ds_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    # (sharded runs: the schedule, RNG and state here; weights and every rank's optimizer shard after prepare)
    restored = checkpoint.restore(out, model, opt, sched, acc.device, sharded=sharded) if launch.resume else None
    state = dict(restored.state) if restored else {}
    if restored and acc.is_main_process:
        print(f"[{command}] resuming from {restored.path} (epoch {restored.epoch}, step {state['step']})")
    model, opt = acc.prepare(model, opt)  # AcceleratedOptimizer steps only at accumulation boundaries
    if sharded:
        params0 = [_local(p).detach().clone() for p in model.parameters() if p.requires_grad]
        if restored:
            checkpoint.restore_sharded(acc, opt, restored)
    reference = task.reference(acc, model, frozen, out, state, resumed=restored is not None)

    # ---- run info (printed and saved)
    info = {"command": command, "world_size": world, "per_device_batch": cfg.batch_size,
            "grad_accum": cfg.grad_accum, "effective_batch": per_step, "examples": task.n,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "warmup_steps": warmup,
            "prompt_format": fmt, "dialect": cfg.dialect, "distributed_type": str(acc.distributed_type),
            "n_parameters": n_trainable, **task.info()}
    if sharded:  # (absent otherwise: run.json as before)
        info["reference_sharded"] = reference.sharded
    if cfg.lora is not None or launch.gradient_checkpointing:  # (absent otherwise: run.json as before)
        info.update(lora=cfg.lora, merge_lora=cfg.merge_lora, gradient_checkpointing=launch.gradient_checkpointing,
                    n_parameters_total=n_total)
    if acc.is_main_process:
        print(f"[{command}] effective batch = {cfg.batch_size} per device x {cfg.grad_accum} accumulation x "
              f"{world} processes = {per_step} examples/step; {task.n} examples, {steps_per_epoch} steps/epoch, "
              f"{total_steps} steps, warm-up {warmup}; {cfg.optimizer}, {cfg.lr_schedule} lr {cfg.lr:g}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", job.to_json())
        reference.save(out)
    session = Session(acc, model, tokenizer, fmt, out, state, list(restored.log_rows) if restored else [],
                      resumed=restored is not None)
    task.start(session)

    def meta(merged: bool = False) -> dict:  # provenance saved with every model (npo_sim.json)
        m = {"prompt_format": fmt, "command": command, "method": info["method"], "base_model": cfg.model,
             "epoch": state.get("epoch"), "step": state.get("step")}
        if cfg.lora is not None:  # an adapter dir's tiny-llama base is rebuilt from this seed
            m.update(lora=cfg.lora, lora_merged=merged, base_seed=cfg.seed)
        return m

    # ---- the loop (Ctrl-C: one line naming the step; the run dir stays valid and resumable)
    step = int(state.get("step", 0))
    t_start, tokens_total, stop_reason, collapsed = time.time(), 0, None, False
    step_seconds: list[float] = []
    bar = tqdm(total=total_steps, initial=step, disable=not launch.progress or not acc.is_main_process,
               desc=command, dynamic_ncols=True)
    at = step  # the step in progress, for the interrupt message
    try:
        for epoch in range(restored.epoch if restored else 0, cfg.epochs):
            model.train()
            for step_ids in epoch_steps(task.n, per_step, cfg.seed, epoch):
                if launch.max_steps is not None and step >= launch.max_steps:
                    stop_reason = "max_steps"
                    break
                at = step + 1
                t0 = time.time()
                sums, n_real, tokens = _step(acc, task, model, opt, reference, step_ids, epoch, step, cfg)
                lr_used = sched.get_last_lr()[0]
                sched.step()
                step += 1
                row = {"step": step, "epoch": epoch + 1, "lr": lr_used,
                       **_log_row(acc, task.stat_names, sums, n_real, tokens, model, params0)}
                tokens_total += row["tokens"]
                collapsed = task.after_step(session, row)
                step_seconds.append(time.time() - t0)  # timings live in timing.json, not in the results
                session.log_rows.append(row)
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.3f}")
                session.write_log()
                at = step
                if collapsed and cfg.stop_on_collapse:
                    stop_reason = "collapse"
                    break
            if stop_reason is not None:
                break
            # ---- end of epoch: the task's checks, then the checkpoint
            model.eval()
            collapsed = task.end_epoch(session, epoch + 1)
            state.update(step=step, epoch=epoch + 1)
            last = epoch + 1 == cfg.epochs
            stop_now = launch.stop_after_epoch is not None and epoch + 1 >= launch.stop_after_epoch
            if (epoch + 1) % cfg.save_every == 0 or last or stop_now:
                checkpoint.save(acc, model, tokenizer, opt, sched, out, epoch + 1, state, meta(), cfg.keep_checkpoints)
            if collapsed and cfg.stop_on_collapse:
                stop_reason = "collapse"
                break
            if stop_now and not last:
                stop_reason = "stop_after_epoch"
                break
        bar.close()

        # ---- final model (written to a temporary sibling and renamed into place)
        elapsed = time.time() - t_start
        if stop_reason != "stop_after_epoch":
            if cfg.lora is not None and cfg.merge_lora:  # a plain HF model (the run is over: merging in place is fine)
                checkpoint.save_model(acc, acc.unwrap_model(model).merge_and_unload(), tokenizer, out / "model",
                                      meta(merged=True))
            else:
                checkpoint.save_model(acc, model, tokenizer, out / "model", meta())
    except KeyboardInterrupt:
        bar.close()
        raise KeyboardInterrupt(f"interrupted at step {at}; continue with --resume") from None

    # ---- run info (deterministic: the same seed gives the same run.json) and timing.json
    if acc.is_main_process:
        info.update(steps_done=step, stopped=stop_reason, collapsed=collapsed,
                    ever_collapsed=bool(state.get("ever_collapsed")),
                    first_collapse_step=next((r["step"] for r in session.log_rows if r.get("collapse") == 1), None),
                    degenerate_frac0=state.get("degenerate_frac0"), retain_nll0=state["retain_nll0"])
        timing = {"train_seconds": elapsed, "tokens": tokens_total,
                  "tokens_per_second": tokens_total / elapsed if elapsed > 0 else None,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "ref_cache_seconds": state.get("ref_cache_seconds"), "step_seconds": step_seconds}
        write_csv(out / "train_log.csv", session.log_rows)
        write_json(out / "timing.json", timing)
        write_json(out / "run.json", info)
        print(f"[{command}] done: {step} steps in {elapsed:.1f}s"
              + (f" (stopped: {stop_reason})" if stop_reason else "") + f" -> {out}", flush=True)
    acc.wait_for_everyone()
    acc.end_training()
    return 0
