"""Atomic writes: the old file survives a failing writer, and permissions are kept or 0644."""

import os
import stat

import pytest
import torch

from ase_race._atomic import atomic_torch_save, atomic_write, atomic_write_bytes, atomic_write_text


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


class Boom(Exception):
    pass


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "data.txt"
    atomic_write_text(path, "old\n")

    def half_then_raise(handle):
        handle.write(b"new, but only ha")
        raise Boom

    with pytest.raises(Boom):
        atomic_write(path, half_then_raise)
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]


def test_a_failing_first_write_creates_nothing(tmp_path):
    def raise_at_once(handle):
        raise Boom

    with pytest.raises(Boom):
        atomic_write(tmp_path / "new.bin", raise_at_once)
    assert list(tmp_path.iterdir()) == []


def test_new_files_are_0644_and_old_permissions_are_kept(tmp_path):
    path = tmp_path / "sub" / "model.pt"  # missing folders are created
    atomic_torch_save({"x": torch.arange(3)}, path)
    assert mode(path) == 0o644  # not mkstemp's 0600
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))
    os.chmod(path, 0o600)
    atomic_torch_save({"x": torch.arange(4)}, path)
    assert mode(path) == 0o600
    assert torch.load(path, weights_only=True)["x"].numel() == 4


def test_bytes_and_text_round_trip(tmp_path):
    path = tmp_path / "frames.extxyz"
    atomic_write_bytes(path, b"a\n")
    atomic_write_bytes(path, path.read_bytes() + b"b\n")
    assert path.read_bytes() == b"a\nb\n"
    atomic_write_text(path, "σ ≥ 0\r\n")  # UTF-8, newlines untranslated
    assert path.read_bytes() == "σ ≥ 0\r\n".encode()


def test_modelfile_re_exports_the_writers():
    from ase_race import _atomic, modelfile

    assert modelfile.atomic_torch_save is _atomic.atomic_torch_save
    assert modelfile.atomic_write_text is _atomic.atomic_write_text


def test_temporary_names_carry_host_and_pid_and_orphans_of_dead_writers_are_removed(tmp_path):
    import subprocess
    import sys

    from ase_race._atomic import _host, remove_orphans

    path = tmp_path / "frames.extxyz"
    seen = []
    atomic_write(path, lambda handle: seen.extend(p.name for p in tmp_path.iterdir()))
    assert len(seen) == 1 and seen[0].startswith(f".frames.extxyz.{_host()}.{os.getpid()}.")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    orphan = tmp_path / f".frames.extxyz.{_host()}.{dead_pid}.k3j_x9.tmp"
    alive = tmp_path / f".frames.extxyz.{_host()}.{os.getppid()}.a1b2c3.tmp"  # a writer still running
    foreign = tmp_path / f".frames.extxyz.otherhost.{dead_pid}.a1b2c3.tmp"  # cannot tell: left alone
    longer = tmp_path / f".frames.extxyz.b.{_host()}.{dead_pid}.a1b2c3.tmp"  # belongs to "frames.extxyz.b"
    for p in (orphan, alive, foreign, longer):
        p.write_bytes(b"half a frame")
    atomic_write_bytes(path, b"whole\n")
    assert not orphan.exists() and alive.exists() and foreign.exists() and longer.exists()
    assert path.read_bytes() == b"whole\n"
    assert remove_orphans(tmp_path / "frames.extxyz.b") == [longer]


def test_write_structures_round_trips_labels_and_a_failure_keeps_the_old_file(tmp_path):
    import numpy as np
    from ase import Atoms
    from ase.io import read

    from ase_race.data import write_structures

    atoms = Atoms("H2O", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    atoms.info["REF_energy"] = -14.25
    atoms.arrays["REF_forces"] = np.arange(9.0).reshape(3, 3)
    path = write_structures(tmp_path / "sub" / "set.extxyz", [atoms, atoms])
    back = read(path, ":")
    assert len(back) == 2 and back[1].info["REF_energy"] == -14.25
    np.testing.assert_array_equal(back[0].arrays["REF_forces"], atoms.arrays["REF_forces"])
    np.testing.assert_allclose(back[0].positions, atoms.positions, atol=1e-12)

    def broken():
        yield atoms
        raise RuntimeError("labeller died")

    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="labeller died"):
        write_structures(path, broken())
    assert path.read_bytes() == before and sorted(os.listdir(path.parent)) == ["set.extxyz"]
