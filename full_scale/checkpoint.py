"""Checkpoints and resume of a training run directory (every rank takes part; rank 0 writes).

``checkpoints/epoch-K/`` holds the model and tokenizer (``save_pretrained``), ``trainer_state.pt``
(optimizer, scheduler and RNG state, loaded with ``weights_only=True``) and ``state.json`` (step,
epoch and whatever the task keeps across epochs). A checkpoint is written to ``.epoch-K.tmp`` and
renamed into place, so a run killed at any moment leaves only complete checkpoints; ``--resume``
continues from the last one and gives the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from npo_sim.runio import UserError, jsonable, write_json

from .models import save_checkpoint


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
    (compared without :data:`LOCATION_FIELDS`, so a moved or copied run directory resumes)."""
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
    keys = (set(new) | set(old)) - set(LOCATION_FIELDS)
    diff = sorted(k for k in keys if old.get(k) != new.get(k))
    if diff:
        raise UserError(f"--resume: config differs from the saved run in {', '.join(diff)}")


def restore(out: Path, model, opt, sched, device) -> Restored | None:
    """Load the last checkpoint into ``model``, ``opt``, ``sched`` and the torch RNG (``None`` if none)."""
    found = checkpoints(out)
    if not found:
        return None
    epoch, path = found[-1]
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(path.glob("*.safetensors")):
        try:
            sd.update(load_file(str(f), device=str(device)))
        except (SafetensorError, OSError) as exc:
            raise UserError(f"--resume: {f}: truncated or corrupt safetensors file ({exc})") from None
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {k for k in missing if "lm_head" in k} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise UserError(f"--resume: checkpoint {path} does not match the model "
                        f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
    st = _trainer_state(path / "trainer_state.pt")
    try:
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
    if acc.is_main_process:
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state()},
                   tmp / "trainer_state.pt")
        write_json(tmp / "state.json", state)
        _replace_dir(tmp, path)
        for _, old in checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
