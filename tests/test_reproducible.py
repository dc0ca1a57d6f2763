"""The same seed gives byte-identical result files: timings live in ``timing.json`` only."""

from __future__ import annotations

import dataclasses

import pytest

from npo_sim.settings import logistic, mixture
from npo_sim.study import run_study

CONFIGS = {
    "theory": (logistic.STUDY, lambda: logistic.make_config(logistic.QUICK, steps=300, betas=(1.0,),
                                                          beta_sweep=(0.1, 1.0), etas=(1.0,), n_fs=(8,))),
    "synthetic": (mixture.STUDY, lambda: dataclasses.replace(mixture.report_configs(True)["synthetic_alpha1"],
                                                             steps=60)),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_seed_gives_byte_identical_results(name, tmp_path):
    study, make = CONFIGS[name]
    cfg = make()
    a = run_study(study, cfg, tmp_path / "a")
    b = run_study(study, cfg, tmp_path / "b")
    files = sorted(p.name for p in a.out_dir.iterdir() if p.suffix in (".json", ".csv") and p.name != "timing.json")
    assert "summary.json" in files and "claims.json" in files and any(f.endswith(".csv") for f in files)
    assert files == sorted(p.name for p in b.out_dir.iterdir()
                           if p.suffix in (".json", ".csv") and p.name != "timing.json")
    for f in files:
        assert (a.out_dir / f).read_bytes() == (b.out_dir / f).read_bytes(), f
    assert "timing" not in (a.out_dir / "summary.json").read_text()
