"""Serve a RACE model to i-PI: a socket client of the i-PI protocol.

i-PI (the server) owns the dynamics, path integrals, thermostats and barostats; every
client connected to it evaluates whatever structures (beads, replicas) it is handed, so a
run scales out by starting more clients, on one machine (Unix socket) or several (TCP).

On the wire everything is in atomic units: positions and cell in Bohr, energy and virial
in Hartree, forces in Hartree/Bohr. The client converts with :mod:`ase.units`
(CODATA 2014 in ASE; i-PI's own constants agree to 1e-7 relative). The protocol carries no
atomic numbers, so the client is given a template structure: its species in i-PI's atom
order, and its ``pbc`` (a periodic template gets i-PI's cell and returns the virial
−V·stress; a molecule keeps its own cell and returns a zero virial). i-PI's own xyz files
carry a cell for molecules too, and ASE reads them without one, so periodicity is never
guessed from i-PI's cell: give ``pbc=True`` (``--pbc``) for a periodic system.

Each result also carries a JSON ``extras`` string (i-PI keeps it per bead; print it with
``<trajectory extra_type="energy_std,max_forces_std"> extras </trajectory>``):

========================== ============ ====================================================
key                        shape        meaning (the units of RACECalculator, not atomic)
========================== ============ ====================================================
``energy_std``             float        total predictive energy std, eV
``max_forces_std``         float        max_i √(trace Σ_i), eV/Å
``forces_std``             (n, 3)       per-atom, per-component force std, eV/Å
``committee_pot``          (M,)         members' energies, Hartree (sampling posteriors)
``committee_force``        (M, 3n)      members' forces, Hartree/Bohr
``committee_virial``       (M, 9)       members' virials, Hartree (zeros for a molecule)
``committee_scale``        float        the factor s below (1 for ``committee="raw"``)
========================== ============ ====================================================

The ``committee_*`` keys are the ones i-PI's ``<ffcommittee>`` reads from a single client
with ``<parse_json>true</parse_json>``; it replaces the client's energy, forces and virial by
the committee mean (the same numbers) and reports ``committee_uncertainty``, the members'
standard deviation with the M − 1 denominator. With ``committee="calibrated"`` (default)
the members are sent spread about their mean by s = √(energy_var_epistemic / var₁(E_m)),
var₁ the M − 1 variance of the raw member energies, so that i-PI's
``committee_uncertainty`` (at its default ``alpha`` = 1) equals the calculator's calibrated
epistemic energy std √``energy_var_epistemic``. One s per structure scales energies,
forces and virials alike, so each sent member stays a consistent potential (its forces are
minus its energy's gradient when the calibration is a plain scale). ``committee="raw"``
sends the members as evaluated; ``"off"`` sends no committee.

The client answers the first ``STATUS`` with ``NEEDINIT``, so i-PI sends ``INIT`` first and
can announce a ``batch_size`` (``<ffsocket><batch_size>``): batched requests are evaluated
one structure after another. i-PI's shared-memory mode (``mode="shm"``) is not supported.
Non-finite results raise :class:`~ase_race.errors.PredictionError` before anything is sent.
"""

from __future__ import annotations

import json
import socket
import time

import numpy as np
from ase import Atoms, units

from . import _keys as K
from .errors import PredictionError, ProtocolError, StructureError

#: i-PI's own default (``<ffsocket><port>``), so that a port given on neither side matches
DEFAULT_PORT = 65535
#: where i-PI (and ASE) put Unix sockets: PREFIX + address (``<simulation sockets_prefix>``)
SOCKETS_PREFIX = "/tmp/ipi_"
COMMITTEE_MODES = ("calibrated", "raw", "off")

HEADER = 12
_ENERGY = 1.0 / units.Hartree  # eV → Hartree
_FORCE = units.Bohr / units.Hartree  # eV/Å → Hartree/Bohr


def _message(name: str) -> bytes:
    return name.encode("ascii").ljust(HEADER)


def unix_socket_path(address: str, sockets_prefix: str = SOCKETS_PREFIX) -> str:
    """The file of a Unix socket: ``address`` itself when it names a path (contains a
    ``/``), else ``sockets_prefix + address`` as i-PI builds it (/tmp/ipi_ADDRESS)."""
    return address if "/" in address else f"{sockets_prefix}{address}"


def _template(atoms, pbc: bool | None = None) -> Atoms:
    """The structure whose species, order and periodicity the client uses.

    ``pbc`` None keeps the template's own; i-PI's xyz files always carry a cell (a molecule
    sits in a box), which ASE does not read, so a periodic system given as i-PI's xyz needs
    ``pbc=True``. A partly periodic template (a slab) is refused: i-PI's cell is all or nothing.
    """
    if isinstance(atoms, Atoms):
        template, where = atoms.copy(), "the template structure"
    else:
        from ase.io import read

        template, where = read(str(atoms)), f"the template structure {atoms}"
    template.calc = None
    if len(template) == 0:
        raise StructureError(f"{where} has no atoms")
    if pbc is not None:
        template.pbc = bool(pbc)
    if template.pbc.any() and not template.pbc.all():
        raise StructureError(f"{where} is periodic in some directions only (pbc={template.pbc.tolist()}); "
                             "i-PI's cell is periodic in all three or, for a molecule, ignored")
    return template


def _calculator(model_or_calc, device, dtype):
    from .calculator import RACECalculator

    if isinstance(model_or_calc, RACECalculator):
        if device is not None or dtype is not None:
            raise ValueError("device and dtype are those of the calculator passed in; give a model to choose them")
        return model_or_calc
    return RACECalculator(model_or_calc, device=device, dtype=dtype)


class Evaluator:
    """Turns i-PI's structures (atomic units) into i-PI's results with a RACECalculator.

    Args:
        calc: the :class:`~ase_race.calculator.RACECalculator`.
        template: species, atom order and pbc of the structures i-PI will send.
        committee: ``"calibrated"``, ``"raw"`` or ``"off"`` (see the module docstring).
    """

    def __init__(self, calc, template: Atoms, committee: str = "calibrated"):
        if committee not in COMMITTEE_MODES:
            raise ValueError(f"committee must be one of {COMMITTEE_MODES}, got {committee!r}")
        self.calc = calc
        self.atoms = template.copy()
        self.atoms.calc = calc
        self.periodic = bool(self.atoms.pbc.all())
        self.committee = committee if calc.posterior.provides_ensemble else "off"
        self.n_evaluations = 0

    def __call__(self, cell_bohr: np.ndarray, positions_bohr: np.ndarray):
        """One structure: ``cell_bohr`` (3, 3) with the lattice vectors as columns (i-PI's h),
        ``positions_bohr`` (n, 3). Returns (energy Ha, forces (n, 3) Ha/Bohr, virial (3, 3) Ha,
        extras JSON)."""
        atoms = self.atoms
        positions = np.asarray(positions_bohr, dtype=np.float64).reshape(-1, 3)
        if len(positions) != len(atoms):
            raise StructureError(f"i-PI sent {len(positions)} atoms; the template structure has {len(atoms)} "
                                 f"({atoms.get_chemical_formula()})")
        atoms.positions = positions * units.Bohr
        if self.periodic:
            atoms.cell = np.asarray(cell_bohr, dtype=np.float64).reshape(3, 3).T * units.Bohr
        energy = atoms.get_potential_energy()
        results = self.calc.results
        forces = results[K.FORCES]
        virial = np.zeros((3, 3))
        if self.periodic:
            virial = -atoms.get_volume() * _full(results[K.STRESS])
        extras = {
            K.ENERGY_STD: results[K.ENERGY_STD],
            K.MAX_FORCES_STD: results[K.MAX_FORCES_STD],
            K.FORCES_STD: results[K.FORCES_STD],
        }
        if self.committee != "off":
            extras.update(self._committee(results, atoms))
        out = (energy * _ENERGY, forces * _FORCE, virial * _ENERGY, extras)
        _check_finite(out, atoms)
        self.n_evaluations += 1
        return out[0], out[1], out[2], json.dumps(_plain(out[3]), allow_nan=False)

    def _committee(self, results: dict, atoms: Atoms) -> dict:
        energies = results[K.ENERGY_ENSEMBLE]
        members = len(energies)
        if members < 2:
            return {}
        forces = results[K.FORCES_ENSEMBLE].reshape(members, -1)
        if self.periodic and K.STRESS_ENSEMBLE in results:
            virials = np.stack([-atoms.get_volume() * _full(s) for s in results[K.STRESS_ENSEMBLE]]).reshape(members, 9)
        else:
            virials = np.zeros((members, 9))
        scale = 1.0
        spread = np.var(energies, ddof=1)
        if self.committee == "calibrated" and spread > 0:
            scale = float(np.sqrt(results[K.ENERGY_VAR_EPISTEMIC] / spread))

        def about_mean(x):
            mean = x.mean(axis=0)
            return mean + scale * (x - mean)

        return {
            "committee_pot": about_mean(energies) * _ENERGY,
            "committee_force": about_mean(forces) * _FORCE,
            "committee_virial": about_mean(virials) * _ENERGY,
            "committee_scale": scale,
        }


def _full(voigt) -> np.ndarray:
    """ASE Voigt (xx, yy, zz, yz, xz, xy) → symmetric (3, 3)."""
    xx, yy, zz, yz, xz, xy = voigt
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def _check_finite(out, atoms: Atoms) -> None:
    energy, forces, virial, extras = out
    named = {"energy": energy, "forces": forces, "virial": virial, **extras}
    bad = sorted(name for name, value in named.items() if not np.all(np.isfinite(value)))
    if bad:
        raise PredictionError(f"non-finite {', '.join(bad)} for {atoms.get_chemical_formula()}; "
                              "refusing to send them to i-PI")


def _plain(extras: dict) -> dict:
    return {k: v.tolist() if isinstance(v, np.ndarray) else float(v) for k, v in extras.items()}


class _Closed(Exception):
    """The server went away while the client was answering (its run is over)."""


class _Connection:
    """The bytes of one socket, read exactly."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def read(self, nbytes: int, header: bool = False) -> bytes | None:
        chunks, left = [], nbytes
        while left:
            try:
                chunk = self.sock.recv(left)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                if header and left == nbytes:
                    return None  # closed between messages: the server is done
                raise ProtocolError(f"i-PI closed the socket in the middle of a message ({nbytes - left} of "
                                    f"{nbytes} bytes read)")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def array(self, dtype, count: int) -> np.ndarray:
        dtype = np.dtype(dtype)
        return np.frombuffer(self.read(dtype.itemsize * count), dtype=dtype).copy()

    def send(self, *parts) -> None:
        try:
            self.sock.sendall(b"".join(p if isinstance(p, bytes) else np.ascontiguousarray(p).tobytes() for p in parts))
        except (BrokenPipeError, ConnectionResetError):
            raise _Closed from None  # i-PI shuts its sockets down at the end of a run, a STATUS may be in flight


def connect(address: str, unix: bool = True, port: int = DEFAULT_PORT, sockets_prefix: str = SOCKETS_PREFIX,
            timeout: float = 60.0) -> socket.socket:
    """A socket connected to i-PI, retrying for up to ``timeout`` seconds while the server is not
    there yet (so clients may be started before the server)."""
    if unix:
        family, target = socket.AF_UNIX, unix_socket_path(address, sockets_prefix)
        where = f"Unix socket {target}"
    else:
        family, target = socket.AF_INET, (address, int(port))
        where = f"TCP {address}:{port}"
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        if not unix:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.connect(target)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as error:
            sock.close()
            if time.monotonic() >= deadline:
                raise ProtocolError(f"no i-PI server at {where} after {timeout:g} s ({error.strerror})") from None
            time.sleep(0.1)
        except OSError as error:
            sock.close()
            raise ProtocolError(f"cannot connect to i-PI at {where}: {error}") from None


def _batch_size(init: str) -> int:
    """The ``batch_size:N`` token i-PI appends to the INIT string (1 without it)."""
    for token in init.split(","):
        key, sep, value = token.partition(":")
        if sep and key.strip() == "batch_size":
            try:
                return max(1, int(value))
            except ValueError:
                raise ProtocolError(f"i-PI's INIT string has a malformed batch size {token!r}") from None
    return 1


def run_client(sock: socket.socket, evaluate, log=None) -> int:
    """Answer i-PI on a connected ``sock`` until it sends EXIT or closes the socket.

    ``evaluate(cell, positions)`` gives (energy, forces, virial, extras) in atomic units, as
    :class:`Evaluator` does. Returns the number of results delivered to i-PI.
    """
    say = (lambda text: print(f"ase-race serve: {text}", file=log, flush=True)) if log else (lambda text: None)
    count = [0]
    try:
        _answer(_Connection(sock), evaluate, count)
        say("i-PI sent EXIT")
    except _Closed:
        say("i-PI closed the connection")
    return count[0]


def _answer(conn: _Connection, evaluate, count: list) -> None:
    """The protocol loop of :func:`run_client`; ``count[0]`` counts the results delivered."""
    initialised, pending, batch = False, None, 1
    while True:
        raw = conn.read(HEADER, header=True)
        if raw is None:
            raise _Closed
        message = raw.decode("ascii", errors="replace").strip()
        if message == "STATUS":
            state = "NEEDINIT" if not initialised else "HAVEDATA" if pending is not None else "READY"
            conn.send(_message(state))
        elif message == "INIT":
            conn.array(np.int32, 1)  # the replica index: every bead is evaluated alike
            length = int(conn.array(np.int32, 1)[0])
            text = conn.read(length).decode("utf-8", errors="replace") if length > 0 else ""
            batch = _batch_size(text)
            initialised = True
        elif message == "POSDATA":
            if batch == 1:
                cell = conn.array(np.float64, 9).reshape(3, 3)
                conn.array(np.float64, 9)  # the inverse cell
                n = int(conn.array(np.int32, 1)[0])
                structures = [(cell, conn.array(np.float64, 3 * n))]
            else:
                n = int(conn.array(np.int32, 1)[0])
                cells = conn.array(np.float64, 18 * batch).reshape(batch, 2, 3, 3)[:, 0]
                positions = conn.array(np.float64, 3 * n * batch).reshape(batch, 3 * n)
                structures = list(zip(cells, positions))
            pending = [evaluate(cell, pos.reshape(n, 3)) for cell, pos in structures]
            initialised = True
        elif message == "GETFORCE":
            if pending is None:
                raise ProtocolError("i-PI asked for forces before sending positions")
            conn.send(_message("FORCEREADY"), *_payload(pending, batch))
            count[0] += len(pending)
            pending = None
        elif message == "EXIT":
            return
        else:
            raise ProtocolError(f"unexpected message {raw!r} from i-PI")


def _payload(results, batch: int) -> list:
    """FORCEREADY's body: one result as i-PI reads it, or a batch in its batched layout."""
    n = len(results[0][1])
    extras = [r[3].encode("utf-8") for r in results]
    if batch == 1:
        energy, forces, virial, _ = results[0]
        return [np.float64(energy), np.int32(n), forces.astype(np.float64), virial.T.astype(np.float64),
                np.int32(len(extras[0])), extras[0]]
    parts = [np.array([r[0] for r in results], np.float64), np.int32(n),
             np.stack([r[1] for r in results]).astype(np.float64), np.stack([r[2].T for r in results]).astype(np.float64)]
    for text in extras:
        parts += [np.int32(len(text)), text]
    return parts


def serve(
    model_or_calc,
    address: str = "localhost",
    unix: bool = True,
    port: int = DEFAULT_PORT,
    device=None,
    dtype=None,
    *,
    atoms,
    sockets_prefix: str = SOCKETS_PREFIX,
    committee: str = "calibrated",
    pbc: bool | None = None,
    connect_timeout: float = 60.0,
    log=None,
) -> int:
    """Connect to i-PI and evaluate the structures it sends until it sends EXIT or closes the
    socket (the end of its run). Returns the number of results delivered to i-PI.

    Args:
        model_or_calc: a model file, shipped model name, ModelBundle or Posterior, or a
            :class:`~ase_race.calculator.RACECalculator` (then ``device``/``dtype`` stay None).
        address: the Unix socket's name (the file is ``sockets_prefix + address``, or
            ``address`` itself when it contains a ``/``), or the server's host name for TCP.
        unix: Unix socket (one machine) rather than TCP (``port``, several machines).
        device, dtype: as for :class:`~ase_race.calculator.RACECalculator`.
        atoms: the template structure (an ``ase.Atoms`` or a file ase.io reads): species in
            i-PI's atom order, and pbc.
        committee: ``"calibrated"``, ``"raw"`` or ``"off"`` (module docstring).
        pbc: True: periodic in all three directions (i-PI's cell is used and a virial
            returned); False: a molecule; None: the template's own pbc. i-PI's xyz files
            read as molecules, so a periodic system in i-PI's xyz needs True.
        connect_timeout: seconds to keep trying while the server is not up yet.
        log: a text stream for one-line progress messages (None: quiet).
    """
    evaluator = Evaluator(_calculator(model_or_calc, device, dtype), _template(atoms, pbc), committee)
    if log:
        kind = "periodic (i-PI's cell, virial returned)" if evaluator.periodic else "a molecule (no cell, zero virial)"
        print(f"ase-race serve: {evaluator.atoms.get_chemical_formula()}, {kind}", file=log, flush=True)
    sock = connect(address, unix=unix, port=port, sockets_prefix=sockets_prefix, timeout=connect_timeout)
    if log:
        where = unix_socket_path(address, sockets_prefix) if unix else f"{address}:{port}"
        print(f"ase-race serve: connected to i-PI at {where}", file=log, flush=True)
    try:
        return run_client(sock, evaluator, log=log)
    finally:
        sock.close()


__all__ = ["DEFAULT_PORT", "SOCKETS_PREFIX", "Evaluator", "connect", "run_client", "serve", "unix_socket_path"]
