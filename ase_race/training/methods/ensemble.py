"""Deep ensembles: M networks trained from seeds ``seed + k`` on one split."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ...errors import ConfigError
from ...posteriors import EnsemblePosterior
from ..loop import Trainer
from .base import Fitted, Method, MethodOptions, summary

log = logging.getLogger("ase_race.training")


@dataclass(frozen=True)
class EnsembleOptions(MethodOptions):
    """Options of ``method: ensemble`` (docs/posteriors/ensemble.md).

    Attributes:
        members: ensemble size M; member k trains with seed ``seed + k`` in
            ``output_dir/member_kk``, all on the same split.
    """

    members: int = 10

    def __post_init__(self) -> None:
        if self.members < 1:
            raise ConfigError(f"ensemble.members must be at least 1, got {self.members}")


class Ensemble(Method):
    """M independent runs; finished members are reused when the run is restarted."""

    kind = "ensemble"
    Options = EnsembleOptions
    legacy = {"members": "members"}

    def fit(self, config, model_config, train, valid, *, in_memory=False, on_step=None):
        members, states = [], []
        n = config.ensemble.members
        for k in range(n):
            member_config = config.replace(seed=config.seed + k, output_dir=str(Path(config.output_dir) / f"member_{k:02d}"))
            trainer = Trainer(member_config, model_config, train, valid, on_step=on_step, in_memory=in_memory)
            log.info("ensemble member %d/%d (seed %d)", k + 1, n, member_config.seed)
            states.append(trainer.run())
            if trainer.rank == 0:
                members.append(trainer.best_model())
        if not members:
            return None
        return Fitted(EnsemblePosterior(members, aleatoric=config.loss != "mse"), summary(states))
