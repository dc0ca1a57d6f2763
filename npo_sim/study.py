"""The Study shape every synthetic setting has, and the one runner that owns their I/O.

A setting (``npo_sim.settings.*``) provides a :class:`Study`:

* a frozen, validated config dataclass (errors in the setting's own words);
* ``simulate(config, progress) -> Results``: tidy tables plus a JSON summary, nothing written;
* ``findings(results, config) -> list[Claim]``: finished claim records;
* ``figures(results, config) -> {file name: matplotlib figure}``: drawn from the tables only.

:func:`run_study` runs those and writes everything: the resolved ``config.json``, each table as CSV,
``summary.json``, ``claims.json``, the figures (copied into a figures directory if asked) and
``timing.json`` (kept apart so that the same seed gives byte-identical result files). Every write is
atomic (:mod:`npo_sim.runio`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import claims as C
from . import runio


@dataclass(frozen=True)
class Results:
    """What ``simulate`` returns: named tables (saved as ``<name>.csv``) and a JSON-able summary."""

    tables: Mapping[str, Any] = field(default_factory=dict)   # name -> pandas DataFrame
    summary: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Study:
    name: str
    simulate: Callable[[Any, bool], Results]
    findings: Callable[[Results, Any], list[C.Claim]]
    figures: Callable[[Results, Any], Mapping[str, Any]]
    #: one-screen text summary for the CLI (optional)
    describe: Callable[[Results, Any], str] | None = None
    summary_file: str = "summary.json"


@dataclass(frozen=True)
class StudyRun:
    results: Results
    claims: list[C.Claim]
    out_dir: Path
    figures: list[Path]
    seconds: float


def run_study(study: Study, config, out_dir, figures_dir=None, *, progress: bool = False) -> StudyRun:
    """Simulate ``config``, then write its config, tables, summary, claims, figures and timing."""
    out_dir = Path(out_dir)
    for where in (out_dir, figures_dir):
        if where is not None:
            runio.check_out_dir(where)   # before any work: a bad location fails at once
    t0 = time.perf_counter()
    results = study.simulate(config, progress)
    found = list(study.findings(results, config))
    runio.write_json(out_dir / "config.json", config_record(config))
    for name, table in results.tables.items():
        runio.write_csv(out_dir / f"{name}.csv", table)
    runio.write_json(out_dir / study.summary_file, results.summary)
    runio.write_json(out_dir / "claims.json", C.to_json(found))
    written = [runio.save_figure(fig, out_dir / fname, copy_to=figures_dir)
               for fname, fig in study.figures(results, config).items()]
    seconds = time.perf_counter() - t0
    runio.write_json(out_dir / "timing.json", {"seconds": seconds})
    return StudyRun(results, found, out_dir, written, seconds)


def config_record(config) -> dict:
    """The resolved config as saved in ``config.json`` (its class name included)."""
    rec = runio.jsonable(config) if dataclasses.is_dataclass(config) else dict(config)
    return {"config_class": type(config).__name__, **rec}


def load_claims(run_dir) -> list[C.Claim]:
    """The claims a previous :func:`run_study` saved in ``run_dir`` (for ``npo-sim figures --report-only``)."""
    path = Path(run_dir) / "claims.json"
    return C.load(path) if path.exists() else []
