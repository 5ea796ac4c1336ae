"""The off-distribution stress test: probe structures around a molecule, labelled by a reference,
and how well a model's σ covers and ranks its errors there (docs/evaluation.md)."""

from .report import Scored, format_report, score, stress_test, write_report
from .structures import KINDS, Probe, atom_pairs, bond_scans, bonds, md_frames, normal_mode_scans

__all__ = ["KINDS", "Probe", "Scored", "atom_pairs", "bond_scans", "bonds", "format_report", "md_frames",
           "normal_mode_scans", "score", "stress_test", "write_report"]
