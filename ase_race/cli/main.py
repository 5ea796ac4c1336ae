"""``ase-race`` entry point: builds the subcommand parsers and dispatches.

Each subcommand module exposes ``add_parser(subparsers)`` and ``run(args) -> int``. A library
error prints one line naming the problem (no traceback) and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import RaceError
from . import active_learn, demo, evaluate, info, md, predict, relax, select, serve, ship, stress_test, train

SUBCOMMANDS = (demo, md, relax, train, predict, evaluate, stress_test, ship, select, active_learn, serve, info)

#: subcommands whose free ``key=value`` words may come anywhere, between flags too
FREE_OVERRIDES = ("train",)


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless there is none or the help text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="ase-race", description="Bayesian equivariant interatomic potentials with uncertainties."
    )
    parser.add_argument("--version", action="version", version=f"ase-race {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    for subparser in sub.choices.values():
        subparser.formatter_class = DefaultsFormatter
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line; ``train``'s ``key=value`` overrides may sit between its flags."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command in FREE_OVERRIDES and not any(word.startswith("-") for word in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return int(args.run(args) or 0)
    except (RaceError, FileNotFoundError) as err:
        print(f"ase-race {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
