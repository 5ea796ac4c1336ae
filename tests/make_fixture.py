"""Write tests/data/modelfiles/v{FORMAT_VERSION}.pt and its expected predictions.

Run once whenever FORMAT_VERSION is bumped (never overwrite an older version's fixture):
    python tests/make_fixture.py
"""

import json
from pathlib import Path

from ase.build import molecule

from ase_race import RACECalculator, save_model
from ase_race.modelfile import FORMAT_VERSION
from ase_race.testing import random_posterior

out = Path(__file__).parent / "data" / "modelfiles"
path = out / f"v{FORMAT_VERSION}.pt"
if path.exists():
    raise SystemExit(f"{path} exists: fixtures of released versions are never rewritten")
post = random_posterior("tiny", seed=0, species=(1, 6, 8), scale=2.0)
save_model(path, post, metadata={"purpose": "format fixture"})
atoms = molecule("CH3CH2OH")
atoms.calc = RACECalculator(str(path))
expected = {
    "atoms": {"symbols": atoms.get_chemical_symbols(), "positions": atoms.positions.tolist()},
    "energy": atoms.get_potential_energy(),
    "forces": atoms.get_forces().tolist(),
    "energy_var": atoms.calc.results["energy_var"],
}
(out / f"v{FORMAT_VERSION}.json").write_text(json.dumps(expected, indent=1))
print("wrote", path)
