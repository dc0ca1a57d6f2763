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


def check_run_dir(out: Path, config: dict, resume: bool) -> None:
    """A new run needs a fresh directory; a resumed one the same ``config.json``."""
    path = out / "config.json"
    if not path.exists():
        return
    if not resume:
        raise UserError(f"{out} already holds a run: pass --resume or choose a new --out")
    old = json.loads(path.read_text())
    new = json.loads(json.dumps(jsonable(config)))
    diff = sorted(k for k in new if old.get(k) != new[k])
    if diff:
        raise UserError(f"--resume: config differs from the saved run in {', '.join(diff)}")


def restore(out: Path, model, opt, sched, device) -> Restored | None:
    """Load the last checkpoint into ``model``, ``opt``, ``sched`` and the torch RNG (``None`` if none)."""
    found = checkpoints(out)
    if not found:
        return None
    epoch, path = found[-1]
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(str(f), device=str(device)))
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
    log_rows = []
    if (out / "train_log.csv").is_file():
        import pandas as pd

        df = pd.read_csv(out / "train_log.csv")
        log_rows = df[df["step"] <= state["step"]].to_dict("records")
    return Restored(epoch, path, state, log_rows)


def _rng_state() -> dict[str, torch.Tensor]:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def save_model(acc, model, tokenizer, path: Path, meta: dict) -> None:
    """The (gathered) model and tokenizer in ``path``, with ``meta`` in ``npo_sim.json``."""
    sd = acc.get_state_dict(model)
    save_checkpoint(acc.unwrap_model(model), tokenizer, path, meta, state_dict=sd, is_main_process=acc.is_main_process)


def save(acc, model, tokenizer, opt, sched, out: Path, epoch: int, state: dict, meta: dict, keep: int) -> None:
    """Checkpoint ``epoch`` atomically and keep only the last ``keep`` checkpoints."""
    path = out / "checkpoints" / f"epoch-{epoch}"
    tmp = out / "checkpoints" / f".epoch-{epoch}.tmp"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    save_model(acc, model, tokenizer, tmp, meta)
    if acc.is_main_process:
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state()},
                   tmp / "trainer_state.pt")
        write_json(tmp / "state.json", state)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        for _, old in checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
