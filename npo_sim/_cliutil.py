"""Shared plumbing for the two console scripts: subcommand registries and one-line errors.

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``main(args) -> int``. The registries below map a subcommand name to that module, so adding a setting
never touches an if/elif chain.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Mapping

from .runio import UserError
from .runio import NonFiniteLoss


def build_and_run(prog: str, description: str, commands: Mapping[str, tuple[str, str]], argv=None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module, help_text) in commands.items():
        if importlib.util.find_spec(module) is None:
            continue
        modules[name] = module
        sp = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        add = getattr(mod, f"add_{name.replace('-', '_')}_arguments", None) or mod.add_arguments
        add(sp)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    mod = importlib.import_module(modules[args.command])
    entry = getattr(mod, f"{args.command.replace('-', '_')}_main", None) or mod.main
    try:
        return int(entry(args) or 0)
    except (UserError, ValueError, FileNotFoundError) as exc:
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLoss as exc:  # a diverged run
        print(f"{prog} {args.command}: error: {exc}", file=sys.stderr)
        return 3
