import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule

from ase_race.errors import StructureError, UnknownElementError
from ase_race.graph import (
    NeighbourCache,
    batch_graphs,
    brute_force_edges,
    from_atoms,
    vesin_edges,
)


def edge_set(edges):
    return sorted(zip(edges.i.tolist(), edges.j.tolist(), map(tuple, edges.shifts.tolist())))


STRUCTURES = {
    "molecule": molecule("CH3CH2OH"),
    "bulk_small_cell": bulk("Cu", "fcc", a=3.6),  # cell far smaller than the cutoff
    "triclinic": Atoms(
        "SiO", scaled_positions=[[0, 0, 0], [0.3, 0.4, 0.6]],
        cell=[[3.0, 0.2, 0.1], [0.8, 3.3, 0.0], [0.4, 0.5, 2.9]], pbc=True,
    ),
    "slab_mixed_pbc": Atoms(
        "H2", positions=[[0, 0, 0], [0.7, 0.6, 0.3]], cell=[3.0, 2.5, 0.0], pbc=[True, True, False]
    ),
    "wire_one_periodic": Atoms(
        "H2", positions=[[0, 0, 0], [0.8, 0.3, 0.2]], cell=[[2, 0, 0], [0, 0, 0], [0, 0, 0]],
        pbc=[True, False, False],
    ),
}


@pytest.mark.parametrize("name", sorted(STRUCTURES))
def test_vesin_matches_brute_force(name):
    atoms = STRUCTURES[name]
    args = (atoms.positions, atoms.cell.array, atoms.pbc, 4.5)
    fast, ref = vesin_edges(*args), brute_force_edges(*args)
    assert len(fast.i) > 0
    assert edge_set(fast) == edge_set(ref)
    # vectors follow r_j - r_i + S·cell
    expected = atoms.positions[fast.j] - atoms.positions[fast.i] + fast.shifts @ atoms.cell.array
    np.testing.assert_allclose(fast.vectors, expected, atol=1e-10)


def test_small_cell_has_several_images_of_one_neighbour():
    atoms = bulk("Cu", "fcc", a=3.6)  # one atom: every neighbour is an image of itself
    edges = vesin_edges(atoms.positions, atoms.cell.array, atoms.pbc, 5.0)
    assert set(edges.j.tolist()) == {0}
    assert len(edges.i) == 12 + 6 + 24  # fcc shells at 2.55, 3.6 and 4.41 Å


def test_isolated_atom_has_no_edges():
    graph = from_atoms(Atoms("H"), species=[1], cutoff=5.0)
    assert graph["edge_index"].shape == (2, 0)


def test_skin_cache_reuses_list_and_matches_fresh_build():
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    cache = NeighbourCache(cutoff=4.0, skin=0.6)
    rng = np.random.default_rng(0)
    for step in range(5):
        pos = atoms.positions + rng.uniform(-0.1, 0.1, size=atoms.positions.shape)  # < skin/2
        cached = cache.edges(pos, atoms.cell.array, atoms.pbc)
        fresh = vesin_edges(pos, atoms.cell.array, atoms.pbc, 4.0)
        assert edge_set(cached) == edge_set(fresh)
    assert cache.n_builds == 1
    cache.edges(atoms.positions + 0.4 * (np.arange(len(atoms)) == 0)[:, None], atoms.cell.array, atoms.pbc)
    assert cache.n_builds == 2  # one atom moved more than skin / 2


def test_nan_positions_are_refused():
    atoms = molecule("H2O")
    atoms.positions[1, 0] = np.nan
    with pytest.raises(StructureError, match="NaN"):
        from_atoms(atoms, [1, 8], 5.0)


def test_zero_volume_cell_with_pbc_is_refused():
    atoms = molecule("H2O")
    atoms.pbc = True
    with pytest.raises(StructureError, match="zero volume"):
        from_atoms(atoms, [1, 8], 5.0)


def test_overlapping_atoms_are_refused():
    atoms = Atoms("H2", positions=[[0, 0, 0], [0.3, 0, 0]])
    with pytest.raises(StructureError, match=r"atoms 0 and 1 are 0\.300 Å apart"):
        from_atoms(atoms, [1], 5.0)
    from_atoms(atoms, [1], 5.0, min_distance=0.2)  # the limit is adjustable


def test_unknown_element_names_element_and_species():
    with pytest.raises(UnknownElementError, match=r"\['N'\].*\['H', 'C', 'O'\]"):
        from_atoms(molecule("HCN"), [1, 6, 8], 5.0)


def test_batching_offsets_indices(posterior64, ethanol, silicon):
    species, cutoff = posterior64.config.species, posterior64.config.r_max
    graphs = [from_atoms(a, species, cutoff) for a in (ethanol, silicon, molecule("H2O"))]
    batched = batch_graphs(graphs)
    assert batched["ptr"].tolist() == [0, 9, 9 + len(silicon), 9 + len(silicon) + 3]
    model = posterior64.model
    together = model(batched, compute_forces=True)
    one_by_one = [model(g, compute_forces=True) for g in graphs]
    torch.testing.assert_close(together["energy"], torch.cat([o["energy"] for o in one_by_one]), rtol=0, atol=1e-12)
    torch.testing.assert_close(together["forces"], torch.cat([o["forces"] for o in one_by_one]), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        together["energy_var"], torch.cat([o["energy_var"] for o in one_by_one]), rtol=1e-12, atol=0
    )
