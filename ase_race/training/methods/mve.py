"""MVE: one network trained with the configured loss; its heads are the whole predictive."""

from __future__ import annotations

from ...posteriors import MVEPosterior
from ..loop import Trainer
from .base import Fitted, Method, summary


class MVE(Method):
    """One network, best validation (EMA) weights; no options of its own."""

    kind = "mve"

    def fit(self, config, model_config, train, valid, *, in_memory=False, on_step=None):
        trainer = Trainer(config, model_config, train, valid, on_step=on_step, in_memory=in_memory)
        state = trainer.run()
        if trainer.rank != 0:
            return None
        return Fitted(MVEPosterior(trainer.best_model()), summary([state]))
