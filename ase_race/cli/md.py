"""``ase-race md``: molecular dynamics that reports its own uncertainty as it runs.

Prints a table every ``--interval`` steps (step, temperature, energy, energy std,
``max_forces_std``), writes an extxyz trajectory that keeps the uncertainties
(``race_*`` keys, see docs/calculator.md), a CSV of the uncertainty log and a PNG plot of
uncertainty against time.
"""

from __future__ import annotations

import csv
import io
import os
import sys
from pathlib import Path

from .predict import add_device_options

DEFAULT_MODEL = "ethanol-novelty"


def _pyscf():
    from ..extras import require

    require("pyscf", "--fallback pyscf")
    from ..calculator.pyscf_ref import PySCFCalculator

    return PySCFCalculator()


def _emt():
    from ase.calculators.emt import EMT

    return EMT()


def _tblite():
    from ..extras import require

    require("tblite", "--fallback tblite")
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", verbosity=0)


#: --fallback choices: name → factory of an ASE calculator
REFERENCES = {"pyscf": _pyscf, "emt": _emt, "tblite": _tblite}


def fallback_dataset(args) -> Path | None:
    """Where --fallback collects its reference frames (None without --fallback)."""
    if getattr(args, "fallback", None) is None:
        return None
    return Path(args.fallback_dataset or Path(args.output) / "fallback.extxyz")


def check_outputs(*paths) -> None:
    """Refuse, before the first step, an output path that cannot be written: a folder that
    cannot be created (a file is in the way), an existing folder where a file goes, or no
    write permission. Missing parent folders are created."""
    from ..errors import RaceError

    for path in (Path(p) for p in paths if p is not None):
        if path.is_dir():
            raise RaceError(f"output {path} is a directory; a file is written there")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RaceError(f"cannot create the folder of output {path}: {error}") from error
        if not os.access(path.parent, os.W_OK | os.X_OK):
            raise RaceError(f"no permission to write output {path} in {path.parent}")
        if path.exists() and not os.access(path, os.W_OK):
            raise RaceError(f"no permission to write output {path}")


def make_calculator(args):
    """The RACE calculator, wrapped in a FallbackCalculator when --fallback is given."""
    from ..calculator import FallbackCalculator, RACECalculator

    reference = REFERENCES[args.fallback]() if getattr(args, "fallback", None) else None  # a missing package: now
    calc = RACECalculator(args.model, device=args.device, dtype=args.dtype)
    if reference is None:
        return calc
    dataset = fallback_dataset(args)
    retrain = None
    if args.fallback_retrain_every:
        from ..data import read_frames
        from ..training.finetune import retrainer

        if not args.fallback_replay:
            print("note: without --fallback-replay each retraining sees only the collected frames; the model then "
                  "forgets its training data and an ensemble's spread grows elsewhere: pass the training set as "
                  "--fallback-replay", file=sys.stderr)
        retrain = retrainer(
            epochs=args.fallback_retrain_epochs,
            replay=read_frames(args.fallback_replay) if args.fallback_replay else (),
            replay_size=args.fallback_replay_size,
            calibrate_on=read_frames(args.fallback_calibrate_on) if args.fallback_calibrate_on else (),
        )
    tolerance = args.fallback_energy_tolerance
    return FallbackCalculator(
        calc, reference, threshold=args.fallback_threshold, dataset=dataset,
        min_interval=args.fallback_min_interval, budget=args.fallback_budget,
        retrain_every=args.fallback_retrain_every, retrain=retrain,
        energy_tolerance=None if tolerance is not None and tolerance <= 0 else tolerance,
    )


def add_parser(sub) -> None:
    p = sub.add_parser("md", help="uncertainty-aware molecular dynamics (Langevin, NVT, NVE)")
    add_arguments(p)
    p.set_defaults(run=run)


def add_arguments(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="model file or shipped name")
    p.add_argument("--structure", default=None,
                   help="start structure: the last frame of any ase.io file or rMD17 .npz (default: built-in ethanol)")
    p.add_argument("--ensemble", choices=["langevin", "nvt", "nve"], default="langevin",
                   help="langevin; nvt (Nosé–Hoover chain, --tdamp); nve (velocity Verlet)")
    p.add_argument("--tdamp", type=float, default=50.0, help="Nosé–Hoover damping time, fs (nvt)")
    p.add_argument("--temperature", type=float, default=500.0, help="K (500 K is the rMD17 sampling temperature)")
    p.add_argument("--steps", type=int, default=2000, help="MD steps")
    p.add_argument("--timestep", type=float, default=0.5, help="fs")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs")
    p.add_argument("--interval", type=int, default=100, help="steps between table rows and saved frames")
    p.add_argument("--log-interval", type=int, default=10, help="steps between points of the CSV log and plot")
    p.add_argument("--output", default="race_md", help="output folder")
    p.add_argument("--stop-above", type=float, default=None,
                   help="stop at the first step whose --stop-quantity exceeds this (eV/Å or eV)")
    p.add_argument("--stop-quantity", default="max_forces_std", choices=["max_forces_std", "energy_std"],
                   help="the uncertainty --stop-above compares")
    add_fallback_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the initial velocities and the Langevin noise")
    add_device_options(p)


def add_fallback_arguments(p) -> None:
    """The --fallback options, shared by ``md`` and ``relax``."""
    p.add_argument("--fallback", choices=sorted(REFERENCES), default=None,
                   help="reference calculator called where the model is unsure (pyscf: PBE/def2-SVP)")
    p.add_argument("--fallback-threshold", type=float, default=0.5, help="max_forces_std (eV/Å) above which to call it")
    p.add_argument("--fallback-dataset", default=None,
                   help="extxyz collecting the reference frames (default: OUTPUT/fallback.extxyz); a rerun reuses its "
                        "labels, and several runs may share one file")
    p.add_argument("--fallback-min-interval", type=int, default=0, help="steps between reference calls")
    p.add_argument("--fallback-budget", type=int, default=None, help="at most this many reference calls (default: no limit)")
    p.add_argument("--fallback-energy-tolerance", type=float, default=1.0, metavar="EV_PER_ATOM",
                   help="stop at the first reference call if reference and model energies differ by more than this "
                        "per atom (another level of theory); 0 disables the check")
    p.add_argument("--fallback-retrain-every", type=int, default=0,
                   help="fine-tune the model on the collected frames after every N reference calls (0: never)")
    p.add_argument("--fallback-retrain-epochs", type=int, default=20, help="epochs of each fine-tune")
    p.add_argument("--fallback-replay", default=None, metavar="FILE",
                   help="labelled frames (the model's training data) rehearsed in every fine-tune, so that the model "
                        "does not forget them (REF_energy/REF_forces keys)")
    p.add_argument("--fallback-replay-size", type=int, default=80,
                   help="structures drawn from --fallback-replay for each network and fine-tune")
    p.add_argument("--fallback-calibrate-on", default=None, metavar="FILE",
                   help="held-out labelled frames on which the variance calibration is refitted after every fine-tune "
                        "(default: keep the model's calibration)")


def load_structure(path: str | None):
    """The last frame of ``path`` (any file ase.io reads, or an rMD17 .npz) without its labels,
    which would be stale after the first step; ethanol when no file is given."""
    from ase.build import molecule

    from ..data import read_structures

    return read_structures(path, index=-1, labels=False)[0] if path else molecule("CH3CH2OH")


def run(args) -> int:
    import numpy as np
    from ase import units
    from ase.md.langevin import Langevin
    try:
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:  # ASE < 3.29
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta
    from ase.md.verlet import VelocityVerlet

    from ..calculator import UncertaintyExceeded, UncertaintyLog, UncertaintyStop, UncertaintyWriter

    out = Path(args.output)
    trajectory, csv_path, png_path = out / "trajectory.extxyz", out / "uncertainty.csv", out / "uncertainty.png"
    check_outputs(trajectory, csv_path, png_path, fallback_dataset(args))
    atoms = load_structure(args.structure)
    atoms.calc = make_calculator(args)
    rng = np.random.default_rng(args.seed)
    thermalize_momenta(atoms, temperature_K=args.temperature, rng=rng)
    dt = args.timestep * units.fs
    if args.ensemble == "langevin":
        dyn = Langevin(atoms, dt, temperature_K=args.temperature, friction=args.friction / units.fs,
                       fixcm=False, rng=rng)
    elif args.ensemble == "nvt":
        from ase.md.nose_hoover_chain import NoseHooverChainNVT

        dyn = NoseHooverChainNVT(atoms, dt, temperature_K=args.temperature, tdamp=args.tdamp * units.fs)
    else:
        dyn = VelocityVerlet(atoms, dt)
    log = UncertaintyLog(atoms, dyn)
    bar = _progress(args.steps)
    dyn.attach(log, interval=args.log_interval)
    dyn.attach(UncertaintyWriter(atoms, str(trajectory)), interval=args.interval)
    dyn.attach(lambda: _print_row(log.row(), bar), interval=args.interval)
    if args.stop_above is not None:
        dyn.attach(UncertaintyStop(atoms, args.stop_above, args.stop_quantity, dynamics=dyn), interval=1)

    print(f"{len(atoms)} atoms, {args.ensemble} at {args.temperature:g} K, {args.steps} steps of {args.timestep} fs, "
          f"model {args.model}")
    print(f"{'step':>7} {'T/K':>7} {'E/eV':>14} {'E std/eV':>9} {'max F std/(eV/Å)':>17}")
    stopped = None
    try:
        for _ in dyn.irun(args.steps):
            if bar is not None:
                bar.update(1)
    except UncertaintyExceeded as exc:
        stopped = exc
    if bar is not None:
        bar.close()
    if stopped is not None:
        if not log.rows or log.rows[-1]["step"] != stopped.step:
            log()
        if stopped.step % args.interval:  # a multiple of the interval was written already
            UncertaintyWriter(atoms, str(trajectory), append=True)()
        print(f"stopped: {stopped} (structure saved as the last frame of {trajectory})")
    fallback = atoms.calc if getattr(atoms.calc, "n_reference", None) is not None else None
    if fallback is not None:
        f = fallback
        print(f"fallback: {f.n_reference} reference calls ({f.n_failures} failed) in {f.n_calls} evaluations, "
              f"{f.n_retrains} retrains ({f.n_retrain_failures} failed); {len(f.frames)} frames in {f.frames.path}"
              + (f" ({f.n_reused} labels taken from it instead of new reference calls)" if f.n_reused else ""))
    _write_csv(log.rows, csv_path)
    plot_uncertainty(log.rows, png_path, title=f"{args.model}: {args.ensemble} {args.temperature:g} K")
    print(f"wrote {trajectory}, {csv_path} and {png_path}")
    return finish_fallback(fallback)


def finish_fallback(calc) -> int:
    """Write reference frames still waiting after a failed dataset write; the exit status.

    1 (and a message naming the file) if some cannot be written even now: paid-for reference
    labels are never dropped silently.
    """
    if calc is None or calc.frames is None:
        return 0
    if calc.n_write_failures:
        print(f"warning: {calc.n_write_failures} write(s) to {calc.frames.path} failed during the run", file=sys.stderr)
    try:
        calc.frames.flush()
    except OSError as error:
        print(f"error: {len(calc.frames.pending)} reference frame(s) could not be written to {calc.frames.path} "
              f"({error}); they are lost when this process ends", file=sys.stderr)
        return 1
    return 0


def _print_row(row, bar=None) -> None:
    line = (f"{row['step']:7d} {row['temperature_K']:7.0f} {row['energy']:14.4f} {row['energy_std']:9.4f} "
            f"{row['max_forces_std']:17.4f}")
    if bar is not None:
        bar.write(line)  # above the bar, which then redraws below the table
    else:
        print(line, flush=True)


def _progress(total: int):
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="step", leave=False)


def _write_csv(rows, path: Path) -> None:
    from .._atomic import atomic_write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def plot_uncertainty(rows, path: Path, title: str = "") -> None:
    """Energy std, max_forces_std and temperature against time, as a PNG."""
    from matplotlib.figure import Figure

    from ..evaluation.plotting import plain_ticks

    t = [r["time_fs"] for r in rows]
    fig = Figure(figsize=(7, 6), constrained_layout=True)
    axes = fig.subplots(3, 1, sharex=True)
    axes[0].plot(t, [1000 * r["energy_std"] for r in rows], color="C0")
    axes[0].set_ylabel("energy std / meV")
    axes[1].plot(t, [1000 * r["max_forces_std"] for r in rows], color="C1")
    axes[1].set_ylabel("max forces std / (meV/Å)")
    axes[2].plot(t, [r["temperature_K"] for r in rows], color="C2")
    axes[2].set_ylabel("T / K")
    axes[2].set_xlabel("time / fs")
    plain_ticks(*axes)
    if title:
        axes[0].set_title(title)
    fig.savefig(path, dpi=120)
