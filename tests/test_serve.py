"""``ase-race serve``: the i-PI client (issue 18).

The protocol tests play the server's side by hand, so they check the wire format and the
units exactly and run without i-PI. The i-PI tests start a real ``i-pi`` on a Unix socket and
check what it received and did: the same energies, forces and committee spread as
RACECalculator, a killed client replaced without a lost step, two clients on one server.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.io import read

from ase_race import RACECalculator, load_model, save_model
from ase_race.cli import serve as serve_cli
from ase_race.config import ModelConfig
from ase_race.errors import PredictionError, ProtocolError, StructureError
from ase_race.evaluation import Calibration
from ase_race.nn import build_model
from ase_race.posteriors import EnsemblePosterior
from ase_race.serve import DEFAULT_PORT, serve, unix_socket_path

ENSEMBLE = Path(__file__).parent / "data" / "posteriors" / "ensemble-v1.pt"  # 3 tiny members, H C O
HA, FORCE = units.Hartree, units.Hartree / units.Bohr
CLIENT = ("import argparse, sys; from ase_race.cli import serve; p = argparse.ArgumentParser(prog='ase-race'); "
          "serve.add_parser(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.run(a))")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """The tiny 3-member ensemble with a calibration, so that 'calibrated' differs from 'raw'."""
    bundle = load_model(ENSEMBLE, device="cpu")
    path = tmp_path_factory.mktemp("model") / "ensemble-calibrated.pt"
    save_model(path, bundle.posterior, Calibration(energy_var_scale=2.5, forces_var_scale=1.5))
    return path


@pytest.fixture(scope="module")
def calc(model_file):
    return RACECalculator(model_file, device="cpu")


@pytest.fixture
def short_dir():
    """A temporary folder with a short path (a Unix socket path has at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="race-serve-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def reference(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    atoms.get_potential_energy()
    return {k: (v.copy() if hasattr(v, "copy") else v) for k, v in calc.results.items()}


def full(voigt):
    xx, yy, zz, yz, xz, xy = voigt
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


# --- the server's side of the protocol, by hand --------------------------------------------------


class FakeServer:
    """A minimal i-PI server: one client, every message sent and checked by the test."""

    def __init__(self, path: Path):
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.listener.settimeout(60)
        self.conn = None

    def accept(self):
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(60)

    def close(self):
        for s in (self.conn, self.listener):
            if s is not None:
                s.close()

    def send(self, *parts):
        self.conn.sendall(b"".join(p if isinstance(p, bytes) else np.asarray(p).tobytes() for p in parts))

    def read(self, n):
        data = b""
        while len(data) < n:
            chunk = self.conn.recv(n - len(data))
            if not chunk:
                raise EOFError(f"client closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def array(self, dtype, count):
        dtype = np.dtype(dtype)
        return np.frombuffer(self.read(dtype.itemsize * count), dtype)

    def status(self):
        self.send(b"STATUS".ljust(12))
        return self.read(12).decode().strip()

    def init(self, text=""):
        self.send(b"INIT".ljust(12), np.int32(0), np.int32(len(text)), text.encode())

    def posdata(self, cell_rows_bohr, positions_bohr):
        h = np.ascontiguousarray(np.asarray(cell_rows_bohr, float).T)  # i-PI's h: lattice vectors as columns
        self.send(b"POSDATA".ljust(12), h, np.linalg.inv(h), np.int32(len(positions_bohr)),
                  np.asarray(positions_bohr, float))

    def posdata_batch(self, cells_rows_bohr, positions_bohr):
        hs = [np.ascontiguousarray(np.asarray(c, float).T) for c in cells_rows_bohr]
        blocks = b"".join(h.tobytes() + np.linalg.inv(h).tobytes() for h in hs)
        self.send(b"POSDATA".ljust(12), np.int32(len(positions_bohr[0])), blocks, np.asarray(positions_bohr, float))

    def getforce(self):
        self.send(b"GETFORCE".ljust(12))
        assert self.read(12).decode().strip() == "FORCEREADY"
        energy = self.array(np.float64, 1)[0]
        n = self.array(np.int32, 1)[0]
        forces = self.array(np.float64, 3 * n).reshape(n, 3)
        virial = self.array(np.float64, 9).reshape(3, 3)
        extras = self.read(self.array(np.int32, 1)[0]).decode()
        return energy, forces, virial, json.loads(extras)

    def getforce_batch(self, batch):
        self.send(b"GETFORCE".ljust(12))
        assert self.read(12).decode().strip() == "FORCEREADY"
        energies = self.array(np.float64, batch)
        n = self.array(np.int32, 1)[0]
        forces = self.array(np.float64, batch * 3 * n).reshape(batch, n, 3)
        virials = self.array(np.float64, batch * 9).reshape(batch, 3, 3)
        extras = [json.loads(self.read(self.array(np.int32, 1)[0]).decode()) for _ in range(batch)]
        return energies, forces, virials, extras


class Client:
    """``serve`` in a thread; ``result`` is its return value or the exception it raised."""

    def __init__(self, model, atoms, address, **kwargs):
        self.result = None

        def target():
            try:
                self.result = serve(model, address, atoms=atoms, **kwargs)
            except Exception as error:  # handed to the test
                self.result = error

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self, timeout=60):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the client did not finish"
        return self.result


@pytest.fixture
def server(short_dir):
    srv = FakeServer(short_dir / "sock")
    yield srv
    srv.close()


def test_one_structure_in_atomic_units_with_extras(server, short_dir, calc, ethanol):
    client = Client(calc, ethanol, str(short_dir / "sock"))
    server.accept()
    assert server.status() == "NEEDINIT"  # so that i-PI sends INIT (and any batch size) first
    server.init()
    assert server.status() == "READY"
    cell = np.eye(3) * 20.0 / units.Bohr
    server.posdata(cell, ethanol.positions / units.Bohr)
    assert server.status() == "HAVEDATA"
    energy, forces, virial, extras = server.getforce()
    assert server.status() == "READY"
    server.send(b"EXIT".ljust(12))
    assert client.join() == 1

    ref = reference(calc, ethanol)
    assert energy == pytest.approx(ref["energy"] / HA, rel=1e-12, abs=1e-14)
    np.testing.assert_allclose(forces, ref["forces"] / FORCE, rtol=1e-10, atol=1e-14)
    np.testing.assert_array_equal(virial, np.zeros((3, 3)))  # a molecule: no virial
    assert extras["energy_std"] == pytest.approx(ref["energy_std"], rel=1e-12)
    assert extras["max_forces_std"] == pytest.approx(ref["max_forces_std"], rel=1e-12)
    np.testing.assert_allclose(extras["forces_std"], ref["forces_std"], rtol=1e-12)
    # The committee in i-PI's units, spread so that its M−1 std is the calibrated epistemic std.
    pot = np.array(extras["committee_pot"])
    assert pot.shape == (3,) and pot.mean() == pytest.approx(energy, rel=1e-6)
    assert np.std(pot, ddof=1) == pytest.approx(np.sqrt(ref["energy_var_epistemic"]) / HA, rel=1e-10)
    members = np.array(ref["energy_ensemble"])
    scale = extras["committee_scale"]
    assert scale == pytest.approx(np.sqrt(ref["energy_var_epistemic"] / np.var(members, ddof=1)), rel=1e-12)
    np.testing.assert_allclose(pot - pot.mean(), scale * (members - members.mean()) / HA, rtol=1e-10, atol=1e-14)
    committee_force = np.array(extras["committee_force"]).reshape(3, -1, 3)
    np.testing.assert_allclose(committee_force.mean(axis=0), forces, rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(committee_force - committee_force.mean(axis=0),
                               scale * (ref["forces_ensemble"] - ref["forces_ensemble"].mean(axis=0)) / FORCE,
                               rtol=1e-8, atol=1e-14)
    np.testing.assert_array_equal(np.array(extras["committee_virial"]), np.zeros((3, 9)))


def test_periodic_cell_gives_the_virial_and_members_virials(server, short_dir):
    config = ModelConfig.from_preset("tiny", species=(14,), scale=2.0, dtype="float64", num_features=4,
                                     hidden_irreps="4x0e+4x1o", sh_lmax=1, radial_mlp=(8,), readout_hidden=4)
    calc = RACECalculator(EnsemblePosterior([build_model(config, seed=s) for s in (1, 2, 3)]), device="cpu")
    atoms = bulk("Si", "diamond", a=5.43) * (1, 1, 2)
    atoms.rattle(0.05, seed=4)
    atoms.set_cell(atoms.cell.array @ np.array([[1.0, 0.02, 0.0], [0.0, 1.0, 0.01], [0.0, 0.0, 1.0]]),
                   scale_atoms=True)  # triclinic: the cell's orientation on the wire matters
    # The template as i-PI's own xyz, which ASE reads as a molecule: --pbc makes it periodic, and
    # only species and order come from it (its cell is not the one i-PI sends).
    write_ipi_xyz(short_dir / "init.xyz", atoms, box=3.0)
    assert not read(short_dir / "init.xyz").pbc.any()
    client = Client(calc, short_dir / "init.xyz", str(short_dir / "sock"), committee="raw", pbc=True)
    server.accept()
    assert server.status() == "NEEDINIT"
    server.init()
    server.status()
    server.posdata(atoms.cell.array / units.Bohr, atoms.positions / units.Bohr)
    server.status()
    energy, forces, virial, extras = server.getforce()
    server.send(b"EXIT".ljust(12))
    assert client.join() == 1

    ref = reference(calc, atoms)
    assert energy == pytest.approx(ref["energy"] / HA, rel=1e-12)
    np.testing.assert_allclose(forces, ref["forces"] / FORCE, rtol=1e-10, atol=1e-14)
    expected = -atoms.get_volume() * full(ref["stress"]) / HA
    assert np.abs(expected).max() > 1e-6
    np.testing.assert_allclose(virial, expected, rtol=1e-10, atol=1e-16)
    members = np.array(extras["committee_virial"]).reshape(3, 3, 3)
    np.testing.assert_allclose(members, [-atoms.get_volume() * full(s) / HA for s in ref["stress_ensemble"]],
                               rtol=1e-10, atol=1e-16)
    np.testing.assert_allclose(members.mean(axis=0), virial, rtol=1e-8, atol=1e-14)
    assert extras["committee_scale"] == 1.0  # raw: the members as evaluated
    np.testing.assert_allclose(extras["committee_pot"], ref["energy_ensemble"] / HA, rtol=1e-12)


def test_batched_requests_are_each_evaluated(server, short_dir, calc, ethanol):
    other = ethanol.copy()
    other.rattle(0.05, seed=11)
    client = Client(calc, ethanol, str(short_dir / "sock"))
    server.accept()
    assert server.status() == "NEEDINIT"
    server.init("batch_size:2")  # what i-PI appends to the INIT string with <batch_size>2</batch_size>
    assert server.status() == "READY"
    cell = np.eye(3) * 20.0 / units.Bohr
    server.posdata_batch([cell, cell], [ethanol.positions / units.Bohr, other.positions / units.Bohr])
    assert server.status() == "HAVEDATA"
    energies, forces, virials, extras = server.getforce_batch(2)
    server.send(b"EXIT".ljust(12))
    assert client.join() == 2
    for k, atoms in enumerate((ethanol, other)):
        ref = reference(calc, atoms)
        assert energies[k] == pytest.approx(ref["energy"] / HA, rel=1e-12)
        np.testing.assert_allclose(forces[k], ref["forces"] / FORCE, rtol=1e-10, atol=1e-14)
        assert extras[k]["energy_std"] == pytest.approx(ref["energy_std"], rel=1e-12)
    assert not np.allclose(forces[0], forces[1])


def test_server_closing_the_socket_ends_the_command_with_status_0(server, short_dir, model_file, ethanol, capsys):
    from ase.io import write

    write(short_dir / "ethanol.xyz", ethanol)
    parser = argparse.ArgumentParser(prog="ase-race")
    serve_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", str(model_file), str(short_dir / "ethanol.xyz"), "-u", "-a",
                              str(short_dir / "sock"), "--device", "cpu"])
    status = []
    thread = threading.Thread(target=lambda: status.append(args.run(args)), daemon=True)
    thread.start()
    server.accept()
    assert server.status() == "NEEDINIT"
    server.conn.close()  # the end of a run, without EXIT
    thread.join(60)
    assert status == [0]
    assert "evaluated 0 structures" in capsys.readouterr().out


def test_non_finite_results_raise_and_nothing_is_sent(server, short_dir, model_file, ethanol):
    class Poisoned(RACECalculator):
        def calculate(self, *args, **kwargs):
            super().calculate(*args, **kwargs)
            self.results["forces_std"] = self.results["forces_std"].copy()
            self.results["forces_std"][0, 0] = np.nan

    client = Client(Poisoned(model_file, device="cpu"), ethanol, str(short_dir / "sock"))
    server.accept()
    server.status()
    server.init()
    server.status()
    server.posdata(np.eye(3) * 40.0, ethanol.positions / units.Bohr)
    with pytest.raises((EOFError, ConnectionResetError)):  # the client quit instead of answering
        server.status()
        server.getforce()
    error = client.join()
    assert isinstance(error, PredictionError) and "forces_std" in str(error)


def test_wrong_atom_count_is_refused(server, short_dir, calc, ethanol):
    client = Client(calc, ethanol, str(short_dir / "sock"))
    server.accept()
    server.status()
    server.init()
    server.status()
    server.posdata(np.eye(3) * 40.0, ethanol.positions[:5] / units.Bohr)
    error = client.join()
    assert isinstance(error, StructureError) and "5 atoms" in str(error)


def test_client_waits_for_a_server_started_later(short_dir, calc, ethanol):
    client = Client(calc, ethanol, str(short_dir / "late"), connect_timeout=30)
    time.sleep(0.5)
    srv = FakeServer(short_dir / "late")
    try:
        srv.accept()
        assert srv.status() == "NEEDINIT"
        srv.send(b"EXIT".ljust(12))
        assert client.join() == 0
    finally:
        srv.close()
    with pytest.raises(ProtocolError, match="no i-PI server at Unix socket"):
        serve(calc, str(short_dir / "nobody"), atoms=ethanol, connect_timeout=0.2)


def test_periodicity_is_the_templates_or_the_flags_and_never_partial(calc, ethanol):
    from ase_race.serve import _template

    box = ethanol.copy()
    box.cell, box.pbc = np.eye(3) * 12.0, True
    assert _template(box).pbc.all() and not _template(box, pbc=False).pbc.any()
    assert _template(ethanol, pbc=True).pbc.all() and not _template(ethanol).pbc.any()
    slab = box.copy()
    slab.pbc = [True, True, False]
    with pytest.raises(StructureError, match="periodic in some directions only"):
        serve(calc, "unused", atoms=slab, connect_timeout=0.1)


def test_socket_names_and_flags_follow_ipi():
    assert unix_socket_path("race") == "/tmp/ipi_race"  # i-PI's and ASE's place for a named socket
    assert unix_socket_path("/scratch/run/race") == "/scratch/run/race"
    assert unix_socket_path("race", "/scratch/ipi_") == "/scratch/ipi_race"
    parser = argparse.ArgumentParser(prog="ase-race")
    serve_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "m.pt", "s.xyz", "-u", "-a", "race"])
    assert (args.unix, args.address, args.port, args.committee) == (True, "race", DEFAULT_PORT, "calibrated")
    args = parser.parse_args(["serve", "m.pt", "s.xyz", "-a", "node01", "-p", "31415", "--device", "cpu"])
    assert (args.unix, args.address, args.port, args.device) == (False, "node01", 31415, "cpu")
    assert args.pbc is None
    assert parser.parse_args(["serve", "m.pt", "s.xyz", "--pbc"]).pbc is True
    assert parser.parse_args(["serve", "m.pt", "s.xyz", "--no-pbc"]).pbc is False


# --- a real i-PI ---------------------------------------------------------------------------------


@pytest.fixture
def ipi_script():
    pytest.importorskip("ipi")
    script = Path(sys.executable).with_name("i-pi")
    if not script.exists():
        script = Path(shutil.which("i-pi") or "")
    if not script.is_file():
        pytest.skip("the i-pi script is not installed next to the ipi package")
    return script


def write_ipi_xyz(path, atoms, box=20.0):
    lines = [str(len(atoms)), f"# CELL(abcABC): {box} {box} {box} 90.0 90.0 90.0 cell{{angstrom}} positions{{angstrom}}"]
    lines += [f"{s} {x:.10f} {y:.10f} {z:.10f}" for s, (x, y, z) in zip(atoms.get_chemical_symbols(), atoms.positions)]
    path.write_text("\n".join(lines) + "\n")


def ipi_input(forcefield, outputs, nbeads, steps, prefix=None, mode="nvt"):
    thermostat = '<thermostat mode="pile_l"><tau units="femtosecond">100</tau></thermostat>' if mode == "nvt" else ""
    attributes = f' sockets_prefix="{prefix}"' if prefix else ""
    return f"""<simulation verbosity="low" floatformat="%.16e" safe_stride="1000"{attributes}>
  <output prefix="sim">{outputs}</output>
  <total_steps>{steps}</total_steps>
  <prng><seed>12345</seed></prng>
  {forcefield}
  <system>
    <initialize nbeads="{nbeads}">
      <file mode="xyz">init.xyz</file>
      <velocities mode="thermal" units="kelvin">300</velocities>
    </initialize>
    <forces><force forcefield="{'committee' if 'ffcommittee' in forcefield else 'race'}"/></forces>
    <motion mode="dynamics">
      <dynamics mode="{mode}"><timestep units="femtosecond">0.5</timestep>{thermostat}</dynamics>
    </motion>
    <ensemble><temperature units="kelvin">300</temperature></ensemble>
  </system>
</simulation>
"""


def start_ipi(script, workdir, xml, socket_file):
    (workdir / "input.xml").write_text(xml)
    log = open(workdir / "ipi.log", "w")
    proc = subprocess.Popen([sys.executable, str(script), "input.xml"], cwd=workdir, stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not Path(socket_file).exists():
        assert proc.poll() is None, (workdir / "ipi.log").read_text()
        assert time.monotonic() < deadline, "i-PI did not open its socket"
        time.sleep(0.05)
    return proc


def finish(proc, workdir, timeout=60):
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert rc == 0, (workdir / "ipi.log").read_text()[-3000:]


def steps_done(workdir):
    path = workdir / "sim.out"
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return [int(float(row[0])) for row in rows if row]


def read_extras(path, width):
    """A per-bead extras trajectory printed with extra_type="a,b,...": ``width`` numbers per step."""
    numbers = [float(x) for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
               for x in line.split()]
    return np.array(numbers).reshape(-1, width)


def test_ipi_committee_receives_the_calculators_numbers(ipi_script, short_dir, model_file, calc, ethanol):
    """Path integrals (2 beads) through <ffcommittee parse_json>: per bead and step, i-PI's forces,
    mean energy and committee spread are RACECalculator's for the same positions."""
    write_ipi_xyz(short_dir / "init.xyz", ethanol)
    address = f"race-{uuid.uuid4().hex[:10]}"  # an ffsocket inside ffcommittee ignores sockets_prefix
    forcefield = f"""<ffcommittee name="committee"><parse_json>true</parse_json>
      <ffsocket name="race" mode="unix"><address>{address}</address></ffsocket></ffcommittee>"""
    outputs = """<properties stride="1" filename="out"> [ step, potential ] </properties>
      <trajectory filename="pos" stride="1" format="ase"> positions </trajectory>
      <trajectory filename="frc" stride="1" format="ase"> forces </trajectory>
      <trajectory filename="xtr" stride="1" extra_type="committee_pot,committee_uncertainty,committee_energy_std"> extras </trajectory>
      <trajectory filename="xfc" stride="1" extra_type="committee_force"> extras </trajectory>"""
    steps, nbeads = 3, 2
    proc = start_ipi(ipi_script, short_dir, ipi_input(forcefield, outputs, nbeads, steps), f"/tmp/ipi_{address}")
    client = Client(RACECalculator(model_file, device="cpu"), short_dir / "init.xyz", address)
    finish(proc, short_dir)
    assert client.join() == nbeads * (steps + 1)  # the initial forces and one evaluation per step

    n = len(ethanol)
    energies = np.zeros((steps + 1, nbeads))
    for bead in range(nbeads):
        positions = read(short_dir / f"sim.pos_{bead}.extxyz", ":")
        forces = read(short_dir / f"sim.frc_{bead}.extxyz", ":")
        extras = read_extras(short_dir / f"sim.xtr_{bead}", 3 + 1 + 1)
        committee_forces = read_extras(short_dir / f"sim.xfc_{bead}", 3 * n * 3).reshape(-1, 3, n, 3)
        assert len(positions) == len(forces) == len(extras) == len(committee_forces) == steps + 1
        for step, (frame, frc, row, members) in enumerate(zip(positions, forces, extras, committee_forces)):
            atoms = ethanol.copy()
            atoms.positions = frame.positions  # Å, 8 decimals
            ref = reference(calc, atoms)
            energies[step, bead] = ref["energy"]
            # forces{ase} are eV/Å; i-PI converted them back from the Hartree/Bohr we sent
            np.testing.assert_allclose(frc.get_forces(), ref["forces"], rtol=1e-5, atol=5e-8)
            pot, uncertainty, energy_std = row[:3], row[3], row[4]
            assert pot.mean() == pytest.approx(ref["energy"] / HA, rel=1e-6)
            # i-PI's committee_uncertainty (M−1 std, alpha=1) is the calibrated epistemic std
            assert uncertainty == pytest.approx(np.sqrt(ref["energy_var_epistemic"]) / HA, rel=1e-5)
            assert np.sqrt(ref["energy_var_epistemic"]) > 1e-3  # a spread worth comparing
            assert energy_std == pytest.approx(ref["energy_std"], rel=1e-6)
            np.testing.assert_allclose(members.mean(axis=0), ref["forces"] / FORCE, rtol=1e-5, atol=1e-9)
    potential = [float(line.split()[1]) for line in (short_dir / "sim.out").read_text().splitlines()
                 if not line.startswith("#")]
    np.testing.assert_allclose(potential, energies.mean(axis=1) / HA, rtol=1e-6)  # bead-averaged, Hartree


def test_killed_client_is_replaced_without_losing_a_step(ipi_script, short_dir, model_file, ethanol):
    write_ipi_xyz(short_dir / "init.xyz", ethanol)
    # i-PI 3.3's default consolidated exchange loses its polling thread to the ECONNRESET of a client
    # killed mid-evaluation (the run then hangs); the classic exchange requeues the bead. The docs say so.
    forcefield = ('<ffsocket name="race" mode="unix"><address>race</address>'
                  '<consolidate_messages>false</consolidate_messages></ffsocket>')
    outputs = '<properties stride="1" filename="out" flush="1"> [ step, conserved, potential ] </properties>'
    xml = ipi_input(forcefield, outputs, nbeads=2, steps=100000, prefix=f"{short_dir}/")
    proc = start_ipi(ipi_script, short_dir, xml, short_dir / "race")
    first = subprocess.Popen([sys.executable, "-c", CLIENT, "serve", str(model_file), str(short_dir / "init.xyz"),
                              "-u", "-a", str(short_dir / "race"), "--device", "cpu"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    replacement = RACECalculator(model_file, device="cpu")  # built here: model building is not thread-safe
    second = None
    try:
        wait_for(lambda: len(steps_done(short_dir)) >= 4, proc, short_dir)
        first.send_signal(signal.SIGKILL)  # a crash: no goodbye on the socket
        first.wait(30)
        time.sleep(0.5)
        stalled = len(steps_done(short_dir))
        time.sleep(1.0)
        assert len(steps_done(short_dir)) == stalled  # no client, no progress: i-PI waits
        second = Client(replacement, short_dir / "init.xyz", str(short_dir / "race"))
        wait_for(lambda: len(steps_done(short_dir)) >= stalled + 4, proc, short_dir)
        (short_dir / "EXIT").touch()  # i-PI's soft exit: finish the step, checkpoint, EXIT to the clients
        finish(proc, short_dir)
        served = second.join()
    finally:
        for p in (first, proc):
            if p.poll() is None:
                p.kill()
    assert first.returncode == -signal.SIGKILL
    assert served >= 2 * 4
    steps = steps_done(short_dir)
    assert steps == list(range(len(steps))) and len(steps) >= stalled + 4  # every step once, none lost


def wait_for(condition, proc, workdir, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, (workdir / "ipi.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_two_clients_serve_one_server(ipi_script, short_dir, model_file, ethanol):
    write_ipi_xyz(short_dir / "init.xyz", ethanol)
    forcefield = '<ffsocket name="race" mode="unix"><address>race</address></ffsocket>'
    outputs = '<properties stride="1" filename="out"> [ step, potential ] </properties>'
    steps, nbeads = 6, 4
    # Both clients first: they wait for the socket, and i-PI accepts both before its first step. Each
    # has its own calculator, built here (building models in two threads at once is not safe).
    calculators = [RACECalculator(model_file, device="cpu") for _ in range(2)]
    clients = [Client(c, short_dir / "init.xyz", str(short_dir / "race")) for c in calculators]
    time.sleep(0.5)
    proc = start_ipi(ipi_script, short_dir, ipi_input(forcefield, outputs, nbeads, steps, prefix=f"{short_dir}/"),
                     short_dir / "race")
    finish(proc, short_dir)
    served = [c.join() for c in clients]
    assert all(isinstance(n, int) and n > 0 for n in served), served
    assert sum(served) == nbeads * (steps + 1)  # every bead evaluated once per step, by one client or the other
    assert steps_done(short_dir) == list(range(steps + 1))
    assert "Handshaking was successful" in (short_dir / "ipi.log").read_text()


def test_the_example_input_runs_with_the_default_model(ipi_script, short_dir):
    """examples/ipi_pimd/input.xml as shipped (8 beads, every output), for 2 steps on a private socket."""
    import xml.etree.ElementTree as ET

    example = Path(__file__).resolve().parents[1] / "examples" / "ipi_pimd"
    tree = ET.parse(example / "input.xml")
    root = tree.getroot()
    root.set("sockets_prefix", f"{short_dir}/")
    root.find("total_steps").text = "2"
    for output in root.find("output"):
        output.set("stride", "1")
    tree.write(short_dir / "input.xml")
    shutil.copy(example / "ethanol.xyz", short_dir / "ethanol.xyz")
    address = root.find("ffsocket/address").text
    calc = RACECalculator("ethanol-novelty", device="cpu")  # the default model, as the README runs it
    proc = start_ipi(ipi_script, short_dir, (short_dir / "input.xml").read_text(), short_dir / address)
    client = Client(calc, short_dir / "ethanol.xyz", str(short_dir / address))
    finish(proc, short_dir)
    assert client.join() == 8 * 3
    assert steps_done_named(short_dir / "ethanol-pimd.out") == [0, 1, 2]
    for bead in range(8):
        rows = read_extras(short_dir / f"ethanol-pimd.unc_{bead}", 2)
        assert rows.shape == (3, 2) and np.all(rows > 0)  # energy_std (eV), max_forces_std (eV/Å)
    centroid = read(short_dir / "ethanol-pimd.centroid.extxyz", ":")
    assert len(centroid) == 3 and centroid[0].get_chemical_formula() == read(example / "ethanol.xyz").get_chemical_formula()


def steps_done_named(path):
    rows = [line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return [int(float(row[0])) for row in rows]
