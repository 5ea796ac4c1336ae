"""Optional dependencies: a command that needs a missing one stops at once and says how to install it."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ase_race import extras
from ase_race.errors import RaceError
from ase_race.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def without(monkeypatch):
    """``without("laplace")``: the optional module cannot be found, as on a plain install."""
    real = importlib.util.find_spec

    def hide(*modules):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name.split(".")[0] in modules else real(name, *a))

    return hide


def test_require_names_the_package_and_the_install_command(without):
    without("pyscf")
    with pytest.raises(extras.MissingDependency) as err:
        extras.require("pyscf", "--fallback pyscf")
    message = str(err.value)
    assert "--fallback pyscf" in message and "'pyscf'" in message and "pip install 'ase-race[pyscf]'" in message
    assert isinstance(err.value, RaceError) and isinstance(err.value, ImportError)


def test_require_passes_when_installed():
    extras.require("pymatgen")  # a test extra
    assert extras.available("pymatgen")


def test_pymatgen_readers_say_how_to_install_pymatgen(without, tmp_path):
    from ase_race.data import frames_from_pymatgen, read_vasprun

    without("pymatgen")
    with pytest.raises(extras.MissingDependency, match=re.escape("pip install 'ase-race[pymatgen]'")):
        frames_from_pymatgen([])
    with pytest.raises(extras.MissingDependency, match="vasprun.xml"):
        read_vasprun(tmp_path / "vasprun.xml")


def test_laplace_over_all_weights_stops_before_reading_data(without, tmp_path):
    without("laplace")
    config = TrainConfig.from_dict({"method": "laplace", "train_file": str(tmp_path / "absent.extxyz"),
                                    "output_dir": str(tmp_path / "run")})
    # The data file does not exist: reaching it would raise a missing-file error instead.
    with pytest.raises(extras.MissingDependency, match=re.escape("pip install --no-deps laplace-torch")):
        from ase_race.training import fit

        fit(config)
    assert not (tmp_path / "run").exists()


def test_last_layer_laplace_needs_no_optional_package():
    from ase_race.training.methods import method_class

    laplace = method_class("laplace")
    config = TrainConfig.from_dict({"method": "laplace", "laplace": {"subset": "last_layer"}})
    assert laplace.requires(config.laplace) == ()
    assert laplace.requires(TrainConfig.from_dict({"method": "laplace"}).laplace) == ("laplace",)


@pytest.mark.skipif(extras.available("tblite"), reason="tblite is installed here")
def test_cli_reference_without_its_package_is_one_line(tmp_path):
    model = str(ROOT / "tests" / "data" / "modelfiles" / "v1.pt")
    proc = subprocess.run([sys.executable, "-m", "ase_race.cli.main", "stress-test", model, "--reference", "tblite",
                           "-o", str(tmp_path / "st")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "ase-race stress-test: error: --reference tblite needs the optional package 'tblite', which is not installed; "
        "install it with: pip install 'ase-race[tblite]'"
    ]


def test_makefile_installs_the_laplace_packages_the_message_names():
    makefile = (ROOT / "Makefile").read_text()
    line = next(line for line in makefile.splitlines() if line.startswith("LAPLACE :="))
    assert line.split(":=", 1)[1].split() == extras.LAPLACE_NO_DEPS.split()
    # ... and the README's table gives every extra's install command as the error message does
    readme = (ROOT / "README.md").read_text()
    for name, extra in extras.EXTRAS.items():
        for command in extra.install.split(" && "):
            assert f"`{command}`" in readme, (name, command)


def test_every_extra_is_declared_in_setup_cfg():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    declared = set(cfg["options.extras_require"])
    assert set(extras.EXTRAS) <= declared
    core = cfg["options"]["install_requires"]
    for name in extras.EXTRAS:  # none of them is pulled by a plain install
        assert not re.search(rf"^\s*{name}", core, re.M), name
