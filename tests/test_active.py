"""Acquisition: expected indices on hand-built pools."""

import numpy as np
import pytest
from ase.build import molecule

from ase_race.active import acquisition_scores, select
from ase_race.active.acquisition import rdf_descriptor
from ase_race.calculator import RACECalculator
from ase_race.posteriors import EnsemblePosterior
from ase_race.testing import random_posterior


def test_top_n_and_diversity_on_a_hand_built_pool():
    scores = [0.1, 0.9, 0.85, 0.3, 0.8]
    assert select(scores, 3) == [1, 2, 4]
    # Structures 1 and 2 are near-duplicates (same descriptor); 4 is different.
    desc = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.001], [5.0, 5.0], [0.0, 5.0]])
    assert select(scores, 2) == [1, 2]
    assert select(scores, 2, diversity=10.0, descriptors=desc) == [1, 4]
    assert select(scores, 10) == [1, 2, 4, 3, 0]  # n larger than the pool: everything, ranked
    with pytest.raises(ValueError, match="descriptors"):
        select(scores, 2, diversity=1.0)


def test_scores_follow_the_calculator():
    members = [random_posterior("tiny", seed=s, species=(1, 6, 8), scale=2.0, dtype="float64").model for s in range(3)]
    calc = RACECalculator(EnsemblePosterior(members))
    pool = []
    for k, amplitude in enumerate([0.0, 0.05, 0.2]):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(amplitude, seed=k)
        pool.append(atoms)
    for strategy, key in [("energy-std", "energy_std"), ("bald-e", "bald_energy"), ("bald-f", "bald_forces"), ("bald-ef", "bald")]:
        scores = acquisition_scores(calc, pool, strategy)
        for atoms, score in zip(pool, scores):
            atoms.calc = calc
            atoms.get_potential_energy()
            assert score == pytest.approx(calc.results[key])
    a, b = acquisition_scores(calc, pool, "random", seed=1), acquisition_scores(calc, pool, "random", seed=1)
    assert np.array_equal(a, b) and a.shape == (3,)
    d = rdf_descriptor(pool[0])
    assert d.sum() == pytest.approx(36 / 9)  # 9·8/2 pairs, all within 6 Å, per atom


def test_select_command(tmp_path):
    from ase.io import read, write

    from ase_race import save_model
    from ase_race.cli.main import main

    pool = []
    for k in range(5):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(0.02 * (k + 1), seed=k)
        pool.append(atoms)
    write(tmp_path / "pool.extxyz", pool)
    members = [random_posterior("tiny", seed=s, species=(1, 6, 8), scale=2.0, dtype="float64").model for s in range(3)]
    model = save_model(tmp_path / "ens.pt", EnsemblePosterior(members))
    out = tmp_path / "sel.extxyz"
    assert main(["select", str(model), str(tmp_path / "pool.extxyz"), "-n", "2", "--strategy", "energy-std", "-o", str(out)]) == 0
    chosen = read(out, ":")
    scores = acquisition_scores(RACECalculator(model), pool, "energy-std")
    assert [a.info["pool_index"] for a in chosen] == list(np.argsort(-scores)[:2])


def _emt_pool(n: int):
    """Rattled ethanol-sized CHO molecules; EMT labels them in microseconds."""
    pool = []
    for k in range(n):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(0.03 + 0.01 * k, seed=k)
        pool.append(atoms)
    return pool


def _tiny_config(tmp_path):
    from ase_race.training import TrainConfig

    return TrainConfig(method="ensemble", ensemble={"members": 2}, preset="tiny", max_epochs=2, valid_fraction=1, e0s="fit",
                       batch_size=2, model={"dtype": "float64"}, loss="nll_jef")


def test_active_learning_loop_prospective_resumes_and_follows_the_acquisition(tmp_path):
    from ase.calculators.emt import EMT
    from ase.io import read

    from ase_race.active.loop import active_learn, label_with, read_curve

    pool = _emt_pool(12)
    calls = []
    reference = label_with(EMT())

    def label(i):
        calls.append(i)
        return reference(pool[i])

    test = read_frames_from([reference(a) for a in _emt_pool(3)], tmp_path)
    out = tmp_path / "al"
    curve = active_learn(pool, label, _tiny_config(tmp_path), [3, 5, 8], "bald-f", out, test=test, seed=4)

    import json

    state = json.loads((out / "state.json").read_text())
    rounds = state["labelled"]
    assert [len(r) for r in rounds] == [3, 5, 8]
    for small, big in zip(rounds, rounds[1:]):
        assert set(small) < set(big)  # nested, nothing dropped
    assert sorted(calls) == rounds[-1]  # each structure labelled exactly once
    # Round 1's new structures are the top BALD-F scores of round 0's model over the rest.
    rest = [i for i in range(12) if i not in rounds[0]]
    scores = acquisition_scores(RACECalculator(str(out / "round_00" / "model.pt")), [pool[i] for i in rest], "bald-f")
    assert sorted(set(rounds[1]) - set(rounds[0])) == sorted(rest[j] for j in select(scores, 2))
    # The labels are the reference's, and the frames remember where they came from.
    for atoms in read(out / "round_02" / "train.extxyz", ":"):
        i = atoms.info["pool_index"]
        expect = pool[i].copy()
        expect.calc = EMT()
        assert atoms.info["REF_energy"] == pytest.approx(expect.get_potential_energy(), abs=1e-9)
        assert np.allclose(atoms.arrays["REF_forces"], expect.get_forces(), atol=1e-9)
    # The curve is on disk, one row per round, with test errors.
    written = read_curve(out / "learning_curve.csv")
    assert [r.n_train for r in written] == [3, 5, 8] and all(np.isfinite(r.forces_mae) for r in written)
    assert written[-1].forces_mae == pytest.approx(curve[-1].forces_mae)
    # A rerun resumes: no new labels, no retraining, the same curve.
    stamp = (out / "round_02" / "model.pt").stat().st_mtime_ns
    calls.clear()
    again = active_learn(pool, label, _tiny_config(tmp_path), [3, 5, 8], "bald-f", out, test=test, seed=4)
    assert calls == [] and (out / "round_02" / "model.pt").stat().st_mtime_ns == stamp
    assert [r.forces_mae for r in again] == pytest.approx([r.forces_mae for r in curve])
    # ... and reuses the recorded test errors and wall times instead of re-evaluating,
    assert [r.wall_s for r in again] == [r.wall_s for r in curve]
    assert read_curve(out / "learning_curve.csv") == written
    # unless the test set changed: then every round is evaluated on the new one, and its wall
    # time is the recorded labelling and training time plus that evaluation.
    train_s = [json.loads((out / "state.json").read_text())["rounds"][str(k)]["train_s"] for k in range(3)]
    fewer = active_learn(pool, label, _tiny_config(tmp_path), [3, 5, 8], "bald-f", out, test=test[:1], seed=4)
    assert calls == [] and all(a.forces_mae != b.forces_mae for a, b in zip(fewer, curve))
    assert all(t < r.wall_s for t, r in zip(train_s, fewer))
    assert read_curve(out / "learning_curve.csv")[-1].forces_mae == pytest.approx(fewer[-1].forces_mae)
    # A round whose model is removed is trained again, and only that row is measured again.
    (out / "round_02" / "model.pt").unlink()
    retrained = active_learn(pool, label, _tiny_config(tmp_path), [3, 5, 8], "bald-f", out, test=test[:1], seed=4)
    assert calls == [] and [r.wall_s for r in retrained[:2]] == [r.wall_s for r in fewer[:2]]
    assert retrained[2].wall_s != fewer[2].wall_s
    assert json.loads((out / "state.json").read_text())["rounds"]["2"]["train_s"] != train_s[2]
    with pytest.raises(Exception, match="strategy 'bald-f'"):
        active_learn(pool, label, _tiny_config(tmp_path), [3, 5, 8], "random", out, seed=4)
    with pytest.raises(Exception, match="increasing"):
        active_learn(pool, label, _tiny_config(tmp_path), [5, 3], "random", tmp_path / "x")


def read_frames_from(atoms_list, tmp_path):
    from ase.io import write

    from ase_race.data import read_frames

    write(tmp_path / "test.extxyz", atoms_list)
    return read_frames(tmp_path / "test.extxyz")


def test_active_learn_command_retrospective(tmp_path, capsys):
    from ase.calculators.emt import EMT
    from ase.io import write

    from ase_race.active.loop import label_with
    from ase_race.cli.main import main

    labeller = label_with(EMT())
    write(tmp_path / "pool.extxyz", [labeller(a) for a in _emt_pool(8)])
    out = tmp_path / "al"
    rc = main(["active-learn", str(tmp_path / "pool.extxyz"), "method=ensemble", "ensemble.members=2", "preset=tiny",
               "max_epochs=1", "valid_fraction=1", "e0s=fit", "batch_size=2", "--sizes", "3,5",
               "--strategy", "energy-std", "--test", str(tmp_path / "pool.extxyz"), "-o", str(out), "--device", "cpu"])
    assert rc == 0
    assert (out / "learning_curve.png").stat().st_size > 0
    lines = (out / "learning_curve.csv").read_text().splitlines()
    assert lines[0] == "round,n_train,energy_mae_meV,energy_rmse_meV,forces_mae_meV_A,forces_rmse_meV_A,wall_s"
    assert len(lines) == 3
    # The table prints what the CSV holds, in the same units (meV, meV/Å).
    table = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()[:1].isdigit()]
    csv_rows = [line.split(",") for line in lines[1:]]
    for printed, stored in zip(table, csv_rows):
        assert float(printed[2]) == pytest.approx(float(stored[2]), abs=0.006)
        assert float(printed[3]) == pytest.approx(float(stored[4]), abs=0.006)


def test_warm_start_fine_tunes_the_previous_round(tmp_path):
    import torch
    from ase.calculators.emt import EMT

    from ase_race.active.loop import active_learn, label_with
    from ase_race.modelfile import load_model

    pool = _emt_pool(8)
    reference = label_with(EMT())
    out = tmp_path / "warm"
    active_learn(pool, lambda i: reference(pool[i]), _tiny_config(tmp_path), [3, 5], "energy-std", out,
                 seed=1, warm_start=True, structures_per_round=6, min_epochs=2)
    first, second = load_model(out / "round_00" / "model.pt"), load_model(out / "round_01" / "model.pt")
    assert second.metadata["active_learning"]["fine_tuned_from"].endswith("round_00/model.pt")
    assert second.metadata["active_learning"]["n_train"] == 5 and second.metadata["active_learning"]["epochs"] == 2
    assert not (out / "round_01" / "member_00").exists()  # no training from scratch
    # Same architecture and normalisation, moved weights.
    a, b = first.posterior.members[0], second.posterior.members[0]
    assert a.config == b.config
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_learning_curve_plot_labels_the_sizes_in_plain_numbers(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from ase_race.active.loop import RoundResult, plot_curves

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: saved.append(self) or open(path, "wb").close())
    curve = [RoundResult(k, n, 0.4 / (k + 1), 0.0, 0.3 / (k + 1), 0.0, 1.0) for k, n in enumerate([20, 50, 100])]
    path = plot_curves({"random": curve, "bald-e": curve[:2]}, tmp_path / "c.png")
    assert path.exists() and len(saved) == 1
    for ax in saved[0].axes:
        assert list(ax.get_xticks()) == [20, 50, 100]
        assert [ax.xaxis.get_major_formatter()(v, i) for i, v in enumerate([20, 50, 100])] == ["20", "50", "100"]
        assert ax.yaxis.get_major_formatter()(400.0, 0) == "400"
