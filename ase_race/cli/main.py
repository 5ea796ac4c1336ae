"""``ase-race`` entry point: builds the subcommand parsers and dispatches.

Each subcommand module exposes ``add_parser(subparsers)`` and ``run(args) -> int``. A library
error prints one line naming the problem (no traceback) and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import RaceError
from . import active_learn, demo, evaluate, info, md, predict, relax, select, ship, stress_test, train

SUBCOMMANDS = (demo, md, relax, train, predict, evaluate, stress_test, ship, select, active_learn, info)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="ase-race", description="Bayesian equivariant interatomic potentials with uncertainties."
    )
    parser.add_argument("--version", action="version", version=f"ase-race {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (RaceError, FileNotFoundError) as err:
        print(f"ase-race {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
