"""FallbackCalculator with a real (cheap) reference: EMT."""

import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.io import read

from ase_race.calculator.fallback import FallbackCalculator, LabelledFrames
from ase_race.errors import RaceError
from ase_race.testing import random_posterior


class Flaky(EMT):
    """EMT that raises on chosen calls."""

    def __init__(self, fail_on=()):
        super().__init__()
        self.fail_on, self.count = set(fail_on), 0

    def calculate(self, *args, **kwargs):
        self.count += 1
        if self.count in self.fail_on:
            raise RuntimeError("SCF did not converge")
        super().calculate(*args, **kwargs)


@pytest.fixture(scope="module")
def model():
    return random_posterior("tiny", seed=4, species=(1, 6, 8), scale=2.0, dtype="float64")


def trajectory(n=8):
    """Ethanol frames that drift further from the start (growing distortions)."""
    frames = []
    for k in range(n):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(0.01 + 0.03 * k, seed=k)
        frames.append(atoms)
    return frames


def run(calc, frames):
    values, used = [], []
    for atoms in frames:
        atoms.calc = calc
        atoms.get_potential_energy()
        values.append(calc.results["max_forces_std"])
        used.append(calc.results["fallback_used"])
    return np.array(values), used


def test_reference_called_exactly_above_threshold(model, tmp_path):
    frames = trajectory()
    probe = FallbackCalculator(model, EMT(), threshold=np.inf)
    values, _ = run(probe, [f.copy() for f in frames])
    threshold = float(np.median(values))
    calc = FallbackCalculator(model, EMT(), threshold=threshold, dataset=tmp_path / "ref.extxyz")
    _, used = run(calc, frames)
    assert used == list(values > threshold)
    saved = read(tmp_path / "ref.extxyz", ":")
    assert len(saved) == int((values > threshold).sum()) == calc.n_reference
    for atoms in saved:  # the labels are EMT's (positions are stored to 1e-8 Å)
        ref = atoms.copy()
        ref.calc = EMT()
        assert atoms.info["REF_energy"] == pytest.approx(ref.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(atoms.arrays["REF_forces"], ref.get_forces(), atol=1e-5)
        assert atoms.info["race_max_forces_std"] > threshold and "max_forces_std" in atoms.info["fallback_reason"]
    # On a reference step the reported energy and forces are the reference's.
    atoms = frames[int(np.argmax(values))]
    ref = atoms.copy()
    ref.calc = EMT()
    assert atoms.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-12)
    np.testing.assert_allclose(atoms.get_forces(), ref.get_forces(), atol=1e-12)


def test_spacing_and_budget(model):
    frames = trajectory(8)
    calc = FallbackCalculator(model, EMT(), threshold=0.0, min_interval=2)
    _, used = run(calc, frames)
    assert used == [True, False, False, True, False, False, True, False]
    calc = FallbackCalculator(model, EMT(), threshold=0.0, budget=3)
    _, used = run(calc, trajectory(8))
    assert sum(used) == 3 and used[:3] == [True, True, True]


def test_failing_reference_policies(model, tmp_path):
    calc = FallbackCalculator(model, Flaky(fail_on={2}), threshold=0.0, dataset=tmp_path / "d.extxyz")
    _, used = run(calc, trajectory(3))
    assert used == [True, False, True] and calc.n_failures == 1
    assert len(read(tmp_path / "d.extxyz", ":")) == 2
    assert "reference failed" in calc.events[1][2]
    retry = FallbackCalculator(model, Flaky(fail_on={1}), threshold=0.0, on_failure="retry", retries=1)
    _, used = run(retry, trajectory(1))
    assert used == [True] and retry.n_failures == 1
    stop = FallbackCalculator(model, Flaky(fail_on={1}), threshold=0.0, on_failure="stop")
    with pytest.raises(RaceError, match="reference calculator failed"):
        run(stop, trajectory(1))


def test_restart_neither_loses_nor_duplicates(model, tmp_path):
    path = tmp_path / "collected.extxyz"
    frames = trajectory(4)
    run(FallbackCalculator(model, EMT(), threshold=0.0, dataset=path), [f.copy() for f in frames[:3]])
    assert len(read(path, ":")) == 3
    # The restarted run replays the same structures and goes one further.
    run(FallbackCalculator(model, EMT(), threshold=0.0, dataset=path), [f.copy() for f in frames])
    saved = read(path, ":")
    assert len(saved) == 4 and len(LabelledFrames(path)) == 4
    # No temporary files are left behind (the writers' lock file stays, hidden).
    assert sorted(p.name for p in tmp_path.iterdir()) == [".collected.extxyz.lock", "collected.extxyz"]


class Counting(EMT):
    """EMT that counts its calculations."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.count = 0

    def calculate(self, *args, **kwargs):
        self.count += 1
        super().calculate(*args, **kwargs)


def test_a_restarted_run_reuses_its_labels_and_keeps_its_budget(model, tmp_path):
    path = tmp_path / "collected.extxyz"
    frames = trajectory(6)
    first_ref = Counting()
    first = FallbackCalculator(model, first_ref, threshold=0.0, dataset=path, budget=4)
    run(first, [f.copy() for f in frames[:3]])  # killed after three calls
    assert first_ref.count == 3
    # Another reference (here: the same class with other settings) never takes those labels.
    shared = tmp_path / "shared.extxyz"
    shared.write_bytes(path.read_bytes())
    other_ref = Counting(asap_cutoff=True)
    other = FallbackCalculator(model, other_ref, threshold=0.0, dataset=shared, budget=4)
    run(other, [f.copy() for f in frames[:3]])
    assert other_ref.count == 3 and other.n_reused == 0
    energies = [first.results["energy"]]
    # The restart retraces the same structures: labels come from the file, not the reference,
    # and count against the budget as the original calls did.
    ref = Counting()
    restarted = FallbackCalculator(model, ref, threshold=0.0, dataset=path, budget=4)
    replayed = []
    for atoms in [f.copy() for f in frames]:
        atoms.calc = restarted
        replayed.append(atoms.get_potential_energy())
    assert ref.count == 1  # only the fourth structure is new; then the budget of 4 is spent
    assert (restarted.n_reference, restarted.n_reused) == (4, 3)
    assert [e for _, _, e in restarted.events] == ["reference"] * 4 + ["model (budget exhausted)"] * 2
    assert replayed[2] == pytest.approx(energies[0], abs=1e-6)  # the stored label of the third step
    reference = frames[2].copy()
    reference.calc = EMT()
    assert replayed[2] == pytest.approx(reference.get_potential_energy(), abs=1e-6)
    assert len(read(path, ":")) == 4


def test_md_stop_observer_stops_at_the_first_step_above_threshold(model):
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from ase_race.calculator import RACECalculator, UncertaintyExceeded, UncertaintyLog, UncertaintyStop

    def md(stop=None):
        atoms = molecule("CH3CH2OH")
        atoms.set_velocities(np.random.default_rng(0).normal(0, 0.05, (9, 3)))
        atoms.calc = RACECalculator(model)
        dyn = VelocityVerlet(atoms, 0.5 * units.fs)
        log = UncertaintyLog(atoms, dyn)
        dyn.attach(log, interval=1)
        if stop is not None:
            dyn.attach(UncertaintyStop(atoms, stop, dynamics=dyn), interval=1)
        try:
            dyn.run(30)
        except UncertaintyExceeded as exc:
            return log.rows, exc
        return log.rows, None

    rows, _ = md()
    values = np.array([r["max_forces_std"] for r in rows])
    threshold = float(np.quantile(values, 0.6))
    first = int(np.argmax(values > threshold))
    rows, exc = md(threshold)
    assert exc is not None and exc.step == rows[first]["step"] == first
    assert exc.value == pytest.approx(values[first]) and len(rows) == first + 1


def test_pyscf_reference_forces_are_the_energy_gradient():
    pytest.importorskip("pyscf")
    from ase import Atoms

    from ase_race.calculator.pyscf_ref import PySCFCalculator
    from ase_race.testing import finite_difference_forces

    atoms = Atoms("OH2", positions=[[0.0, 0.0, 0.1], [0.0, 0.76, -0.5], [0.0, -0.8, -0.45]])
    atoms.calc = PySCFCalculator(xc="PBE", basis="sto-3g", density_fit=True)
    forces = atoms.get_forces()
    np.testing.assert_allclose(forces, finite_difference_forces(atoms, delta=1e-3), atol=2e-3)
    # Hartree → eV: the PBE/STO-3G energy of water is about −75.2 Ha.
    assert atoms.get_potential_energy() == pytest.approx(-75.2 * 27.2114, rel=0.01)
    periodic = atoms.copy()
    periodic.pbc, periodic.cell = True, [10, 10, 10]
    periodic.calc = PySCFCalculator(basis="sto-3g")
    with pytest.raises(Exception, match="molecules only"):
        periodic.get_potential_energy()


def test_reopened_dataset_recognises_every_frame_it_holds(tmp_path):
    # extxyz keeps 8 decimals; keys recomputed from the file would round differently for some
    # frames, so the store keeps each frame's key with it.
    frames = []
    for k in range(60):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(0.1, seed=k)
        frames.append(atoms)
    store = LabelledFrames(tmp_path / "d.extxyz")
    assert all(store.append(f) for f in frames)
    reopened = LabelledFrames(tmp_path / "d.extxyz")
    assert len(reopened) == 60 and not any(reopened.append(f) for f in frames)


def test_retraining_moves_the_model_towards_the_reference(model):
    from ase_race.training.finetune import retrainer

    frames = trajectory(4)

    def error(calc, atoms):
        a = atoms.copy()
        a.calc = calc.model
        ref = atoms.copy()
        ref.calc = EMT()
        return abs(a.get_potential_energy() - ref.get_potential_energy())

    calc = FallbackCalculator(model, EMT(), threshold=0.0, retrain_every=2, retrain=retrainer(epochs=60, lr=1e-2, ema_decay=0.0))
    before = [error(calc, f) for f in frames[:2]]
    run(calc, frames[:2])
    assert calc.n_retrains == 1 and len(calc.collected) == 2
    after = [error(calc, f) for f in frames[:2]]
    assert sum(after) < 0.3 * sum(before)  # the model learnt the reference labels it collected
    with pytest.raises(ValueError, match="retrain"):
        FallbackCalculator(model, EMT(), threshold=0.0, retrain_every=2)


def test_a_diverged_retraining_keeps_the_model_and_the_run_going(model, tmp_path, caplog):
    from ase_race.errors import TrainingError

    attempts = []

    def diverging(bundle, atoms_list):
        attempts.append(len(atoms_list))
        raise TrainingError("loss is NaN at epoch 3")

    calc = FallbackCalculator(model, EMT(), threshold=0.0, dataset=tmp_path / "d.extxyz", retrain_every=2,
                              retrain=diverging)
    bundle = calc.model.bundle
    with caplog.at_level("WARNING", logger="ase_race"):
        run(calc, trajectory(4))
    assert attempts == [2, 4] and calc.n_retrain_failures == 2 and calc.n_retrains == 0
    assert calc.model.bundle is bundle and len(LabelledFrames(tmp_path / "d.extxyz")) == 4
    assert "retraining on 2 reference frames failed" in caplog.text


def test_verify_checks_a_geometry_with_the_reference(model, tmp_path):
    atoms = molecule("CH3CH2OH")
    emt = atoms.copy()
    emt.calc = EMT()
    ref_fmax = float(np.sqrt((emt.get_forces() ** 2).sum(axis=1)).max())
    calc = FallbackCalculator(model, EMT(), threshold=np.inf, dataset=tmp_path / "ref.extxyz", budget=0)
    below, above = calc.verify(atoms, fmax=0.5 * ref_fmax), calc.verify(atoms, fmax=2 * ref_fmax)
    # A deliberate check: called although the budget is 0 and nothing is uncertain.
    assert below.reference_fmax == pytest.approx(ref_fmax) and not below.converged and above.converged
    assert below.reference_energy == pytest.approx(emt.get_potential_energy())
    model_atoms = atoms.copy()
    model_atoms.calc = calc.model
    assert below.max_force_error == pytest.approx(np.abs(model_atoms.get_forces() - emt.get_forces()).max())
    frames = read(tmp_path / "ref.extxyz", ":")
    assert len(frames) == 1 and frames[0].info["fallback_reason"] == "verify"  # same structure: stored once
    with pytest.raises(RaceError, match="while verifying the final geometry"):
        FallbackCalculator(model, Flaky(fail_on=[1]), threshold=np.inf).verify(atoms, fmax=1.0)


def test_a_nan_model_falls_back_and_a_nan_reference_is_never_a_label(model, tmp_path):
    import math

    import torch
    from ase.calculators.calculator import Calculator

    from ase_race.calculator import RACECalculator
    from ase_race.errors import PredictionError

    broken = RACECalculator(model)
    with torch.no_grad():
        for p in broken.posterior.networks()[0].parameters():
            p.fill_(math.nan)
    atoms = molecule("CH4")
    atoms.calc = FallbackCalculator(broken, EMT(), threshold=1e9, dataset=tmp_path / "d.extxyz")
    reference = EMT().get_potential_energy(molecule("CH4"))
    assert atoms.get_potential_energy() == pytest.approx(reference)  # NaN counts as unsure, whatever the threshold
    assert atoms.calc.results["fallback_used"]
    atoms.calc = FallbackCalculator(broken, EMT(), threshold=1e9, budget=0)
    with pytest.raises(PredictionError):  # no reference allowed: an error, never NaN results
        atoms.get_potential_energy()

    class NaNReference(Calculator):
        implemented_properties = ("energy", "forces")

        def calculate(self, atoms=None, properties=("energy",), system_changes=()):
            super().calculate(atoms, properties, system_changes)
            self.results = {"energy": math.nan, "forces": np.zeros((len(atoms), 3))}

    fallback = FallbackCalculator(model, NaNReference(), threshold=-1.0, dataset=tmp_path / "nan.extxyz")
    atoms = molecule("CH4")
    atoms.calc = fallback
    atoms.get_potential_energy()
    assert fallback.n_failures == 1 and fallback.n_reference == 0 and not fallback.results["fallback_used"]
    assert not (tmp_path / "nan.extxyz").exists() or len(read(tmp_path / "nan.extxyz", ":")) == 0
