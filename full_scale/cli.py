"""``npo-tofu``: TOFU fine-tuning, unlearning, evaluation and reports. ``npo-tofu COMMAND --help``."""

from __future__ import annotations

import sys

from npo_sim._cliutil import build_and_run

#: subcommand -> (module defining add_<cmd>_arguments/<cmd>_main (or add_arguments/main), help)
COMMANDS = {
    "finetune": ("full_scale.train", "fine-tune a target (full) or oracle (retainYY) model on TOFU"),
    "unlearn": ("full_scale.train", "unlearn forgetXX with any npo_sim objective"),
    "eval": ("full_scale.evaluate", "evaluate a checkpoint with TOFU's exact metrics"),
    "aggregate": ("full_scale.evaluate", "forget quality and model utility from TOFU-format logs (no model)"),
    "report": ("full_scale.report", "tables and figures from run directories"),
    "study": ("full_scale.report", "the tofu-mini study (fine-tune, unlearn, evaluate, report)"),
}


def main(argv=None) -> int:
    return build_and_run("npo-tofu", __doc__, COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
