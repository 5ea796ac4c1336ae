"""``ase-race demo``: the README's main job — uncertainty-aware MD of ethanol with the shipped
default model, ``ethanol-novelty`` (Langevin, 500 K, 0.4 ps), writing into ``race_demo/``."""

from __future__ import annotations

from . import md


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="Langevin MD of ethanol with the shipped model, reporting uncertainty")
    md.add_arguments(p)
    # 800 steps keep the demo (with installation) under two minutes on two cores.
    p.set_defaults(run=md.run, output="race_demo", steps=800)
