"""Bead evaluations per second of input.xml with 1, 2, 4, ... `ase-race serve` clients.

    python throughput.py                       # 1, 2 and 4 clients, 40 timed steps each
    python throughput.py --clients 1 2 --steps 100 --long 400

For each client count: i-PI is started on a private Unix socket, the clients connect, and once
all of them are connected the next ``--steps`` MD steps are timed: rate = beads × steps / s.
Every client gets ``--threads`` torch threads (OMP_NUM_THREADS; default: the cores shared out
between the clients). ``--long`` then runs that many steps with the fastest client count and
prints the model's uncertainty along the path-integral run (every 10 steps: the beads' mean
energy_std and their largest max_forces_std, from i-PI's extras files).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def ipi_command() -> list[str]:
    script = Path(sys.executable).with_name("i-pi")
    if script.exists():
        return [sys.executable, str(script)]
    found = shutil.which("i-pi")
    if found is None:
        raise SystemExit("i-pi not found: pip install 'ase-race[ipi]'")
    return [found]


def prepare(workdir: Path, total_steps: int, consolidate: bool) -> int:
    """input.xml with a private socket in ``workdir``, properties every step; returns the bead count."""
    tree = ET.parse(HERE / "input.xml")
    sim = tree.getroot()
    sim.set("sockets_prefix", f"{workdir}/")
    sim.find("total_steps").text = str(total_steps)
    sim.find("output/properties").set("stride", "1")
    for traj in sim.findall("output/trajectory"):
        if traj.get("filename") != "unc":
            sim.find("output").remove(traj)
    sim.find("ffsocket/address").text = "race"
    sim.find("ffsocket/consolidate_messages").text = str(consolidate).lower()
    tree.write(workdir / "input.xml")
    shutil.copy(HERE / "ethanol.xyz", workdir / "ethanol.xyz")
    return int(sim.find("system/initialize").get("nbeads"))


def steps(workdir: Path) -> list[int]:
    path = workdir / "ethanol-pimd.out"
    if not path.exists():
        return []
    return [int(float(line.split()[0])) for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def properties(workdir: Path) -> np.ndarray:
    rows = [line.split() for line in (workdir / "ethanol-pimd.out").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    return np.array(rows, dtype=float)


def uncertainty(workdir: Path, nbeads: int) -> np.ndarray:
    """(steps, beads, 2): energy_std (eV) and max_forces_std (eV/Å) of every bead."""
    per_bead = []
    for bead in range(nbeads):
        lines = (workdir / f"ethanol-pimd.unc_{bead}").read_text().splitlines()
        per_bead.append([[float(x) for x in line.split()] for line in lines if line.strip() and "#" not in line])
    n = min(len(b) for b in per_bead)
    return np.array([b[:n] for b in per_bead]).transpose(1, 0, 2)


def run(args, n_clients: int, timed_steps: int, workdir: Path):
    nbeads = prepare(workdir, 1_000_000, args.consolidate)
    threads = args.threads or max(1, (os.cpu_count() or 1) // n_clients)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    server = subprocess.Popen(ipi_command() + ["input.xml"], cwd=workdir, stdout=open(workdir / "ipi.log", "w"),
                              stderr=subprocess.STDOUT)
    while not (workdir / "race").exists():
        if server.poll() is not None:
            raise SystemExit((workdir / "ipi.log").read_text())
        time.sleep(0.05)
    connected = []
    clients = []
    for _ in range(n_clients):
        cmd = shlex.split(args.client) + [args.model, "ethanol.xyz", "-u", "-a", str(workdir / "race"),
                                          "--device", args.device]
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        clients.append(proc)

        def watch(stream, out=connected):
            for line in stream:
                if "connected to i-PI" in line:
                    out.append(time.monotonic())
        threading.Thread(target=watch, args=(proc.stderr,), daemon=True).start()
    try:
        while len(connected) < n_clients or not steps(workdir):
            if server.poll() is not None or any(c.poll() is not None for c in clients):
                raise SystemExit("a process ended early: see " + str(workdir / "ipi.log"))
            time.sleep(0.02)
        first = steps(workdir)[-1] + 2  # from a step begun with every client in i-PI's pool
        while steps(workdir)[-1] < first:
            time.sleep(0.01)
        t0 = time.monotonic()
        while steps(workdir)[-1] < first + timed_steps:
            if server.poll() is not None:
                raise SystemExit((workdir / "ipi.log").read_text()[-2000:])
            time.sleep(0.01)
        elapsed = time.monotonic() - t0
        done = steps(workdir)[-1] - first
        (workdir / "EXIT").touch()
        server.wait(120)
        for c in clients:
            c.wait(120)
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
    status = [c.returncode for c in clients]
    return nbeads, threads, nbeads * done / elapsed, done, elapsed, status


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ethanol-novelty", help="model file or shipped name (default: ethanol-novelty)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4], help="client counts (default: 1 2 4)")
    p.add_argument("--steps", type=int, default=40, help="timed MD steps per client count (default: 40)")
    p.add_argument("--long", type=int, default=0, help="then a run of this many steps with the uncertainty table")
    p.add_argument("--threads", type=int, default=0, help="torch threads per client (default: cores / clients)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--consolidate", action="store_true", help="i-PI's consolidated exchange (see input.xml)")
    p.add_argument("--client", default=f"{shlex.quote(sys.executable)} -m ase_race.cli.main serve",
                   help="the client command, before its arguments (default: this python -m ase_race.cli.main serve)")
    args = p.parse_args(argv)

    print(f"model {args.model}, {os.cpu_count()} cores, consolidated exchange: {args.consolidate}")
    print(f"{'clients':>7} {'threads':>7} {'beads':>5} {'steps':>5} {'seconds':>8} {'bead evals/s':>12} {'speed-up':>8}")
    base, rates = None, {}
    for n in args.clients:
        with tempfile.TemporaryDirectory(prefix="race-ipi-", dir="/tmp") as tmp:
            nbeads, threads, rate, done, elapsed, status = run(args, n, args.steps, Path(tmp))
        base, rates[n] = base or rate, rate
        print(f"{n:7d} {threads:7d} {nbeads:5d} {done:5d} {elapsed:8.2f} {rate:12.1f} {rate / base:8.2f}"
              + ("" if all(s == 0 for s in status) else f"  client exit status {status}"), flush=True)
    if args.long:
        n = max(rates, key=rates.get)  # the fastest client count
        with tempfile.TemporaryDirectory(prefix="race-ipi-", dir="/tmp") as tmp:
            workdir = Path(tmp)
            nbeads, threads, rate, done, elapsed, status = run(args, n, args.long, workdir)
            props, unc = properties(workdir), uncertainty(workdir, nbeads)
        print(f"\n{done} steps with {n} clients: {rate:.1f} bead evals/s; uncertainty every 10 steps "
              f"(energy_std: mean over the {nbeads} beads; max_forces_std: largest bead)")
        print(f"{'step':>6} {'t/fs':>7} {'T/K':>7} {'energy_std/eV':>13} {'max_forces_std/(eV/Å)':>21}")
        by_step = {int(row[0]): row for row in props}
        for k, frame in enumerate(unc):
            step = 10 * k
            row = by_step.get(step)
            if row is None:
                continue
            print(f"{step:6d} {row[1] * 1000:7.1f} {row[3]:7.1f} {frame[:, 0].mean():13.4f} {frame[:, 1].max():21.4f}")
        print(f"whole run: energy_std {unc[..., 0].mean():.4f} eV mean, {unc[..., 0].max():.4f} max; "
              f"max_forces_std {unc[..., 1].mean():.4f} eV/Å mean, {unc[..., 1].max():.4f} max")
    return 0


if __name__ == "__main__":
    sys.exit(main())
