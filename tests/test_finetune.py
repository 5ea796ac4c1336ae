"""fine_tune: the fallback loop's retraining step, with and without rehearsal of earlier data."""

import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.emt import EMT

from ase_race.data.readers import frame_from_atoms
from ase_race.posteriors import EnsemblePosterior
from ase_race.testing import random_posterior
from ase_race.training import finetune
from ase_race.training.finetune import fine_tune


def emt_frames(n, rattle, seed):
    frames = []
    for k in range(n):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(rattle, seed=seed + k)
        atoms.calc = EMT()
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces()
        atoms.calc = None
        frames.append(frame_from_atoms(atoms))
    return frames


def force_error(posterior, frames):
    from ase_race.calculator import RACECalculator

    calc = RACECalculator(posterior)
    errors = []
    for f in frames:
        atoms = f.atoms.copy()
        atoms.calc = calc
        errors.append(np.abs(atoms.get_forces() - f.forces).mean())
    return float(np.mean(errors))


def test_rehearsal_keeps_what_the_model_knew():
    old, new = emt_frames(6, 0.05, seed=0), emt_frames(2, 0.25, seed=100)
    start = random_posterior("tiny", seed=3, species=(1, 6, 8), scale=2.0, dtype="float64")
    settings = dict(epochs=40, lr=1e-2, loss="mse", ema_decay=0.0)  # raw iterates: the rehearsal alone
    known = fine_tune(start, old, **settings)
    forgetful = fine_tune(known, new, **settings)
    rehearsed = fine_tune(known, new, replay=old, **settings)
    # Both learn the new structures…
    assert force_error(forgetful, new) < 0.5 * force_error(known, new)
    assert force_error(rehearsed, new) < 0.5 * force_error(known, new)
    # …but only the rehearsed one still knows the old ones.
    assert force_error(forgetful, old) > 1.3 * force_error(known, old)
    assert force_error(rehearsed, old) < 0.8 * force_error(forgetful, old)


def test_each_member_rehearses_its_own_sample(monkeypatch):
    seen = []

    class Spy(finetune.GraphDataset):
        def __init__(self, frames, *args):
            seen.append([f.source for f in frames])
            super().__init__(frames, *args)

    monkeypatch.setattr(finetune, "GraphDataset", Spy)
    old, new = emt_frames(6, 0.05, seed=0), emt_frames(1, 0.2, seed=100)
    for k, f in enumerate(old):
        f.source = f"old {k}"
    new[0].source = "new"
    members = [random_posterior("tiny", seed=s, species=(1, 6, 8), dtype="float64").model for s in (1, 2)]
    tuned = fine_tune(EnsemblePosterior(members), new, epochs=1, replay=old, replay_size=3, seed=5)
    assert isinstance(tuned, EnsemblePosterior) and len(tuned.members) == 2
    assert [len(s) for s in seen] == [4, 4]
    assert all(s[0] == "new" and len(set(s[1:])) == 3 and all(x.startswith("old") for x in s[1:]) for s in seen)
    assert seen[0][1:] != seen[1][1:]  # members draw different rehearsal samples
    first = list(seen)
    seen.clear()
    fine_tune(EnsemblePosterior(members), new, epochs=1, replay=old, replay_size=3, seed=5)
    assert seen == first  # the same samples for the same seed


def test_retrainer_refits_the_calibration_on_held_out_frames():
    from ase_race.modelfile import Calibration, ModelBundle
    from ase_race.training.assess import calibrate, gather
    from ase_race.training.finetune import retrainer

    collected = []
    for f in emt_frames(2, 0.2, seed=50):
        atoms = f.atoms.copy()
        atoms.info["REF_energy"], atoms.arrays["REF_forces"] = f.energy, f.forces
        collected.append(atoms)
    held_out = emt_frames(4, 0.1, seed=70)
    shipped = Calibration(energy_var_scale=7.0, forces_var_scale=3.0, stress_var_scale=5.0)
    bundle = ModelBundle(random_posterior("tiny", seed=3, species=(1, 6, 8), scale=2.0, dtype="float64"), shipped)

    kept = retrainer(epochs=2, lr=1e-3)(bundle, collected)
    assert kept.calibration == shipped and kept.posterior is not bundle.posterior

    refit = retrainer(epochs=2, lr=1e-3, calibrate_on=held_out)(bundle, collected)
    expected = calibrate(ModelBundle(refit.posterior), held_out)
    assert refit.calibration.energy_var_scale == expected.energy_var_scale != shipped.energy_var_scale
    assert refit.calibration.forces_var_scale == expected.forces_var_scale != shipped.forces_var_scale
    assert refit.calibration.stress_var_scale == 5.0  # not fitted on molecules: kept
    # Calibrated this way, the held-out frames' mean squared standardised error is 1 (NLL-optimal).
    g = gather(refit, held_out)
    assert np.mean((g.energy_ref - g.energy_pred) ** 2 / g.energy_var["total"]) == pytest.approx(1.0)
    assert np.mean(g.forces_mahalanobis) / 3 == pytest.approx(1.0)


def isolated_hydrogen():
    from ase import Atoms

    atom = Atoms("H", positions=[[0.0, 0.0, 0.0]])
    atom.info.update(config_type="IsolatedAtom", REF_energy=-13.6)
    frame = frame_from_atoms(atom)
    assert frame.is_isolated_atom
    return frame


def test_isolated_atom_frames_are_left_out_of_rehearsal_and_recalibration(monkeypatch):
    """E0 references (no forces) in a training file must not break the fallback's retraining."""
    from ase_race.modelfile import Calibration, ModelBundle
    from ase_race.training.finetune import retrainer

    seen = []

    class Spy(finetune.GraphDataset):
        def __init__(self, frames, *args):
            seen.append(len(frames))
            super().__init__(frames, *args)

    monkeypatch.setattr(finetune, "GraphDataset", Spy)
    old, new = emt_frames(3, 0.05, seed=0), emt_frames(1, 0.2, seed=100)
    start = random_posterior("tiny", seed=3, species=(1, 6, 8), dtype="float64")
    fine_tune(start, new, epochs=1, replay=[isolated_hydrogen(), *old])
    assert seen == [4]  # 1 new + 3 rehearsed; the isolated atom is not among them

    collected = []
    for f in new:
        atoms = f.atoms.copy()
        atoms.info["REF_energy"], atoms.arrays["REF_forces"] = f.energy, f.forces
        collected.append(atoms)
    bundle = ModelBundle(start, Calibration())
    with_atom = retrainer(epochs=1, seed=4, calibrate_on=[isolated_hydrogen(), *old])(bundle, collected)
    without = retrainer(epochs=1, seed=4, calibrate_on=old)(bundle, collected)
    assert with_atom.calibration == without.calibration


def test_no_epochs_or_no_frames_leave_the_posterior_alone():
    start = random_posterior("tiny", seed=3, species=(1, 6, 8), dtype="float64")
    assert fine_tune(start, emt_frames(1, 0.1, seed=0), epochs=0) is start
    assert fine_tune(start, [], epochs=5) is start


def test_ema_horizon_is_capped_at_half_the_steps(monkeypatch):
    decays = []

    class Seen(Exception):
        pass

    class Spy(finetune.Trainer):
        def __init__(self, config, *args, **kwargs):
            decays.append(config.ema_decay)
            raise Seen  # the decay is all this test needs: no training

    monkeypatch.setattr(finetune, "Trainer", Spy)
    start = random_posterior("tiny", seed=3, species=(1, 6, 8), dtype="float64")
    frames = emt_frames(1, 0.1, seed=0)
    for epochs in (5, 250):  # 5 steps: horizon 1/(1 − d) = 2.5; 250: the cap 1 − 2/250 is above 0.99
        with pytest.raises(Seen):
            fine_tune(start, frames, epochs=epochs, ema_decay=0.99)
    assert decays == [pytest.approx(0.6), 0.99]


def test_each_retraining_draws_a_new_seed(monkeypatch):
    from ase_race.modelfile import Calibration, ModelBundle
    from ase_race.training.finetune import retrainer

    seeds = []
    monkeypatch.setattr(finetune, "fine_tune", lambda posterior, frames, seed, **kw: seeds.append(seed) or posterior)
    bundle = ModelBundle(random_posterior("tiny", seed=3, species=(1, 6, 8), dtype="float64"), Calibration())
    retrain = retrainer(epochs=1, seed=7)
    atoms = emt_frames(1, 0.1, seed=0)[0].atoms.copy()
    atoms.info["REF_energy"], atoms.arrays["REF_forces"] = -1.0, atoms.positions * 0.0
    retrain(bundle, [atoms])
    retrain(bundle, [atoms])
    assert len(set(seeds)) == 2
