"""``npo-sim``: theory and synthetic settings. ``npo-sim COMMAND --help`` for each."""

from __future__ import annotations

import sys

from .._cliutil import build_and_run

#: subcommand -> (CLI module defining add_arguments/main, one-line help). All argument parsing of
#: ``npo-sim`` lives in these modules; the settings themselves never see argparse.
COMMANDS = {
    "theory": ("npo_sim.cli.theory", "Theorem-2 lab: GA vs NPO divergence in high-dimensional logistic regression"),
    "synthetic": ("npo_sim.cli.synthetic", "the paper's §4 random-features Gaussian-mixture experiment"),
    "markov": ("npo_sim.cli.markov", "Markov-chain sequence unlearning with exact KLs"),
    "figures": ("npo_sim.cli.figures", "regenerate every synthetic figure and figures/REPORT.md"),
}


def main(argv=None) -> int:
    return build_and_run("npo-sim", __doc__, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
