"""The off-distribution stress test: label probe structures, predict them, score σ per kind.

:func:`stress_test` builds the probes of :mod:`ase_race.stress.structures` around one molecule,
labels them with a reference calculator (reusing labels already in a cache file), predicts them
with the model and returns, per kind of probe:

* ``energy_mae`` (eV) and ``forces_mae`` (eV/Å);
* ``coverage_1sigma`` / ``coverage_2sigma``: the share of energy errors |e| ≤ σ_E, ≤ 2σ_E
  (a calibrated Gaussian gives 0.683 and 0.954);
* ``z2_mean`` / ``z2_median`` of z² = e²/σ_E² (1 and 0.455 for a calibrated Gaussian);
* ``spearman``: Spearman ρ between |e| and σ_E;
* ``auroc_energy_std`` / ``auroc_max_forces_std``: how well σ_E and ``max_forces_std`` tell
  the kind's *out-of-range* probes from the in-distribution frames (1 = perfectly).

In range or not: a probe with the molecule's atoms is *in range* when every bond of the
molecule (:func:`~ase_race.stress.structures.bonds`) is as long as some bond between the same
elements in the in-distribution frames (between the shortest and longest such length there;
by element pair, so that the frames may order their atoms differently from the molecule);
other compositions (atom pairs, small molecules) are never in range. In-range probes count for errors and coverage, not for AUROC.
The ``off_distribution`` row pools every out-of-range probe; ``scans`` gives, per bond pulled,
Spearman ρ of σ_E and of ``max_forces_std`` against the bond length (1 = rising all the way).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from ase import Atoms

from .. import _keys as K
from .._atomic import atomic_write_text
from ..data import write_structures
from ..evaluation import auroc, spearman
from .structures import KINDS, Probe, atom_pairs, bond_scans, bonds, md_frames, normal_mode_scans, small_molecules, sound

log = logging.getLogger("ase_race.stress")

#: a reference: an ASE calculator, or a function giving one for a structure (e.g. its spin)
Reference = object | Callable[[Atoms], object]


@dataclass
class Scored:
    """A labelled and predicted probe. Energies in eV, forces (n, 3) in eV/Å."""

    probe: Probe
    energy_ref: float
    forces_ref: np.ndarray
    energy: float = math.nan
    energy_std: float = math.nan
    max_forces_std: float = math.nan
    forces: np.ndarray | None = None
    in_range: bool = False


#: probe settings of the two disjoint parts of a suite: ``test`` (the stress test's default) and
#: ``calibration`` (other distances, amplitudes, molecules, temperatures and MD seeds: what a
#: calibration may be fitted on without seeing a test structure)
SPLITS = {
    "test": dict(n_stretch=8, first_stretch=1.1, compress=(0.7, 0.8, 0.9),
                 pair_distances=(0.9, 1.2, 1.6, 2.2, 3.0, 4.5, 6.0), mode_amplitudes=(-0.45, -0.25, 0.25, 0.45, 0.7),
                 molecules=("H2O", "CH4", "CH3OH", "H2CO", "C2H6", "CO2", "CH3CHO", "HCOOH", "CH3")),
    "calibration": dict(n_stretch=6, first_stretch=1.2, compress=(0.75, 0.85),
                        pair_distances=(1.0, 1.4, 1.9, 2.6, 3.6, 5.2), mode_amplitudes=(-0.35, 0.35, 0.6),
                        molecules=("H2", "CO", "C2H4", "C2H2", "CH3OCH3", "H2O2", "OH")),
}


def build_probes(molecule: Atoms, calc, *, max_distance: float = 6.0, n_md: int = 20, md_temperature: float = 300.0,
                 hot_temperature: float = 1200.0, n_soft_modes: int = 3, n_stiff_modes: int = 2, seed: int = 0,
                 with_md: bool = True, split: str = "test", molecules: Sequence[str] | None = None) -> list[Probe]:
    """Every kind of probe around ``molecule``; MD and normal modes are driven by ``calc``.

    ``split`` picks the settings of :data:`SPLITS`; ``molecules`` replaces its small molecules
    (by default those made only of ``molecule``'s elements are kept).
    """
    opts = SPLITS[split]
    elements = set(molecule.get_chemical_symbols())
    names = opts["molecules"] if molecules is None else molecules
    probes = bond_scans(molecule, max_distance=max_distance, n_stretch=opts["n_stretch"],
                        compress=opts["compress"], first_stretch=opts["first_stretch"])
    probes += atom_pairs(set(molecule.numbers), opts["pair_distances"])
    probes += small_molecules([n for n in names if molecules is not None or _made_of(n, elements)])
    probes += normal_mode_scans(molecule, calc, n_soft_modes, n_stiff_modes, opts["mode_amplitudes"])
    probes += md_frames(molecule, calc, hot_temperature, n_md, seed=seed + 1, kind="hot_md")
    if with_md:
        probes += md_frames(molecule, calc, md_temperature, n_md, seed=seed, kind="md")
    return [p for p in probes if sound(p)]


def _made_of(name: str, elements: set[str]) -> bool:
    from ase.build import molecule

    return set(molecule(name).get_chemical_symbols()) <= elements


def _key(probe: Probe) -> str:
    return f"{probe.kind}|{probe.scan}|{probe.coordinate:.6f}"


def label(probes: Sequence[Probe], reference: Reference, cache: str | Path | None = None) -> list[Scored]:
    """Reference energies and forces for ``probes``; a probe for which every reference
    calculator fails is left out (and logged). With ``cache`` (an extxyz file), labels of probes already there
    (same kind, scan, coordinate and positions to 1e-6 Å) are reused and new ones added."""
    from ase.io import read

    known: dict[str, Atoms] = {}
    if cache is not None and Path(cache).exists():
        known = {a.info["stress_key"]: a for a in read(cache, ":")}
    scored, new = [], 0
    for probe in probes:
        hit = known.get(_key(probe))
        if hit is not None and len(hit) == len(probe.atoms) and np.allclose(hit.positions, probe.atoms.positions, atol=1e-6):
            scored.append(Scored(probe, float(hit.info["REF_energy"]), np.array(hit.arrays["REF_forces"])))
            continue
        labels = _reference_labels(probe, reference)
        if labels is None:
            continue
        energy, forces, attempt = labels
        scored.append(Scored(probe, energy, forces))
        record = probe.atoms.copy()
        record.info.update(stress_key=_key(probe), REF_energy=energy, reference_attempt=attempt)
        record.arrays["REF_forces"] = forces
        known[_key(probe)] = record
        new += 1
        if cache is not None:  # after every call: a killed run loses at most one label
            write_structures(cache, known.values())
    log.info("labelled %d probes (%d new reference calls)", len(scored), new)
    return scored


def _reference_labels(probe: Probe, reference: Reference):
    """(energy, forces, which calculator gave them) from the first calculator that succeeds with
    finite labels, or None. ``reference`` is a calculator, or a function of the atoms giving a
    calculator or a list of them to try in turn (e.g. a singlet, then a triplet SCF)."""
    candidates = reference(probe.atoms.copy()) if callable(reference) and not hasattr(reference, "calculate") else reference
    candidates = list(candidates) if isinstance(candidates, (list, tuple)) else [candidates]
    for attempt, calc in enumerate(candidates):
        work = probe.atoms.copy()
        work.calc = calc
        try:
            energy, forces = float(work.get_potential_energy()), np.array(work.get_forces(), dtype=np.float64)
        except Exception as err:  # noqa: BLE001  a reference may fail in any way (an SCF that does not converge)
            log.warning("reference %d failed on %s at %.3f: %s", attempt, probe.scan, probe.coordinate, err)
            continue
        if math.isfinite(energy) and np.isfinite(forces).all():
            return energy, forces, attempt
        log.warning("reference %d gave non-finite labels on %s at %.3f", attempt, probe.scan, probe.coordinate)
    return None


def predict(scored: Sequence[Scored], calc) -> None:
    """Fill in the model's energy, σ_E, ``max_forces_std`` and forces (in place)."""
    for s in scored:
        atoms = s.probe.atoms.copy()
        atoms.calc = calc
        s.energy = float(atoms.get_potential_energy())
        s.energy_std = float(calc.get_property(K.ENERGY_STD, atoms))
        s.max_forces_std = float(calc.get_property(K.MAX_FORCES_STD, atoms))
        s.forces = np.array(atoms.get_forces())


#: kinds built by moving the molecule's own atoms: the only ones that can be in range
IN_RANGE_KINDS = ("bond_stretch", "bond_compress", "normal_mode", "hot_md")


def mark_in_range(scored: Sequence[Scored], molecule: Atoms, reference_frames: Sequence[Atoms]) -> None:
    """Set ``in_range`` for every probe (see the module docstring for the rule)."""
    def kind(atoms, i, j):
        return tuple(sorted((int(atoms.numbers[i]), int(atoms.numbers[j]))))

    ranges: dict[tuple[int, int], tuple[float, float]] = {}
    if reference_frames:
        first = reference_frames[0]
        ref_pairs = bonds(first)  # the frames of one data set share their atom order
        for atoms in reference_frames:
            if not np.array_equal(atoms.numbers, first.numbers):
                ref_pairs = bonds(atoms)
            for i, j in ref_pairs:
                d, key = atoms.get_distance(i, j), kind(atoms, i, j)
                lo, hi = ranges.get(key, (math.inf, -math.inf))
                ranges[key] = (min(lo, d), max(hi, d))
    pairs = bonds(molecule)
    composition = sorted(molecule.numbers)
    for s in scored:
        atoms = s.probe.atoms
        built_from_molecule = s.probe.kind in IN_RANGE_KINDS and np.array_equal(atoms.numbers, molecule.numbers)
        if not ranges or not (built_from_molecule or (s.probe.kind == "md" and sorted(atoms.numbers) == composition)):
            s.in_range = False  # other compositions, atom pairs, small molecules (even isomers)
            continue
        inside = []
        # in-distribution frames may order their atoms otherwise: their own bonds; probes were
        # built from the molecule (and may have a bond pulled apart): the molecule's
        for i, j in (bonds(atoms) if s.probe.kind == "md" else pairs):
            lo, hi = ranges.get(kind(atoms, i, j), (math.inf, -math.inf))
            inside.append(lo <= atoms.get_distance(i, j) <= hi)
        s.in_range = all(inside)


def _metrics(rows: Sequence[Scored], negatives: Sequence[Scored]) -> dict:
    e = np.array([r.energy_ref - r.energy for r in rows])
    std = np.array([r.energy_std for r in rows])
    z2 = e**2 / np.maximum(std, 1e-300) ** 2
    out = {
        "n": len(rows),
        "n_out_of_range": sum(not r.in_range for r in rows),
        "energy_mae": float(np.mean(np.abs(e))),
        "forces_mae": float(np.mean(np.concatenate([np.abs(r.forces_ref - r.forces).ravel() for r in rows]))),
        "coverage_1sigma": float(np.mean(np.abs(e) <= std)),
        "coverage_2sigma": float(np.mean(np.abs(e) <= 2 * std)),
        "z2_mean": float(np.mean(z2)),
        "z2_median": float(np.median(z2)),
        "spearman": spearman(np.abs(e), std) if len(rows) > 2 else math.nan,
    }
    outside = [r for r in rows if not r.in_range]
    if outside and negatives:
        out["auroc_energy_std"] = auroc([r.energy_std for r in negatives], [r.energy_std for r in outside])
        out["auroc_max_forces_std"] = auroc([r.max_forces_std for r in negatives], [r.max_forces_std for r in outside])
    return out


def score(scored: Sequence[Scored], negatives: Sequence[Scored]) -> dict:
    """The report: per kind, the pooled off-distribution row, and the per-scan monotonicity."""
    report: dict = {"kinds": {}, "scans": {}}
    for kind in KINDS:
        rows = [s for s in scored if s.probe.kind == kind]
        if kind == "md":
            rows = list(negatives)
        if rows:
            report["kinds"][kind] = _metrics(rows, negatives if kind != "md" else [])
    outside = [s for s in scored if s.probe.kind != "md" and not s.in_range]
    if outside:
        report["off_distribution"] = _metrics(outside, negatives)
    for scan in dict.fromkeys(s.probe.scan for s in scored if s.probe.kind == "bond_stretch"):
        rows = sorted((s for s in scored if s.probe.scan == scan and s.probe.kind == "bond_stretch"),
                      key=lambda s: s.probe.coordinate)
        r = [s.probe.coordinate for s in rows]
        report["scans"][scan] = {
            "spearman_energy_std_vs_length": spearman(r, [s.energy_std for s in rows]),
            "spearman_max_forces_std_vs_length": spearman(r, [s.max_forces_std for s in rows]),
            "max_abs_error": float(max(abs(s.energy_ref - s.energy) for s in rows)),
        }
    return report


def stress_test(calc, molecule: Atoms, reference: Reference, *, in_distribution: Sequence[Atoms] | None = None,
                cache: str | Path | None = None, driver=None, relax_fmax: float | None = 0.01,
                **probe_options) -> tuple[dict, list[Scored]]:
    """Build, label, predict and score the probes of ``molecule`` for the model behind ``calc``.

    Args:
        calc: the model's :class:`~ase_race.calculator.RACECalculator` (it also drives the MD
            and gives the normal modes).
        molecule: the structure to probe, ideally a minimum of the model.
        reference: the labelling calculator, or a function atoms → calculator.
        in_distribution: labelled frames like the training data (``REF_energy`` /
            ``REF_forces`` or a calculator's values), e.g. the model's test set; they are the
            negatives for AUROC and define the in-range bond lengths. Without them, ``md``
            frames at room temperature are generated with the model and labelled.
        cache: an extxyz file keeping the reference labels across runs.
        driver: the calculator that relaxes the molecule, drives the MD and gives the normal
            modes (default ``calc``); one driver for several models gives them the same probes
            (and one set of reference labels).
        relax_fmax: relax ``molecule`` with the driver to this force (eV/Å) first; None: as given.
        probe_options: passed to :func:`build_probes`.
    Returns:
        (report, scored probes).
    """
    driver = driver or calc
    if relax_fmax is not None:
        from ase.optimize import BFGS

        molecule = molecule.copy()
        molecule.calc = driver
        BFGS(molecule, logfile=None).run(fmax=relax_fmax, steps=500)
        molecule.calc = None
    probes = build_probes(molecule, driver, with_md=in_distribution is None, **probe_options)
    return score_model(calc, label(probes, reference, cache), in_distribution, molecule)


def score_model(calc, scored: Sequence[Scored], in_distribution: Sequence[Atoms] | None,
                molecule: Atoms) -> tuple[dict, list[Scored]]:
    """Predict labelled probes (in place) with ``calc`` and score them (:func:`score`).

    ``in_distribution``: labelled frames added as the ``md`` negatives (else the ``md`` probes
    among ``scored`` are); ``molecule`` names the bonds of the in-range rule.
    Returns (report, the scored probes with the negatives).
    """
    from ..data.readers import frame_from_atoms

    scored = [s for s in scored if in_distribution is None or s.probe.kind != "md"]
    for k, atoms in enumerate(in_distribution or ()):
        frame = frame_from_atoms(atoms, source=f"in-distribution frame {k}")
        scored.append(Scored(Probe(frame.atoms, "md", "in-distribution frames", float(k)), frame.energy, frame.forces))
    predict(scored, calc)
    negatives = [s for s in scored if s.probe.kind == "md"]
    mark_in_range(scored, molecule, [s.probe.atoms for s in negatives])
    return score(scored, negatives), scored


def read_labelled(path: str | Path) -> list[Scored]:
    """The labelled probes of a label file written by :func:`label` (kind, scan and coordinate
    from each structure's ``stress_key``), not yet predicted."""
    from ase.io import read

    out = []
    for atoms in read(path, ":"):
        kind, scan, coordinate = atoms.info["stress_key"].split("|")
        energy, forces = float(atoms.info["REF_energy"]), np.array(atoms.arrays["REF_forces"])
        probe_atoms = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
        out.append(Scored(Probe(probe_atoms, kind, scan, float(coordinate)), energy, forces))
    return out


COLUMNS = (("n", "n", "{:d}"), ("n_out_of_range", "out", "{:d}"), ("energy_mae", "E MAE/eV", "{:.4f}"),
           ("forces_mae", "F MAE", "{:.3f}"), ("coverage_1sigma", "cov1σ", "{:.2f}"), ("coverage_2sigma", "cov2σ", "{:.2f}"),
           ("z2_mean", "z² mean", "{:.3g}"), ("z2_median", "z² med", "{:.3g}"), ("spearman", "ρ", "{:.2f}"),
           ("auroc_energy_std", "AUROC σE", "{:.2f}"), ("auroc_max_forces_std", "AUROC maxFσ", "{:.2f}"))


def format_report(report: dict) -> str:
    """The report as a text table (a row per kind, then the pooled row and the scans)."""
    widths = [max(len(title), 8) for _, title, _ in COLUMNS]
    lines = [f"{'kind':<17}" + " ".join(f"{t:>{w}}" for (_, t, _), w in zip(COLUMNS, widths))]
    rows = list(report["kinds"].items()) + ([("off_distribution", report["off_distribution"])] if "off_distribution" in report else [])
    for name, m in rows:
        cells = [fmt.format(m[key]) if key in m and not (isinstance(m[key], float) and math.isnan(m[key])) else "–"
                 for key, _, fmt in COLUMNS]
        lines.append(f"{name:<17}" + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    for scan, m in report["scans"].items():
        lines.append(f"pulled {scan}: ρ(σE, r) {m['spearman_energy_std_vs_length']:.2f}, "
                     f"ρ(maxFσ, r) {m['spearman_max_forces_std_vs_length']:.2f}, max |error| {m['max_abs_error']:.3f} eV")
    return "\n".join(lines)


def write_report(report: dict, scored: Sequence[Scored], out_dir: str | Path) -> list[Path]:
    """``stress_test.json``, ``stress_test.txt`` and ``stress_test.png`` (|error| and σ_E along
    every scan) in ``out_dir``."""
    from matplotlib.figure import Figure

    from ..evaluation.plotting import plain_ticks

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "stress_test.json", out / "stress_test.txt", out / "stress_test.png"]
    atomic_write_text(paths[0], json.dumps(report, indent=2))
    atomic_write_text(paths[1], format_report(report) + "\n")
    scans = list(dict.fromkeys(s.probe.scan for s in scored if s.probe.kind in ("bond_stretch", "bond_compress", "atom_pair", "normal_mode")))
    cols = 4
    fig = Figure(figsize=(3.2 * cols, 2.6 * max(1, math.ceil(len(scans) / cols))))
    for k, scan in enumerate(scans):
        ax = fig.add_subplot(max(1, math.ceil(len(scans) / cols)), cols, k + 1)
        rows = sorted((s for s in scored if s.probe.scan == scan), key=lambda s: s.probe.coordinate)
        x = [s.probe.coordinate for s in rows]
        ax.semilogy(x, [max(abs(s.energy_ref - s.energy), 1e-6) for s in rows], "o-", ms=3, label="|error|")
        ax.semilogy(x, [max(s.energy_std, 1e-6) for s in rows], "s--", ms=3, label="σ_E")
        ax.set_title(scan, fontsize=7)
        ax.set_xlabel("amplitude / Å" if rows[0].probe.kind == "normal_mode" else "distance / Å", fontsize=7)
        ax.tick_params(labelsize=6)
        plain_ticks(ax)
        if k == 0:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    return paths
