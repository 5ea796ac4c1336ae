"""``ase-race serve MODEL STRUCTURE -a ADDRESS``: an i-PI client evaluating a RACE model.

Flags as i-PI's own drivers spell them: ``-u`` a Unix socket (file /tmp/ipi_ADDRESS, or
ADDRESS itself when it is a path; ``-S`` changes the prefix), otherwise TCP to host ADDRESS
on port ``-p``. Start as many clients as there are beads or replicas to evaluate in parallel;
each answers until i-PI sends EXIT or closes the socket, then exits with status 0. See
:mod:`ase_race.serve` for the units and the JSON extras, docs/scale.md for the set-up.
"""

from __future__ import annotations

import argparse
import sys

from .predict import add_device_options


def add_parser(sub) -> None:
    from ..serve import COMMITTEE_MODES, DEFAULT_PORT, SOCKETS_PREFIX

    p = sub.add_parser(
        "serve",
        help="evaluate a model for i-PI over a socket (path integrals, replica exchange, many clients)",
        description="Connect to a running i-PI server and evaluate the structures it sends: energy, forces, "
        "virial (atomic units) and a JSON extras string with energy_std, max_forces_std, forces_std (eV, eV/Å) "
        "and, for ensembles and sampled posteriors, the members in the committee_pot/committee_force/"
        "committee_virial form i-PI's <ffcommittee parse_json> reads. Exits with status 0 when i-PI ends the run.",
    )
    p.add_argument("model", help="model file or shipped model name")
    p.add_argument("structure", help="template structure (any file ase.io reads, e.g. i-PI's initial xyz): "
                                     "the species in i-PI's atom order; its pbc unless --pbc or --no-pbc")
    p.add_argument("-a", "--address", default="localhost",
                   help="Unix socket name or path (with -u), else the server's host name")
    p.add_argument("-u", "--unix", action="store_true", help="connect through a Unix socket (one machine)")
    p.add_argument("-p", "--port", type=int, default=DEFAULT_PORT,
                   help="TCP port, ignored with -u (the same as i-PI's when neither side sets one)")
    p.add_argument("-S", "--sockets-prefix", default=SOCKETS_PREFIX,
                   help="prefix of Unix socket files, as i-PI's sockets_prefix")
    p.add_argument("--committee", choices=COMMITTEE_MODES, default="calibrated",
                   help="members in the extras for ensembles and sampled posteriors: 'calibrated' spreads them so "
                        "i-PI's committee_uncertainty equals the calibrated epistemic std, 'raw' sends them as "
                        "evaluated, 'off' sends none")
    p.add_argument("--pbc", action=argparse.BooleanOptionalAction, default=None,
                   help="--pbc: periodic in all three directions (i-PI's cell, a virial returned), needed for a "
                        "periodic system in i-PI's xyz, which ASE reads without a cell; --no-pbc: a molecule; "
                        "neither: the template's own pbc")
    p.add_argument("--connect-timeout", type=float, default=60.0,
                   help="seconds to keep trying while the server is not up yet")
    add_device_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..serve import serve

    count = serve(
        args.model, args.address, unix=args.unix, port=args.port, device=args.device, dtype=args.dtype,
        atoms=args.structure, sockets_prefix=args.sockets_prefix, committee=args.committee, pbc=args.pbc,
        connect_timeout=args.connect_timeout, log=sys.stderr,
    )
    print(f"ase-race serve: evaluated {count} structures")
    return 0
