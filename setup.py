"""The package, plus the repository's ``models/`` shipped inside it as ``ase_race/models``.

Everything else (metadata, dependencies, extras) is in setup.cfg.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["ase_race", "ase_race.*"]) + ["ase_race.models"],
    package_dir={"ase_race.models": "models"},
    package_data={"ase_race.models": ["*.pt"]},
)
