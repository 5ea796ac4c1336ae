"""Fine-tune a posterior on new labelled frames (the fallback loop's retraining step).

Every network of the posterior (one for MVE and the Laplace posteriors, each member of an
ensemble, the mean network of SWAG/IVON) continues training from its current weights on the
new frames, mixed with a rehearsal sample of earlier data when given (``replay``), with the
joint NLL. The posterior's other parts (Laplace covariance, SWAG moments, IVON Hessian) are
kept as they were: a fine-tune moves the mean; refit the posterior from scratch when the data
have changed a lot.
"""

from __future__ import annotations

import copy
import itertools
import logging
from typing import Sequence

import numpy as np

from ..data import Frame
from ..posteriors import Posterior
from .batches import GraphDataset
from .config import TrainConfig
from .loop import Trainer

log = logging.getLogger("ase_race.training")


def fine_tune(posterior: Posterior, frames: list[Frame], epochs: int = 20, lr: float = 1e-3,
              loss: str = "nll_jef", batch_size: int = 4, seed: int = 0,
              replay: Sequence[Frame] = (), replay_size: int | None = None, ema_decay: float = 0.99) -> Posterior:
    """A copy of ``posterior`` whose networks were trained ``epochs`` more epochs on ``frames``.

    All frames are used for training and for selecting the best epoch (there are few of them
    in a fallback run); the learning rate is small so the model moves towards the new labels.

    ``replay``: earlier training frames rehearsed with the new ones. Fine-tuning on a handful
    of new structures alone makes the networks forget the rest of their data, and the members
    of an ensemble forget in different directions, so their spread (the epistemic variance)
    grows everywhere else. Each network trains on the new frames plus ``replay_size`` frames
    drawn from ``replay`` (all of them when None) with its own seed, so members rehearse
    different subsets as they were trained on different seeds.

    ``ema_decay``: the networks come out of training as moving averages of their weights; a
    fine-tune that returns raw iterates instead adds each member's optimiser noise to the
    ensemble's spread (benchmarks/fallback_ablation.py measures it on ethanol). The average
    starts from the weights before the fine-tune and is not bias-corrected, so after N steps
    a share decay^N of them remains: a pull towards the old model, like the rehearsal. The
    horizon 1/(1 − decay) is capped at half the steps, so that share is at most e⁻² ≈ 14 %.

    Isolated-atom frames in ``replay`` (E0 references, which have no forces) are left out, as
    in training. ``epochs`` ≤ 0 or no ``frames`` returns ``posterior`` itself.
    """
    if not frames or epochs <= 0:
        return posterior
    networks = [copy.deepcopy(network) for network in posterior.networks()]
    config = networks[0].config
    replay = [f for f in replay if not f.is_isolated_atom]
    n_replay = len(replay) if replay_size is None else min(int(replay_size), len(replay))
    for k, network in enumerate(networks):
        picked = np.random.default_rng(seed + k).choice(len(replay), n_replay, replace=False) if n_replay else []
        data = GraphDataset(list(frames) + [replay[i] for i in picked], config.species, config.r_max, network.dtype)
        size = min(batch_size, len(data))
        steps = epochs * -(-len(data) // size)
        decay = min(ema_decay, max(0.0, 1.0 - 2.0 / steps))
        # A constant learning rate (plateau_factor 1): the few new frames are also the
        # validation set, whose loss says little about when to decay.
        train_config = TrainConfig(
            loss=loss, lr=lr, max_epochs=epochs, batch_size=size, warmup_epochs=0,
            energy_weight=1.0, forces_weight=1.0, ema_decay=decay, seed=seed + k, plateau_factor=1.0,
        )
        trainer = Trainer(train_config, config, data, data, initial_weights=network.state_dict(), in_memory=True)
        trainer.run()
        network.load_state_dict(trainer.best_model().state_dict())
    tuned = posterior.with_networks(networks)
    log.info("fine-tuned %d network(s) on %d new frames and %d rehearsed for %d epochs",
             len(networks), len(frames), n_replay, epochs)
    return tuned


def retrainer(epochs: int = 20, lr: float = 1e-3, seed: int = 0, calibrate_on: Sequence[Frame] = (), **kwargs):
    """A ``retrain(bundle, atoms_list) -> bundle`` for :class:`~ase_race.calculator.FallbackCalculator`
    that fine-tunes on the labelled ``ase.Atoms`` it collected (``REF_energy``/``REF_forces``).

    ``kwargs`` go to :func:`fine_tune` (``replay``, ``replay_size``, ``loss``, ``batch_size``,
    ``ema_decay``); each retraining uses the next seed, so rehearsal samples are drawn afresh.

    ``calibrate_on``: held-out labelled frames (the ones the shipped calibration was fitted
    on). A calibration scales the variance of particular networks; once they have moved it no
    longer fits them, so with ``calibrate_on`` the NLL-optimal variance scales are refitted
    there after every retraining (:func:`~ase_race.training.assess.calibrate`; an isotonic map
    is replaced by scales, the stress scale is kept). Without it the old calibration is kept.
    """
    from ..data.readers import frame_from_atoms
    from ..modelfile import ModelBundle
    from .assess import calibrate

    # E0 references carry no forces and would set the energy scale on single atoms
    calibrate_on = [f for f in calibrate_on if not f.is_isolated_atom]
    rounds = itertools.count(1)

    def retrain(bundle: ModelBundle, atoms_list) -> ModelBundle:
        frames = [frame_from_atoms(a) for a in atoms_list]
        posterior = fine_tune(bundle.posterior, frames, epochs=epochs, lr=lr, seed=seed + 1000 * next(rounds), **kwargs)
        calibration = bundle.calibration
        if calibrate_on:
            calibration = calibrate(ModelBundle(posterior, bundle.calibration, bundle.metadata), calibrate_on)
            log.info("recalibrated on %d frames: %s", len(calibrate_on), calibration)
        return ModelBundle(posterior, calibration, bundle.metadata)

    return retrain
