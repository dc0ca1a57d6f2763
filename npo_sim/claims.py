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
#: the criterion also holds on a control that cannot have the claimed effect (the untouched target held
#: for the whole run, or a zero-learning-rate method): the verdict says nothing about the claim
VACUOUS = "vacuous"
VERDICTS = (HOLDS, PARTLY, FAILS, NA, VACUOUS)
#: what each verdict word means (the REPORT.md header prints these)
MEANING = {
    HOLDS: "the stated criterion is met on the real run, fails on every control, and (where a grid is declared) "
           "in every setting of the grid",
    PARTLY: "a weaker reading of the criterion (stated in the criterion cell) is met, or the criterion is met in "
            "only k of n grid settings (written \"holds in k of n settings\")",
    FAILS: "the criterion is not met",
    NA: "the criterion could not be evaluated on this run (or the claim is not made for this setting: "
        "\"n/a (...)\" says why)",
    VACUOUS: "the criterion is also met by a control that cannot have the claimed effect (the untouched target, "
             "i.e. step 0 held for the whole run, or a zero-learning-rate method), so the run cannot test the claim",
}
#: the controls a criterion is run on besides the real run
CONTROLS = ("step 0", "null method")


@dataclass(frozen=True)
class Claim:
    claim: str        #: the claim, as its source states it
    measured: str     #: the numbers it was judged on
    verdict: str      #: one of VERDICTS, optionally with a qualifier ("n/a (stated for α=1)")
    figure: str       #: figure (or table) file name, relative to the figures directory
    criterion: str = ""  #: the rule that turned ``measured`` into ``verdict``, in one line
    #: the same criterion's verdict on the controls and on the declared robustness grid, in words
    #: ("null method: does not hold; grid β × lr: holds in 9 of 9"); empty when none was run
    checks: str = ""


def verdict(ok: bool | None) -> str:
    """HOLDS / FAILS for a boolean criterion, NA when it could not be evaluated."""
    return NA if ok is None else (HOLDS if ok else FAILS)


def all_any(oks: Iterable[bool | None]) -> str:
    """HOLDS if every part holds, PARTLY if some do, FAILS if none, NA if any part is unmeasured."""
    oks = list(oks)
    if not oks or None in oks:
        return NA
    return HOLDS if all(oks) else PARTLY if any(oks) else FAILS


def word(v: str) -> str:
    """The verdict word a (possibly qualified) verdict string reads as: ``"holds in 7 of 9 settings"`` is
    PARTLY (HOLDS when k = n), ``"vacuous (...)"`` VACUOUS, ``"n/a (...)"`` and anything unknown NA."""
    if v in VERDICTS:
        return v
    if v.startswith(HOLDS + " in "):
        k, n = (int(x) for x in v.split()[2:5:2])
        return HOLDS if k == n else PARTLY if k else FAILS
    return VACUOUS if v.startswith(VACUOUS) else NA


def _met(v: str) -> bool:
    return word(v) in (HOLDS, PARTLY)


def controlled(real: str, controls: dict[str, str]) -> tuple[str, str]:
    """The verdict after the controls: VACUOUS when the criterion is met (holds or partly) on any control
    (``{control name: its verdict}``), else the real run's. Returns (verdict, the controls in words)."""
    text = "; ".join(f"{k}: {v}" for k, v in controls.items())
    hit = [k for k, v in controls.items() if _met(v)]
    if hit and _met(real):
        return f"{VACUOUS} (also met on {', '.join(hit)})", text
    return real, text


def robust(verdicts: dict[str, str], real: str | None = None) -> str:
    """Across a declared grid (``{setting: verdict}``): HOLDS when every setting holds, else
    ``"holds in k of n settings"`` (FAILS when none does). ``real`` (the headline run's verdict) must be
    among them; an unmeasured or vacuous headline verdict is returned unchanged."""
    if real is not None and word(real) in (NA, VACUOUS):
        return real
    n, k = len(verdicts), sum(word(v) == HOLDS for v in verdicts.values())
    return HOLDS if n and k == n else FAILS if k == 0 else f"{HOLDS} in {k} of {n} settings"


def with_checks(claim: Claim, controls: dict[str, str] | None = None, grid: str = "") -> Claim:
    """``claim`` with its verdict passed through :func:`controlled` and the checks recorded."""
    verdict, text = controlled(claim.verdict, controls or {})
    text = "; ".join(t for t in (text, grid) if t)
    return dataclasses.replace(claim, verdict=verdict, checks=text)


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
