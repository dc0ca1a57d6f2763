"""Checkpoints and resume of a training run directory (every rank takes part; rank 0 writes).

``checkpoints/epoch-K/`` holds the model and tokenizer (``save_pretrained``), ``trainer_state.pt``
(optimizer, scheduler and RNG state, loaded with ``weights_only=True``) and ``state.json`` (step,
epoch and whatever the task keeps across epochs). A checkpoint is written to ``.epoch-K.tmp`` and
renamed into place, so a run killed at any moment leaves only complete checkpoints; ``--resume``
continues from the last one and gives the same result as an uninterrupted run. In a LoRA run the
model part is the adapter directory (``adapter_config.json``, ``adapter_model.safetensors``): the base
is reloaded from ``--model`` and the adapters from the checkpoint.

**Sharded runs** (FSDP, DeepSpeed): the checkpoint also holds ``accelerate/``, written by every rank with
``Accelerator.save_state`` (the policy's sharded weights and every rank's optimizer shard, per-rank RNG);
``trainer_state.pt`` then holds the scheduler and RNG only. :func:`restore` reads the schedule and
state before ``prepare``; :func:`restore_sharded` loads ``accelerate/`` with ``load_state`` after it. A
checkpoint resumes only under the kind of launch that wrote it (sharded or not). In every case
``trainer_state.pt`` is written last and marks a complete checkpoint (and the directory is renamed
into place only after that).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from npo_sim.runio import UserError, jsonable, write_json

from .models import ADAPTER_CONFIG, is_peft_model, save_checkpoint

#: the subdirectory of a sharded run's checkpoint that ``Accelerator.save_state`` writes (every rank)
ACCELERATE_DIR = "accelerate"


@dataclass(frozen=True)
class Restored:
    """What a resumed run continues from."""

    epoch: int
    path: Path
    state: dict            #: the saved ``state.json``
    log_rows: list[dict]   #: ``train_log.csv`` up to the checkpoint's step


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of every complete checkpoint under ``out``, oldest first."""
    root = out / "checkpoints"
    found = []
    for p in root.glob("epoch-*") if root.is_dir() else []:
        if (p / "trainer_state.pt").is_file() and p.name[6:].isdigit():
            found.append((int(p.name[6:]), p))
    return sorted(found)


#: config.json fields that say where a run lives, not what it computes (a moved run dir still resumes)
LOCATION_FIELDS = ("out",)


def check_run_dir(out: Path, config: dict, resume: bool) -> None:
    """A new run needs a fresh directory; a resumed one an existing run with the same ``config.json``
    (compared without :data:`LOCATION_FIELDS`, so a moved or copied run directory resumes). A field the
    saved ``config.json`` predates counts as its default (:func:`~full_scale.config.saved_defaults`), in
    the ``eval`` record too."""
    from .config import saved_defaults

    path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if not path.exists():
        if resume:
            raise UserError(f"nothing to resume in {out} (no config.json): run without --resume to start")
        return
    if not resume:
        raise UserError(f"{out} already holds a run: pass --resume or choose a new --out")
    try:
        old = json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(old, dict):
        raise UserError(f"{path}: expected a JSON object")
    new = json.loads(json.dumps(jsonable(config)))
    top, ev = (json.loads(json.dumps(jsonable(d))) for d in saved_defaults(str(new.get("command"))))  # as JSON
    old = {**{k: v for k, v in top.items() if k in new}, **old}
    if isinstance(old.get("eval"), dict) and isinstance(new.get("eval"), dict):
        old["eval"] = {**{k: v for k, v in ev.items() if k in new["eval"]}, **old["eval"]}
    keys = (set(new) | set(old)) - set(LOCATION_FIELDS)
    diff = sorted(k for k in keys if old.get(k) != new.get(k))
    if diff:
        raise UserError(f"--resume: config differs from the saved run in {', '.join(diff)}")


def restore(out: Path, model, opt, sched, device, sharded: bool = False) -> Restored | None:
    """Load the last checkpoint into ``model``, ``opt``, ``sched`` and the torch RNG (``None`` if none).

    ``sharded`` (FSDP/DeepSpeed, called before ``prepare``): only ``sched``, the RNG and the state; the
    weights and optimizer follow in :func:`restore_sharded`, after ``prepare``."""
    found = checkpoints(out)
    if not found:
        return None
    epoch, path = found[-1]
    lora, saved_lora = is_peft_model(model), (path / ADAPTER_CONFIG).is_file()
    if lora != saved_lora:
        raise UserError(f"--resume: checkpoint {path} holds {'LoRA adapters' if saved_lora else 'a full model'}, "
                        f"this run trains {'LoRA adapters' if lora else 'every weight'}")
    saved_sharded = (path / ACCELERATE_DIR).is_dir()
    if sharded != saved_sharded:
        kind = "sharded (FSDP/DeepSpeed)" if saved_sharded else "non-sharded"
        raise UserError(f"--resume: checkpoint {path} was written by a {kind} run; resume it under the same kind "
                        f"of launch (this one is {'sharded' if sharded else 'not sharded'})")
    if not sharded:
        _load_weights(path, model, device)
    st = _trainer_state(path / "trainer_state.pt")
    try:
        if not sharded:
            opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng"]["torch"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise UserError(f"--resume: {path / 'trainer_state.pt'} does not match this run ({exc})") from None
    try:
        state = json.loads((path / "state.json").read_text())
    except ValueError as exc:
        raise UserError(f"--resume: {path / 'state.json'}: not valid JSON ({exc})") from None
    log_rows = []
    if (out / "train_log.csv").is_file():
        import pandas as pd

        df = pd.read_csv(out / "train_log.csv")
        log_rows = df[df["step"] <= state["step"]].to_dict("records")
    return Restored(epoch, path, state, log_rows)


def restore_sharded(acc, opt, restored: Restored) -> None:
    """A sharded run's weights, every rank's optimizer shard and per-rank RNG from ``accelerate/`` (after
    ``prepare``; every rank calls it)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP and getattr(acc.state.fsdp_plugin, "fsdp_version", 2) == 1:
        from torch.distributed.checkpoint.state_dict import _init_optim_state

        _init_optim_state(opt.optimizer)  # FSDP1: a fresh optimizer has no state for load_state to fill
    try:
        acc.load_state(str(restored.path / ACCELERATE_DIR))
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"--resume: {restored.path / ACCELERATE_DIR} does not match this run ({msg})") from None


def _load_weights(path: Path, model, device) -> None:
    """The checkpoint's (full) weights, or LoRA adapters, into the unprepared ``model``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(path.glob("*.safetensors")):
        try:
            sd.update(load_file(str(f), device=str(device)))
        except (SafetensorError, OSError) as exc:
            raise UserError(f"--resume: {f}: truncated or corrupt safetensors file ({exc})") from None
    lora = is_peft_model(model)
    if lora:  # the adapters only; the base is the one --model loaded
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, sd)
        missing, unexpected, tied = [k for k in result.missing_keys if "lora_" in k], result.unexpected_keys, set()
    else:
        missing, unexpected = model.load_state_dict(sd, strict=False)
        tied = {k for k in missing if "lm_head" in k} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise UserError(f"--resume: checkpoint {path} does not match the model "
                        f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")


def _trainer_state(file: Path) -> dict:
    """``trainer_state.pt``, loaded with ``weights_only=True``: a file holding anything but plain
    tensors and containers is refused, never unpickled."""
    import pickle

    try:
        st = torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise UserError(f"--resume: {file}: refusing to unpickle it: it holds more than plain tensors "
                        "(a foreign or malicious pickle)") from None
    except (RuntimeError, EOFError, ValueError) as exc:  # truncated / not a torch zip file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
        raise UserError(f"--resume: {file}: truncated or corrupt ({reason})") from None
    if not isinstance(st, dict):
        raise UserError(f"--resume: {file}: not a trainer state")
    return st


def _rng_state() -> dict[str, torch.Tensor]:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def save_model(acc, model, tokenizer, path: Path, meta: dict) -> None:
    """The (gathered) model and tokenizer in ``path``, with ``meta`` in ``npo_sim.json``.

    Written into the temporary sibling ``.NAME.tmp`` and renamed into place, so a run killed while
    saving leaves either no ``path`` or a complete one (weights, tokenizer and ``npo_sim.json``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    _write_model(acc, model, tokenizer, tmp, meta)
    if acc.is_main_process:
        _replace_dir(tmp, path)
    acc.wait_for_everyone()


def _write_model(acc, model, tokenizer, tmp: Path, meta: dict) -> None:
    """The (gathered) model, tokenizer and ``meta`` into a fresh temporary directory ``tmp`` (all ranks call it)."""
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    sd = acc.get_state_dict(model)
    save_checkpoint(acc.unwrap_model(model), tokenizer, tmp, meta, state_dict=sd, is_main_process=acc.is_main_process)


def _replace_dir(tmp: Path, path: Path) -> None:
    """Rename the finished directory ``tmp`` to ``path``, replacing an old ``path``."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def save(acc, model, tokenizer, opt, sched, out: Path, epoch: int, state: dict, meta: dict, keep: int) -> None:
    """Checkpoint ``epoch`` atomically and keep only the last ``keep`` checkpoints."""
    path = out / "checkpoints" / f"epoch-{epoch}"
    tmp = out / "checkpoints" / f".epoch-{epoch}.tmp"
    _write_model(acc, model, tokenizer, tmp, meta)
    sharded = acc.distributed_type.name in ("FSDP", "DEEPSPEED")
    if sharded:  # every rank writes its shards
        acc.save_state(str(tmp / ACCELERATE_DIR))
        acc.wait_for_everyone()
    if acc.is_main_process:
        write_json(tmp / "state.json", state)
        trainer = {"scheduler": sched.state_dict(), "rng": _rng_state()}
        if not sharded:
            trainer["optimizer"] = opt.state_dict()
        torch.save(trainer, tmp / "trainer_state.pt")  # the completeness marker: written last
        _replace_dir(tmp, path)
        for _, old in checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
