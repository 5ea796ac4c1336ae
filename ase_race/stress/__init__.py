"""The off-distribution stress test: probe structures around a molecule, labelled by a reference,
and how well a model's σ covers and ranks its errors there (docs/evaluation.md)."""

from .report import (SPLITS, Scored, build_probes, format_report, label, read_labelled, score, score_model,
                     stress_test, write_report)
from .structures import KINDS, Probe, atom_pairs, bond_scans, bonds, md_frames, normal_mode_scans, small_molecules

__all__ = ["KINDS", "SPLITS", "Probe", "Scored", "atom_pairs", "bond_scans", "bonds", "build_probes", "format_report",
           "label", "md_frames", "normal_mode_scans", "read_labelled", "score", "score_model", "small_molecules",
           "stress_test", "write_report"]
