"""A PySCF DFT calculator for ASE: the reference level of the shipped rMD17 models.

``PySCFCalculator(xc="PBE", basis="def2-SVP", density_fit=True)`` is the level of theory of
rMD17 (PBE/def2-SVP); with density fitting it reproduces the dataset's labels to about 1 meV and
0.2 meV/Å (see docs/calculator.md for the measured agreement and cost). Molecules only (no
periodic cells). PySCF is an optional dependency (``pip install ase-race[pyscf]``), imported
when the calculator is first used.

Units: PySCF works in Hartree and Bohr; results are converted to eV and eV/Å.
"""

from __future__ import annotations

import numpy as np
from ase.calculators.calculator import Calculator, all_changes
from ase.units import Bohr, Hartree

from ..errors import StructureError


class PySCFCalculator(Calculator):
    """Kohn–Sham DFT energy and forces with PySCF.

    Args:
        xc: exchange–correlation functional (any name libxc/PySCF knows), e.g. "PBE", "B3LYP".
        basis: basis-set name, e.g. "def2-SVP", "6-31G*".
        density_fit: density fitting (RI-J) with PySCF's default auxiliary basis for ``basis``.
        charge, spin: total charge and 2S (number of unpaired electrons); spin > 0 runs UKS.
        conv_tol: SCF energy convergence in Hartree.
        max_memory: MB PySCF may use.
        verbose: PySCF's verbosity (0: silent).
    A calculation whose SCF does not converge raises RuntimeError (a fallback calculator's
    failure policy then decides what happens).
    """

    implemented_properties = ("energy", "free_energy", "forces")

    def __init__(
        self,
        xc: str = "PBE",
        basis: str = "def2-SVP",
        density_fit: bool = True,
        charge: int = 0,
        spin: int = 0,
        conv_tol: float = 1e-10,
        max_memory: int = 4000,
        verbose: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # in ASE's parameter dictionary too, so todict() tells labels of other settings apart
        self.parameters.update(xc=xc, basis=basis, density_fit=density_fit, charge=charge, spin=spin, conv_tol=conv_tol)
        self.xc, self.basis, self.density_fit = xc, basis, density_fit
        self.charge, self.spin, self.conv_tol = charge, spin, conv_tol
        self.max_memory, self.verbose = max_memory, verbose

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        from pyscf import dft, gto

        if self.atoms.pbc.any():
            raise StructureError("PySCFCalculator handles molecules only (pbc must be False)")
        mol = gto.M(
            atom=[(s, tuple(p)) for s, p in zip(self.atoms.get_chemical_symbols(), self.atoms.positions)],
            unit="Angstrom", basis=self.basis, charge=self.charge, spin=self.spin,
            verbose=self.verbose, max_memory=self.max_memory,
        )
        mf = (dft.UKS if self.spin else dft.RKS)(mol)
        mf.xc = self.xc
        mf.conv_tol = self.conv_tol
        if self.density_fit:
            mf = mf.density_fit()
        energy = mf.kernel()
        if not mf.converged:
            raise RuntimeError(f"PySCF SCF did not converge ({self.xc}/{self.basis})")
        gradient = mf.nuc_grad_method().kernel()  # Hartree/Bohr, (n, 3)
        energy_ev = float(energy) * Hartree
        self.results = {
            "energy": energy_ev,
            "free_energy": energy_ev,
            "forces": -np.asarray(gradient, dtype=np.float64) * Hartree / Bohr,
        }
