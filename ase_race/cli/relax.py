"""``ase-race relax``: geometry optimisation that says how far its minimum can be trusted.

Runs BFGS or FIRE to ``--fmax``, writes every step to an extxyz trajectory with the
uncertainties (``race_*`` keys), optionally stops when the model becomes unsure
(``--stop-above``), and ends with a report: the final energy and its std, the final
``max_forces_std`` against ``--trust-std``, and a verdict. The minimum is called trustworthy
when the optimiser converged, no step crossed the stop threshold, and ``max_forces_std`` ≤
``--trust-std`` (default 0.1 eV/Å): the model is as sure of this geometry as of the
structures it was trained on (for ``ethanol-novelty``, 99 % of rMD17 test frames have
``max_forces_std`` below 0.092 eV/Å, its equilibrium 0.030). It is a threshold of its own, not
``fmax``: a convergence criterion of 0.01 eV/Å asks for forces far below any model's force
noise, and comparing the two called every minimum untrustworthy.

With ``--fallback NAME`` the reference is called wherever the model is unsure during the
optimisation (the options of ``ase-race md``), and the final geometry is verified with it
before convergence is declared (``--no-verify`` skips that): the minimum then counts as
trustworthy only if the reference's own largest force is at most ``fmax``.
"""

from __future__ import annotations

from pathlib import Path


from .md import DEFAULT_MODEL, add_fallback_arguments
from .predict import add_device_options


def add_parser(sub) -> None:
    p = sub.add_parser("relax", help="geometry optimisation with an uncertainty report")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model file or shipped name")
    p.add_argument("--structure", default=None,
                   help="start structure: the last frame of any ase.io file or rMD17 .npz (default: built-in ethanol)")
    p.add_argument("--optimizer", choices=["bfgs", "fire"], default="bfgs", help="ASE optimiser")
    p.add_argument("--fmax", type=float, default=0.01, help="eV/Å")
    p.add_argument("--steps", type=int, default=500, help="maximum optimiser steps")
    p.add_argument("--trust-std", type=float, default=0.1,
                   help="the minimum is trustworthy when max_forces_std is at most this (eV/Å)")
    p.add_argument("--stop-above", type=float, default=None,
                   help="stop when max_forces_std exceeds this (eV/Å; default: never)")
    p.add_argument("--output", default="race_relax", help="output folder")
    add_fallback_arguments(p)
    p.add_argument("--no-verify", action="store_true",
                   help="with --fallback: do not check the final geometry with the reference")
    add_device_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ase.optimize import BFGS, FIRE

    from ..calculator import FallbackCalculator, UncertaintyExceeded, UncertaintyStop, UncertaintyWriter
    from .md import check_outputs, fallback_dataset, finish_fallback, load_structure, make_calculator

    out = Path(args.output)
    trajectory = out / "trajectory.extxyz"
    check_outputs(trajectory, fallback_dataset(args))
    atoms = load_structure(args.structure)
    atoms.calc = make_calculator(args)
    fallback = atoms.calc if isinstance(atoms.calc, FallbackCalculator) else None
    optimizer = {"bfgs": BFGS, "fire": FIRE}[args.optimizer](atoms, logfile=None)
    optimizer.attach(UncertaintyWriter(atoms, str(trajectory)), interval=1)
    if args.stop_above is not None:
        optimizer.attach(UncertaintyStop(atoms, args.stop_above, dynamics=optimizer), interval=1)
    print(f"{'step':>5} {'E/eV':>14} {'fmax/(eV/Å)':>12} {'E std/eV':>9} {'max F std/(eV/Å)':>17}")

    def row():
        r = atoms.calc.results
        fmax = float((atoms.get_forces() ** 2).sum(axis=1).max() ** 0.5)
        print(f"{optimizer.nsteps:5d} {r['energy']:14.5f} {fmax:12.4f} {r['energy_std']:9.4f} {r['max_forces_std']:17.4f}",
              flush=True)

    optimizer.attach(row, interval=1)
    stopped = None
    try:
        converged = bool(optimizer.run(fmax=args.fmax, steps=args.steps))
    except UncertaintyExceeded as exc:
        stopped, converged = exc, False
    r = atoms.calc.results
    fmax = float((atoms.get_forces() ** 2).sum(axis=1).max() ** 0.5)
    trusted = converged and stopped is None and r["max_forces_std"] <= args.trust_std
    verification = None
    if fallback is not None and converged and not args.no_verify:
        verification = fallback.verify(atoms, args.fmax)
        trusted = verification.converged
    print(f"final energy {r['energy']:.5f} ± {r['energy_std']:.5f} eV (epistemic std "
          f"{r['energy_var_epistemic'] ** 0.5:.5f} eV) after {optimizer.nsteps} steps; residual fmax {fmax:.4f} eV/Å")
    print(f"max_forces_std {r['max_forces_std']:.4f} eV/Å against the trust threshold {args.trust_std:g} eV/Å")
    if stopped is not None:
        reason = f"stopped: {stopped}"
    elif not converged:
        reason = f"not converged in {args.steps} steps"
    elif verification is not None and not verification.converged:
        reason = f"the reference's largest force is {verification.reference_fmax:.4f} eV/Å > fmax"
    elif verification is not None:
        reason = f"verified: the reference's largest force is {verification.reference_fmax:.4f} eV/Å ≤ fmax"
    elif not trusted:
        reason = "max_forces_std exceeds --trust-std: the model is unsure of this geometry"
    else:
        reason = "converged where the model is sure (max_forces_std ≤ --trust-std)"
    if fallback is not None:
        print(f"fallback: {fallback.n_reference} reference calls ({fallback.n_failures} failed) in "
              f"{fallback.n_calls} evaluations, {fallback.n_retrains} retrains ({fallback.n_retrain_failures} failed)")
    if verification is not None:
        print(f"verification: reference energy {verification.reference_energy:.5f} eV (model "
              f"{verification.model_energy:.5f} eV), largest model force error {verification.max_force_error:.4f} eV/Å")
    print(f"minimum trustworthy: {'yes' if trusted else 'no'} ({reason}); trajectory {trajectory}")
    return finish_fallback(fallback)
