"""Speed and memory of one RACECalculator call, optionally against MACE "small" in the same run.

    python benchmarks/speed.py [--preset small] [--data ../shared/data] [--mace-python PY]

For 9 (ethanol), 27 (3BPA), 192 (periodic water) and 1728 (water ×3×3×1) atoms, in float32
and float64, prints the median milliseconds per call (energy, forces and all variances, and
stress for periodic cells), the neighbour-list share of a call (a fresh vesin build; with the
skin most MD steps reuse the list and pay less), and the peak resident memory of the process.
With ``--mace-python`` (an interpreter that has mace-torch), a MACE small model is timed on the
same structures: calls alternate between the two processes, and the ratio is printed.
Weights are random: speed does not depend on their values.

    python benchmarks/speed.py --posteriors [--sizes 27 192 1728] [--dtypes float32] [--device cuda] [--only ensemble]

times every posterior (MVE, a 10-member ensemble, SWAG with 30 samples, IVON and Laplace with
16, the last-layer Laplace at full and reduced force rank) in one process, with the ratio to a
single model, and the plain loop over members/samples for the ensemble and SWAG
(benchmarks/_posterior_speed.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ase.build import molecule
from ase.io import read, write

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_speed_worker.py"


def structures(data: Path) -> dict[int, object]:
    water = read(data / "water" / "water_deepmd_all.extxyz", 0)
    return {
        9: molecule("CH3CH2OH"),
        27: read(data / "3bpa" / "train_300K.xyz", 0),
        192: water,
        1728: water * (3, 3, 1),
    }


class Worker:
    def __init__(self, python: str, kind: str, dtype: str, xyz: str):
        self.proc = subprocess.Popen(
            [python, str(WORKER), kind, dtype, xyz],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=HERE.parent,
        )

    def call(self) -> float:
        self.proc.stdin.write("call\n")
        self.proc.stdin.flush()
        return json.loads(self._line())["ms"]

    def finish(self) -> dict:
        self.proc.stdin.write("done\n")
        self.proc.stdin.flush()
        report = json.loads(self._line())
        self.proc.wait()
        return report

    def _line(self) -> str:
        """The next answer; other output of the libraries (banners, notices) is skipped."""
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.proc.args[2:4]} died")
            if line.startswith("@@"):
                return line[2:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--mace-python", help="python interpreter with mace-torch installed")
    parser.add_argument("--repeats", type=int, default=20, help="calls per structure (1728 atoms: 1/4)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[9, 27, 192, 1728])
    parser.add_argument("--dtypes", nargs="*", default=["float32", "float64"])
    parser.add_argument("--posteriors", action="store_true", help="time every posterior instead")
    parser.add_argument("--device", default=None, help="with --posteriors: cpu or cuda (default: cuda when present)")
    parser.add_argument("--only", nargs="*", help="with --posteriors: just these (name prefixes, e.g. ensemble), besides mve")
    args = parser.parse_args()

    systems = structures(args.data)
    if args.posteriors:
        import _posterior_speed

        for dtype in args.dtypes:
            _posterior_speed.run(systems, args.sizes, args.preset, dtype, args.repeats, args.device, args.only)
        return
    header = f"{'atoms':>5} {'dtype':>7} {'RACE ms':>9} {'NL ms':>7} {'NL %':>5} {'peak MiB':>9}"
    if args.mace_python:
        header += f" {'MACE ms':>9} {'MACE MiB':>9} {'RACE/MACE':>9}"
    print(f"preset {args.preset}; median over calls; peak = resident memory of the process")
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            xyz = f"{tmp}/{n}.xyz"
            write(xyz, systems[n])
            repeats = max(3, args.repeats // 4) if n > 1000 else args.repeats
            for dtype in args.dtypes:
                race = Worker(sys.executable, f"race:{args.preset}", dtype, xyz)
                mace = Worker(args.mace_python, "mace:small", dtype, xyz) if args.mace_python else None
                race_ms, mace_ms = [], []
                for _ in range(repeats):  # alternate, so both see the same machine load
                    race_ms.append(race.call())
                    if mace:
                        mace_ms.append(mace.call())
                r = race.finish()
                t = statistics.median(race_ms)
                line = (f"{n:5d} {dtype:>7} {t:9.1f} {r['nl_ms']:7.2f} {100 * r['nl_ms'] / t:5.1f} "
                        f"{r['peak_mib']:9.0f}")
                if mace:
                    m = mace.finish()
                    tm = statistics.median(mace_ms)
                    line += f" {tm:9.1f} {m['peak_mib']:9.0f} {t / tm:9.2f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
