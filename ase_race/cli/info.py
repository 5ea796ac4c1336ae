"""``ase-race info MODEL``: what a model file holds."""

from __future__ import annotations

import json

from ase.data import chemical_symbols


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="describe a model file (config, posterior, calibration, metadata)")
    p.add_argument("model", help="model file or shipped model name")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..errors import ModelFileError
    from ..modelfile import load_model, read_model_dict, resolve_model_path

    data = read_model_dict(args.model)
    try:
        posterior = load_model(args.model).posterior.describe()
    except ModelFileError as err:  # still say what the file holds, and why it cannot be used
        posterior = f"{data['posterior'].get('kind')!r} (not loadable here: {err})"
    summary = {
        "file": str(resolve_model_path(args.model)),
        "format": f"{data['format']} v{data['version']}",
        "posterior": posterior,
        "species": [chemical_symbols[z] for z in data["config"]["species"]],
        "cutoff_A": data["config"]["r_max"],
        "dtype": data["config"]["dtype"],
        "config": data["config"],
        "calibration": data["calibration"],
        "metadata": data["metadata"],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for key in ("file", "format", "posterior", "species", "cutoff_A", "dtype"):
        print(f"{key:>12}: {summary[key]}")
    print(f"{'calibration':>12}: {summary['calibration']}")
    print(f"{'config':>12}: " + ", ".join(f"{k}={v}" for k, v in data["config"].items() if k not in ("species", "e0s")))
    for key, value in summary["metadata"].items():
        print(f"{key:>12}: {value}")
    return 0

