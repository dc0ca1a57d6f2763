"""Run directories: atomic writes, resolved configs next to results, figure copies.

Nothing is ever half-written: every file goes to a temporary name in the same directory first and is
renamed into place, so a crash or a bad-input error leaves either the old file or none.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)
#: the mode results get (what a plain ``open`` would give under this umask; mkstemp and safetensors give 0600)
FILE_MODE = 0o666 & ~_UMASK


class UserError(Exception):
    """Bad input (unknown method, bad hyperparameter, missing data...). CLIs print it on one line and exit 2."""


class NonFiniteLoss(RuntimeError):
    """Raised when the loss or a gradient becomes NaN/inf (a diverged run). CLIs print it on one line and exit 3."""


def check_out_dir(path) -> Path:
    """Fail now, in one line, if ``path`` cannot receive results; create nothing.

    Called before any work starts, so that a bad ``--out`` (an existing file, a read-only or virtual
    file system such as /proc) is reported at once instead of after a whole simulation.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"output location {p} is an existing file, not a directory")
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"output location {p}: {parent} is a file, not a directory")
    try:  # the only reliable test (root passes os.access everywhere): make and remove a directory there
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".npo-write-test."))
    except OSError as exc:
        raise UserError(f"output location {p} is not writable: cannot create anything in {parent} "
                        f"({exc.strerror or exc})") from exc
    return p


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, FILE_MODE)  # mkstemp creates 0600; give results the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes(path, data: bytes) -> Path:
    return _atomic(path, lambda fh: fh.write(data))


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode())


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def write_json(path, obj: Any) -> Path:
    return write_text(path, json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")


def write_csv(path, frame) -> Path:
    """Write a pandas DataFrame (or a dict of equal-length columns) atomically as CSV."""
    import pandas as pd

    df = frame if isinstance(frame, pd.DataFrame) else pd.DataFrame(frame)
    return write_text(path, df.to_csv(index=False))


def save_figure(fig, path, copy_to: Path | str | None = None, dpi: int = 130) -> Path:
    """Save a matplotlib figure atomically, optionally copying it into ``copy_to`` (e.g. ``figures/``)."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    out = write_bytes(path, buf.getvalue())
    if copy_to is not None:
        Path(copy_to).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, Path(copy_to) / out.name)
    return out


def jsonable(obj: Any) -> Any:
    """A JSON-serialisable copy of ``obj`` (dataclasses, numpy and torch values, paths)."""
    return _jsonable(obj)
