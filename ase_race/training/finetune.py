"""Fine-tune a posterior on new labelled frames (the fallback loop's retraining step).

Every network of the posterior (one for MVE and the Laplace posteriors, each member of an
ensemble, the mean network of SWAG/IVON) continues training from its current weights on the
new frames, optionally mixed with earlier data, with the joint NLL. The posterior's other
parts (Laplace covariance, SWAG moments, IVON Hessian) are kept as they were: a fine-tune
moves the mean; refit the posterior from scratch when the data have changed a lot.
"""

from __future__ import annotations

import copy
import logging
import tempfile

from ..config import TrainConfig
from ..data import Frame
from ..posteriors import EnsemblePosterior, Posterior
from .batches import GraphDataset
from .loop import Trainer

log = logging.getLogger("ase_race.training")


def fine_tune(posterior: Posterior, frames: list[Frame], epochs: int = 20, lr: float = 1e-3,
              loss: str = "nll_jef", batch_size: int = 4, seed: int = 0) -> Posterior:
    """A copy of ``posterior`` whose networks were trained ``epochs`` more epochs on ``frames``.

    All frames are used for training and for selecting the best epoch (there are few of them
    in a fallback run); the learning rate is small so the model moves towards the new labels
    without forgetting the old ones abruptly.
    """
    if not frames:
        return posterior
    tuned = copy.deepcopy(posterior)
    networks = tuned.members if isinstance(tuned, EnsemblePosterior) else [tuned.model]
    config = networks[0].config
    data = GraphDataset(frames, config.species, config.r_max, networks[0].dtype)
    for k, network in enumerate(networks):
        with tempfile.TemporaryDirectory() as out:
            train_config = TrainConfig(
                loss=loss, lr=lr, max_epochs=epochs, batch_size=min(batch_size, len(frames)), warmup_epochs=0,
                energy_weight=1.0, forces_weight=1.0, ema_decay=0.0, output_dir=out, seed=seed + k,
                checkpoint_every=10**9, plateau_patience=10**6,
            )
            trainer = Trainer(train_config, config, data, data, initial_weights=network.state_dict())
            trainer.run()
            network.load_state_dict(trainer.best_model().state_dict())
    if isinstance(tuned, EnsemblePosterior):
        tuned = EnsemblePosterior(tuned.members, aleatoric=tuned.aleatoric)
    elif hasattr(tuned, "_stacked"):
        tuned._stacked = None  # sampled posteriors redraw around the new mean
    log.info("fine-tuned %d network(s) on %d frames for %d epochs", len(networks), len(frames), epochs)
    return tuned


def retrainer(epochs: int = 20, lr: float = 1e-3, **kwargs):
    """A ``retrain(posterior, atoms_list)`` for :class:`~ase_race.calculator.FallbackCalculator`
    that fine-tunes on the labelled ``ase.Atoms`` it collected (``REF_energy``/``REF_forces``)."""
    from ..data.readers import frame_from_atoms

    def retrain(posterior: Posterior, atoms_list) -> Posterior:
        return fine_tune(posterior, [frame_from_atoms(a) for a in atoms_list], epochs=epochs, lr=lr, **kwargs)

    return retrain
