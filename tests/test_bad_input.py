"""Bad input to ``npo-sim``: one stderr line naming the problem, a non-zero exit, no traceback, no files.

Table-driven: each case is a command line (``{out}`` is a fresh output directory, ``{file}`` an
existing regular file), the expected exit code and a substring the one error line must contain.
Everything runs in-process through the console-script entry point, before any simulation starts, so
the whole table takes about a second. ``npo-tofu``'s table is in ``test_bad_input_tofu.py``.
"""

from __future__ import annotations

import pytest

from npo_sim.cli import main

CASES = [
    # (id, argv, exit code, the error line contains)
    ("theory-beta-zero", "theory --betas 0 --out {out}", 2, "betas must be"),
    ("theory-beta-negative", "theory --betas -1 --out {out}", 2, "betas must be"),
    ("theory-beta-nan", "theory --betas nan --out {out}", 2, "betas must be"),
    ("theory-steps-zero", "theory --steps 0 --out {out}", 2, "steps must be"),
    ("theory-unknown-method", "theory --methods ga,nope --out {out}", 2, "nope"),
    ("theory-eta-zero", "theory --etas 0 --out {out}", 2, "eta"),
    ("theory-bad-int-list", "theory --n-f 1,x --out {out}", 2, "not a comma list of int"),
    ("theory-workers-zero", "theory --workers 0 --out {out}", 2, "workers must be"),
    ("theory-bad-init", "theory --init nope --out {out}", 2, "invalid choice"),
    ("theory-out-is-file", "theory --quick --out {file}", 2, "is an existing file"),
    ("theory-out-under-file", "theory --quick --out {file}/sub", 2, "is a file, not a directory"),
    ("theory-out-proc", "theory --quick --out /proc/npo-sim-test", 2, "not writable"),
    ("theory-figures-is-file", "theory --quick --out {out} --figures {file}", 2, "is an existing file"),
    ("theory-missing-out", "theory --quick", 2, "required: --out"),
    ("synthetic-alpha", "synthetic --alpha 0.5 --out {out}", 2, "alpha must be one of"),
    ("synthetic-steps-zero", "synthetic --steps 0 --out {out}", 2, "steps must be"),
    ("synthetic-seeds-zero", "synthetic --seeds 0 --out {out}", 2, "seeds must be"),
    ("synthetic-unknown-method", "synthetic --methods ga,nope --out {out}", 2, "nope"),
    ("synthetic-bad-pretrain", "synthetic --pretrain sgd --out {out}", 2, "pretrain must be one of"),
    ("synthetic-out-is-file", "synthetic --steps 5 --seeds 1 --out {file}", 2, "is an existing file"),
    ("markov-no-preset", "markov --out {out}", 2, "required: --preset"),
    ("markov-unknown-preset", "markov --preset nope --out {out}", 2, "unknown preset"),
    ("markov-steps-negative", "markov --preset length --steps -1 --out {out}", 2, "steps must be"),
    ("markov-eps-out-of-range", "markov --preset length --eps 1.5 --out {out}", 2, "eps"),
    ("markov-threads-zero", "markov --preset divergence --threads 0 --out {out}", 2, "threads must be"),
    ("markov-unknown-method", "markov --preset length --methods nope --out {out}", 2, "nope"),
    ("markov-out-is-file", "markov --preset divergence --quick --out {file}", 2, "is an existing file"),
    ("figures-unknown-study", "figures --only nope --out {out} --runs {out}/runs", 2, "unknown studies"),
    ("figures-out-is-file", "figures --only core --out {file} --runs {out}/runs", 2, "is an existing file"),
    ("unknown-command", "nope", 2, "invalid choice"),
]


def _snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("argv, code, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(argv, code, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NPO_DEBUG", "0")
    (tmp_path / "a_file").write_text("not a directory\n")
    before = _snapshot(tmp_path)
    args = argv.format(out=tmp_path / "out", file=tmp_path / "a_file").split()
    try:
        rc = main(args)
    except SystemExit as exc:   # argparse usage errors exit through SystemExit
        rc = exc.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == code
    assert len(err) == 1, err
    assert needle in err[0] and "Traceback" not in err[0], err[0]
    assert err[0].startswith("npo-sim"), err[0]
    assert _snapshot(tmp_path) == before   # nothing written, not even an empty output directory
