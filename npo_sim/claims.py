"""The Claim record and the verdict words: what every study's ``findings`` returns.

A claim is one row of ``figures/REPORT.md``: the claim as its source paper states it, the measured
numbers, a verdict computed from them by a stated criterion, and the figure that shows it. Findings
return finished records; the report only collects and renders them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

HOLDS, PARTLY, FAILS, NA = "holds", "partly", "does not hold", "not measured"
VERDICTS = (HOLDS, PARTLY, FAILS, NA)


@dataclass(frozen=True)
class Claim:
    claim: str        #: the claim, as its source states it
    measured: str     #: the numbers it was judged on
    verdict: str      #: one of VERDICTS, optionally with a qualifier ("n/a (stated for α=1)")
    figure: str       #: figure (or table) file name, relative to the figures directory
    criterion: str = ""  #: the rule that turned ``measured`` into ``verdict``, in one line


def verdict(ok: bool | None) -> str:
    """HOLDS / FAILS for a boolean criterion, NA when it could not be evaluated."""
    return NA if ok is None else (HOLDS if ok else FAILS)


def all_any(oks: Iterable[bool | None]) -> str:
    """HOLDS if every part holds, PARTLY if some do, FAILS if none, NA if any part is unmeasured."""
    oks = list(oks)
    if not oks or None in oks:
        return NA
    return HOLDS if all(oks) else PARTLY if any(oks) else FAILS


def fmt(x, spec: str = ".3g") -> str:
    """``format(x, spec)``, or ``n/a`` for a missing value."""
    return "n/a" if x is None else format(x, spec)


def to_json(claims: Iterable[Claim]) -> list[dict]:
    return [dataclasses.asdict(c) for c in claims]


def from_json(rows: Iterable[dict]) -> list[Claim]:
    return [Claim(**r) for r in rows]


def load(path: Path) -> list[Claim]:
    """Claims saved by :func:`npo_sim.study.run_study` (``claims.json``)."""
    return from_json(json.loads(Path(path).read_text()))
