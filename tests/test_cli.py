"""The command line: md/demo outputs, predict and info, and clear errors.

Most commands run in this process through ``main`` (a new interpreter costs seconds of
imports per call); test_errors_are_one_line runs the real ``python -m ase_race.cli.main``.
"""

import contextlib
import csv
import io
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from ase.build import molecule
from ase.io import read, write

FIXTURE = str(Path(__file__).parent / "data" / "modelfiles" / "v1.pt")


def ase_race(*args):
    """``ase-race ARGS`` in this process: its exit status, stdout and stderr."""
    from ase_race.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main([str(a) for a in args])
        except SystemExit as exit_:  # argparse's usage errors
            status = exit_.code
    return SimpleNamespace(returncode=status, stdout=out.getvalue(), stderr=err.getvalue())


def ase_race_process(*args):
    """``python -m ase_race.cli.main ARGS`` in a new interpreter, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "ase_race.cli.main", *args], capture_output=True, text=True)


def test_md_writes_trajectory_log_and_plot(tmp_path):
    out = tmp_path / "md"
    proc = ase_race("md", "--model", FIXTURE, "--steps", "30", "--interval", "10", "--log-interval", "5",
                    "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    table = [line for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(line.split()[0]) for line in table[1:]] == [0, 10, 20, 30]
    frames = read(out / "trajectory.extxyz", ":")
    assert len(frames) == 4
    assert frames[-1].info["race_max_forces_std"] > 0 and frames[-1].arrays["race_forces_std"].shape == (9, 3)
    rows = list(csv.DictReader(open(out / "uncertainty.csv")))
    assert [int(r["step"]) for r in rows] == [0, 5, 10, 15, 20, 25, 30]
    assert float(rows[-1]["max_forces_std"]) == frames[-1].info["race_max_forces_std"]
    assert (out / "uncertainty.png").read_bytes()[:4] == b"\x89PNG"


def test_md_stops_when_the_model_is_unsure(tmp_path):
    out = tmp_path / "md"
    # Any prediction has max_forces_std > 0: the run stops at step 0 and says so.
    proc = ase_race("md", "--model", FIXTURE, "--steps", "30", "--stop-above", "0", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "stopped: step 0: max_forces_std" in proc.stdout
    frames = read(out / "trajectory.extxyz", ":")
    assert frames[-1].info["race_max_forces_std"] > 0


def test_predict_and_info(tmp_path):
    write(tmp_path / "in.extxyz", [molecule("CH3CH2OH"), molecule("H2O")])
    proc = ase_race("predict", FIXTURE, str(tmp_path / "in.extxyz"), "-o", str(tmp_path / "out.extxyz"))
    assert proc.returncode == 0, proc.stderr
    frames = read(tmp_path / "out.extxyz", ":")
    assert len(frames) == 2 and "race_energy_std" in frames[1].info
    info = ase_race("info", FIXTURE)
    assert info.returncode == 0 and "ase-race-model v1" in info.stdout and "['H', 'C', 'O']" in info.stdout


def test_errors_are_one_line(tmp_path):
    write(tmp_path / "n.xyz", molecule("HCN"))
    proc = ase_race_process("predict", FIXTURE, str(tmp_path / "n.xyz"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "ase-race predict: error: element(s) ['N'] not known to this model, which knows ['H', 'C', 'O']"
    ]
    assert "no such model file" in ase_race("info", "nothing.pt").stderr


def test_relax_reports_whether_the_minimum_is_trustworthy(tmp_path):
    out = tmp_path / "relax"
    # A trust threshold far above the fixture model's force std: converged and trusted.
    proc = ase_race("relax", "--model", FIXTURE, "--fmax", "1000", "--trust-std", "1000", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "minimum trustworthy: yes" in proc.stdout
    frames = read(out / "trajectory.extxyz", ":")
    assert "race_max_forces_std" in frames[-1].info
    # Converged, but a trust threshold below the force std: the model is unsure there.
    proc = ase_race("relax", "--model", FIXTURE, "--fmax", "1000", "--trust-std", "1e-9", "--output", str(out))
    assert "minimum trustworthy: no (max_forces_std exceeds --trust-std" in proc.stdout
    # Not converged: never trustworthy.
    proc = ase_race("relax", "--model", FIXTURE, "--fmax", "1e-9", "--steps", "3", "--trust-std", "1000",
                    "--output", str(out))
    assert "minimum trustworthy: no (not converged" in proc.stdout
    # With a reference, the model's converged minimum is checked by the reference: EMT's
    # forces on the start structure lie between these two thresholds.
    for fmax, verdict in (("1000", "yes (verified"), ("0.05", "no (the reference's largest force")):
        proc = ase_race("relax", "--model", FIXTURE, "--fmax", fmax, "--steps", "0", "--fallback", "emt",
                        "--fallback-threshold", "1e9", "--output", str(out))
        assert proc.returncode == 0, proc.stderr
        assert "verification: reference energy" in proc.stdout
        assert "minimum trustworthy: " + verdict in proc.stdout


def test_md_with_fallback_collects_reference_frames(tmp_path):
    out = tmp_path / "md"
    proc = ase_race("md", "--model", FIXTURE, "--steps", "10", "--interval", "5", "--output", str(out),
                    "--fallback", "emt", "--fallback-threshold", "0", "--fallback-budget", "3")
    assert proc.returncode == 0, proc.stderr
    assert "fallback: 3 reference calls (0 failed) in 11 evaluations, 0 retrains" in proc.stdout
    frames = read(out / "fallback.extxyz", ":")
    assert len(frames) == 3 and all("REF_energy" in f.info and "REF_forces" in f.arrays for f in frames)


def test_md_fallback_retrains_with_rehearsal_and_recalibration(tmp_path):
    from ase.calculators.emt import EMT

    labelled = []
    for k in range(4):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(0.05, seed=k)
        atoms.calc = EMT()
        atoms.info["REF_energy"] = atoms.get_potential_energy()
        atoms.arrays["REF_forces"] = atoms.get_forces()
        atoms.calc = None
        labelled.append(atoms)
    write(tmp_path / "train.extxyz", labelled[:3])
    write(tmp_path / "valid.extxyz", labelled[3:])
    out = tmp_path / "md"
    proc = ase_race("md", "--model", FIXTURE, "--steps", "6", "--interval", "3", "--output", str(out),
                    "--fallback", "emt", "--fallback-threshold", "0", "--fallback-budget", "2",
                    "--fallback-retrain-every", "2", "--fallback-retrain-epochs", "1",
                    "--fallback-replay", str(tmp_path / "train.extxyz"), "--fallback-replay-size", "2",
                    "--fallback-calibrate-on", str(tmp_path / "valid.extxyz"))
    assert proc.returncode == 0, proc.stderr
    assert "fallback: 2 reference calls (0 failed) in 7 evaluations, 1 retrains" in proc.stdout
    assert "1 retrains (0 failed)" in proc.stdout
    proc = ase_race("md", "--model", FIXTURE, "--steps", "2", "--output", str(tmp_path / "bad"), "--fallback", "emt",
                    "--fallback-retrain-every", "2", "--fallback-replay", str(tmp_path / "missing.extxyz"))
    assert proc.returncode != 0 and "missing.extxyz: no such data file" in proc.stderr


def test_md_fallback_options_reach_the_retrainer(tmp_path, monkeypatch):
    """The command-line options arrive at retrainer()."""
    from ase_race.cli import md
    from ase_race.cli.main import build_parser
    from ase_race.training import finetune

    frames = []
    for k in range(3):
        atoms = molecule("CH3CH2OH")
        atoms.rattle(0.05, seed=k)
        atoms.info["REF_energy"] = -1.0 - k
        atoms.arrays["REF_forces"] = atoms.positions * 0.0
        frames.append(atoms)
    write(tmp_path / "train.extxyz", frames[:2])
    write(tmp_path / "valid.extxyz", frames[2:])
    received = {}
    monkeypatch.setattr(finetune, "retrainer", lambda **kw: received.update(kw) or (lambda bundle, atoms: bundle))
    args = build_parser().parse_args([
        "md", "--model", FIXTURE, "--output", str(tmp_path / "md"), "--fallback", "emt",
        "--fallback-retrain-every", "3", "--fallback-retrain-epochs", "7",
        "--fallback-replay", str(tmp_path / "train.extxyz"), "--fallback-replay-size", "5",
        "--fallback-calibrate-on", str(tmp_path / "valid.extxyz"),
    ])
    calc = md.make_calculator(args)
    assert calc.retrain_every == 3
    assert received["epochs"] == 7 and received["replay_size"] == 5
    assert [f.energy for f in received["replay"]] == [-1.0, -2.0]
    assert [f.energy for f in received["calibrate_on"]] == [-3.0]
