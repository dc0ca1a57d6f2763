"""Shared plumbing for the two console scripts: subcommand registries and one-line errors.

Each subcommand lives in its own CLI module, which defines ``add_arguments(parser)`` and
``main(args) -> int`` (or ``add_<cmd>_arguments`` / ``<cmd>_main`` when one module holds several).
The registries map a subcommand name to that module, so adding a setting never touches an if/elif chain.

Every expected failure ends here, in one place: it is printed as one line naming the problem (and the
file, for file-system errors) and the process exits non-zero. ``--debug`` (or ``NPO_DEBUG=1``) shows the
traceback instead, for bug reports.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import pickle
import sys
from collections.abc import Mapping

from .runio import NonFiniteLoss, UserError

#: expected failures and their exit codes (the most specific class that matches wins)
EXIT_CODES: dict[type[BaseException], int] = {
    UserError: 2, ValueError: 2, OSError: 2, pickle.UnpicklingError: 2, NonFiniteLoss: 3, KeyboardInterrupt: 130,
}


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line too (``prog: error: ...; see prog --help``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def split_commas(text: str | None) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``; ``None`` or blank -> ``()``. The one comma-list parser."""
    return tuple(x.strip() for x in (text or "").split(",") if x.strip())


def comma_list(cast=str):
    """An argparse ``type``: ``"a,b,,c"`` -> ``(cast(a), cast(b), cast(c))`` (empty items dropped)."""
    def parse(text: str) -> tuple:
        try:
            return tuple(cast(v) for v in split_commas(text))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a comma list of {cast.__name__}: {text!r}") from exc
    parse.__name__ = f"comma list of {cast.__name__}"
    return parse


def one_line(exc: BaseException) -> str:
    """A one-line description of ``exc``, naming the file for file-system errors."""
    if isinstance(exc, OSError) and exc.filename is not None:
        what = exc.strerror or type(exc).__name__
        files = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
        text = f"{what}: {files}"
    elif isinstance(exc, KeyboardInterrupt):
        text = str(exc) or "interrupted"
    else:
        text = str(exc).strip() or type(exc).__name__
        if isinstance(exc, pickle.UnpicklingError):
            text = f"refusing to load a file that is not a plain tensor file ({text.splitlines()[0]})"
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def exit_code(exc: BaseException, codes: Mapping[type[BaseException], int]) -> int | None:
    """The exit code for an expected failure, or None for a bug (which keeps its traceback)."""
    for cls in type(exc).__mro__:
        if cls in codes:
            return codes[cls]
    return None


def _debug(args) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("NPO_DEBUG", "") not in ("", "0")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also NPO_DEBUG=1)")


def guarded(prog: str, args, entry, errors: Mapping[type[BaseException], int] | None = None) -> int:
    """Run ``entry(args)``; an expected failure becomes one stderr line and its exit code.

    ``errors`` adds package-specific expected failures (e.g. a safetensors read error) to
    :data:`EXIT_CODES`. Anything else is a bug and keeps its traceback, as does everything with ``--debug``.
    """
    codes = {**EXIT_CODES, **(errors or {})}
    try:
        return int(entry(args) or 0)
    except BaseException as exc:  # noqa: BLE001 - sorted into expected failures and bugs below
        code = exit_code(exc, codes)
        if code is None or _debug(args):
            raise
        print(f"{prog} {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return code


def _chosen(argv, commands: Mapping[str, tuple[str, str]]) -> str | None:
    """The subcommand named in ``argv``: its first token that is not an option (None if none)."""
    for tok in argv:
        if tok == "--":
            return None
        if not tok.startswith("-"):
            return tok if tok in commands else None
    return None


def build_and_run(prog: str, description: str, commands: Mapping[str, tuple[str, str]], argv=None) -> int:
    """Parse ``argv`` and run the chosen subcommand under :func:`guarded`.

    Lazy: every subcommand is listed (name and one-line help) without importing its module; only the
    chosen command's module is imported, for its arguments and its entry point. So ``prog --help`` and
    a light subcommand never import what the other subcommands need (matplotlib, pandas, ...).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = OneLineParser(prog=prog, description=description)
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    available = {name: spec for name, spec in commands.items() if importlib.util.find_spec(spec[0]) is not None}
    chosen = _chosen(argv, available)
    for name, (module, help_text) in available.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            mod = importlib.import_module(module)
            add = getattr(mod, f"add_{name.replace('-', '_')}_arguments", None) or mod.add_arguments
            add(sp)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    mod = importlib.import_module(available[args.command][0])
    entry = getattr(mod, f"{args.command.replace('-', '_')}_main", None) or mod.main
    return guarded(prog, args, entry)
