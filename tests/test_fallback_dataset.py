"""The fallback dataset: exact labels on reuse, matching within a tolerance, two writers, a full
disk, reruns and kills of a whole `ase-race md --fallback` run, and the checks made before the
first step (output paths, the reference's package, its energy scale)."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.io import read, write

from ase_race.calculator import fallback as fallback_module
from ase_race.calculator.fallback import FallbackCalculator, LabelledFrames
from ase_race.cli.main import main
from ase_race.errors import RaceError
from ase_race.testing import random_posterior

FIXTURE = str(Path(__file__).parent / "data" / "modelfiles" / "v1.pt")


@pytest.fixture(scope="module")
def model():
    return random_posterior("tiny", seed=4, species=(1, 6, 8), scale=2.0, dtype="float64")


def labelled(seed, rattle=0.05):
    atoms = molecule("CH3CH2OH")
    atoms.rattle(rattle, seed=seed)
    rng = np.random.default_rng(seed)
    # Values with all 17 significant digits, which 8 decimals in extxyz would round.
    atoms.info["REF_energy"] = float(-100.0 + rng.random())
    atoms.arrays["REF_forces"] = rng.normal(size=(len(atoms), 3)) / 3.0
    return atoms


def test_reused_labels_are_bit_identical_and_found_within_the_tolerance(tmp_path):
    path = tmp_path / "d.extxyz"
    frames = [labelled(k) for k in range(5)]
    store = LabelledFrames(path)
    for frame in frames:
        frame.info["fallback_reference"] = "ref"
        assert store.append(frame)
    reopened = LabelledFrames(path)
    assert len(reopened) == 5
    for frame in frames:
        energy, forces = reopened.label(frame, "ref")
        assert energy == frame.info["REF_energy"]  # exact, not to 8 decimals
        assert np.array_equal(forces, frame.arrays["REF_forces"])
        assert reopened.label(frame, "another reference") is None
    near, far = frames[2].copy(), frames[2].copy()
    near.positions[3, 1] += 5e-7  # inside the 1e-6 Å tolerance
    far.positions[3, 1] += 5e-6
    assert reopened.label(near, "ref")[0] == frames[2].info["REF_energy"]
    assert near in reopened and not reopened.append(near)
    assert far not in reopened and reopened.label(far, "ref") is None
    other = frames[2].copy()
    other.numbers = other.numbers[::-1].copy()  # same positions, other species order
    assert other not in reopened


def test_frames_written_without_the_exact_record_are_still_matched(tmp_path):
    # A dataset written by another tool (or an older version): 8 decimals only.
    frames = [labelled(k) for k in range(3)]
    write(tmp_path / "d.extxyz", frames, format="extxyz")
    store = LabelledFrames(tmp_path / "d.extxyz")
    for frame in frames:
        energy, forces = store.label(frame, "")
        assert energy == pytest.approx(frame.info["REF_energy"], abs=1e-8)
        np.testing.assert_allclose(forces, frame.arrays["REF_forces"], atol=1e-8)
    assert not any(store.append(f) for f in frames) and len(read(tmp_path / "d.extxyz", ":")) == 3


WRITER = """
import sys
from ase.build import molecule
from ase_race.calculator.fallback import LabelledFrames
path, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = LabelledFrames(path)
for k in list(range(first, last)) + list(range(1000, 1020)):  # 20 frames both writers append
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=k)
    store.append(atoms)
"""


def test_two_processes_appending_to_one_dataset_keep_every_frame_once(tmp_path):
    path = tmp_path / "shared.extxyz"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    writers = [subprocess.Popen([sys.executable, str(script), str(path), str(a), str(a + 100)])
               for a in (0, 100)]
    assert [w.wait(timeout=240) for w in writers] == [0, 0]
    frames = read(path, ":")
    assert len(frames) == 220  # 2 × 100 own frames + the 20 shared ones, once
    keys = [f.info[LabelledFrames.KEY] for f in frames]
    assert len(set(keys)) == 220
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_keeps_the_frame_and_writes_it_with_the_next(model, tmp_path, monkeypatch, caplog):
    path = tmp_path / "d.extxyz"
    real = fallback_module.atomic_write_bytes
    calls = {"n": 0}

    def full_once(target, data):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(target, data)

    monkeypatch.setattr(fallback_module, "atomic_write_bytes", full_once)
    calc = FallbackCalculator(model, EMT(), threshold=0.0, dataset=path)
    frames = [labelled(k, rattle=0.02 * (k + 1)) for k in range(3)]
    for atoms in frames:
        atoms.calc = calc
        atoms.get_potential_energy()
        if atoms is frames[1]:  # the run goes on; the frame waits in memory
            assert calc.n_write_failures == 1 and len(calc.frames.pending) == 1
            assert len(read(path, ":")) == 1 and "No space left" in caplog.text
    assert calc.n_reference == 3 and not calc.frames.pending
    assert len(read(path, ":")) == 3
    stop = FallbackCalculator(model, EMT(), threshold=0.0, dataset=tmp_path / "e.extxyz", on_failure="stop")
    monkeypatch.setattr(fallback_module, "atomic_write_bytes",
                        lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    atoms = labelled(9)
    atoms.calc = stop
    with pytest.raises(RaceError, match="could not write the reference frame"):
        atoms.get_potential_energy()


def test_a_real_write_error_leaves_no_temporary_file(tmp_path, monkeypatch):
    # ENOSPC as the kernel reports it: from fsync, after part of the data went out.
    store = LabelledFrames(tmp_path / "d.extxyz")
    store.append(labelled(0))

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        store.append(labelled(1))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.extxyz.lock", "d.extxyz"]
    assert len(read(tmp_path / "d.extxyz", ":")) == 1
    store.flush()  # the disk has room again: the kept frame goes in
    assert len(read(tmp_path / "d.extxyz", ":")) == 2


class Offset(EMT):
    """EMT on another energy scale (as xTB is against PBE)."""

    def calculate(self, *args, **kwargs):
        super().calculate(*args, **kwargs)
        self.results["energy"] += 300.0
        self.results["free_energy"] = self.results["energy"]


def test_a_reference_on_another_energy_scale_is_refused_before_anything_is_stored(model, tmp_path):
    atoms = labelled(0)
    atoms.calc = FallbackCalculator(model, Offset(), threshold=0.0, dataset=tmp_path / "d.extxyz")
    with pytest.raises(RaceError, match=r"eV/atom apart, more than the tolerance of 1 eV/atom"):
        atoms.get_potential_energy()
    assert not (tmp_path / "d.extxyz").exists()
    atoms.calc = FallbackCalculator(model, Offset(), threshold=0.0, energy_tolerance=None)
    assert atoms.get_potential_energy() > 250.0  # an intended offset: the check is off


class NotInstalled(EMT):
    def calculate(self, *args, **kwargs):
        raise ImportError("No module named 'pyscf'")


def test_a_missing_reference_package_is_raised_whatever_the_policy(model):
    atoms = labelled(0)
    atoms.calc = FallbackCalculator(model, NotInstalled(), threshold=0.0, on_failure="model")
    with pytest.raises(ImportError, match="pyscf"):
        atoms.get_potential_energy()


def test_md_says_how_to_install_a_missing_reference_before_the_first_step(tmp_path, monkeypatch, capsys):
    from ase_race import extras

    monkeypatch.setattr(extras, "available", lambda name: name != "tblite")
    code = main(["md", "--model", FIXTURE, "--steps", "3", "--output", str(tmp_path / "md"), "--fallback", "tblite"])
    assert code == 2
    assert "pip install 'ase-race[tblite]'" in capsys.readouterr().err
    assert not (tmp_path / "md" / "trajectory.extxyz").exists()


@pytest.mark.parametrize("command", ["md", "relax"])
def test_output_paths_are_checked_before_the_first_step(tmp_path, capsys, command):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = tmp_path / "out"
    code = main([command, "--model", FIXTURE, "--steps", "3", "--output", str(out), "--fallback", "emt",
                 "--fallback-dataset", str(blocker / "sub" / "d.extxyz")])
    assert code == 2
    assert f"cannot create the folder of output {blocker / 'sub' / 'd.extxyz'}" in capsys.readouterr().err
    assert not (out / "trajectory.extxyz").exists()  # refused before anything ran
    (tmp_path / "dir.extxyz").mkdir()
    code = main([command, "--model", FIXTURE, "--steps", "3", "--output", str(out), "--fallback", "emt",
                 "--fallback-dataset", str(tmp_path / "dir.extxyz")])
    assert code == 2 and "is a directory" in capsys.readouterr().err
    code = main([command, "--model", FIXTURE, "--steps", "3", "--output", str(blocker)])
    assert code == 2 and "cannot create the folder of output" in capsys.readouterr().err


def test_md_rows_go_through_the_progress_bar_when_one_is_shown(capsys):
    from ase_race.cli.md import _print_row

    class Bar:
        lines = []

        def write(self, line):
            self.lines.append(line)

    row = {"step": 10, "temperature_K": 300.0, "energy": -1.0, "energy_std": 0.01, "max_forces_std": 0.1}
    bar = Bar()
    _print_row(row, bar)
    assert len(bar.lines) == 1 and bar.lines[0].split()[0] == "10" and capsys.readouterr().out == ""
    _print_row(row)
    assert capsys.readouterr().out.split()[0] == "10"


MD = ["md", "--model", FIXTURE, "--steps", "40", "--interval", "20", "--fallback", "emt", "--fallback-threshold", "0",
      "--fallback-min-interval", "4", "--seed", "7"]


def md(out, capsys):
    """The run in this process (imports paid once), its stdout."""
    capsys.readouterr()
    assert main([*MD, "--output", str(out)]) == 0
    return capsys.readouterr().out


def killed_md(out, dataset, frames_before_kill):
    """The run in a process of its own, SIGKILLed once the dataset holds this many frames."""
    proc = subprocess.Popen([sys.executable, "-m", "ase_race.cli.main", *MD, "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if dataset.exists() and len(read(dataset, ":")) >= frames_before_kill:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def new_calls(stdout):
    line = next(line for line in stdout.splitlines() if line.startswith("fallback:"))
    calls = int(line.split()[1])
    reused = int(line.split("(")[-1].split()[0]) if "labels taken from it" in line else 0
    return calls, calls - reused


def exact_records(path):
    return [f.info[LabelledFrames.EXACT] for f in read(path, ":")]


def test_rerunning_or_killing_a_fallback_run_reproduces_it_without_new_reference_calls(tmp_path, capsys):
    first = md(tmp_path / "a", capsys)
    calls, new = new_calls(first)
    assert calls == new == 9  # steps 0, 5, ..., 40
    original = exact_records(tmp_path / "a" / "fallback.extxyz")
    trajectory = (tmp_path / "a" / "trajectory.extxyz").read_bytes()
    # A rerun of the finished run: every label from the file, the same trajectory to the bit.
    again = md(tmp_path / "a", capsys)
    assert new_calls(again) == (9, 0)
    assert exact_records(tmp_path / "a" / "fallback.extxyz") == original
    assert (tmp_path / "a" / "trajectory.extxyz").read_bytes() == trajectory
    # Killed twice at different points, then run to the end: the same frames, once each.
    dataset = tmp_path / "b" / "fallback.extxyz"
    for frames_before_kill in (2, 5):
        killed_md(tmp_path / "b", dataset, frames_before_kill)
    resumed = md(tmp_path / "b", capsys)
    assert new_calls(resumed)[0] == 9 and new_calls(resumed)[1] < 9
    assert exact_records(dataset) == original
    assert (tmp_path / "b" / "trajectory.extxyz").read_bytes().replace(b"/b/", b"/a/") == trajectory
