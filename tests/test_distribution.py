"""The wheel carries the shipped models, and names resolve inside an installed package."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_shipped_model(tmp_path):
    pytest.importorskip("setuptools")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = tmp_path.glob("ase_race-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"ase_race/models/{p.name}" for p in (ROOT / "models").glob("*.pt")}
    assert shipped and shipped <= names
    assert "ase_race/modelfile.py" in names and not any(n.startswith("tests/") for n in names)


def test_models_inside_the_package_are_found_first():
    from ase_race import modelfile

    package, checkout = modelfile.SHIPPED_MODELS_DIRS
    assert package == Path(modelfile.__file__).resolve().parent / "models"
    assert checkout == ROOT / "models"
    assert modelfile.resolve_model_path("ethanol-novelty").parent == modelfile.SHIPPED_MODELS_DIR
