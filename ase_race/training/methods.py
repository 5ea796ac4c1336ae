"""One fitting function per posterior method: data sets in, a :class:`Posterior` out.

Each ``fit_*`` has the signature ``(config, model_config, train_set, valid_set, on_step)`` and
returns a :class:`Fitted` (or None on data-parallel ranks other than 0, which only help).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..posteriors import EnsemblePosterior, IVONPosterior, MVEPosterior, Posterior, SWAGPosterior
from .loop import Trainer, TrainState

log = logging.getLogger("ase_race.training")


@dataclass
class Fitted:
    posterior: Posterior
    summary: dict[str, Any] = field(default_factory=dict)  # goes into the model file's metadata


def _summary(states: list[TrainState]) -> dict[str, Any]:
    wall = sum(s.elapsed_s for s in states)
    return {
        "best_epoch": [s.best_epoch for s in states] if len(states) > 1 else states[0].best_epoch,
        "epochs": [s.epoch for s in states] if len(states) > 1 else states[0].epoch,
        "wall_time_s": wall,
        "structures_per_s": sum(s.structures_seen for s in states) / max(wall, 1e-9),
    }


def fit_mve(config, model_config, train_set, valid_set, on_step=None) -> Fitted | None:
    trainer = Trainer(config, model_config, train_set, valid_set, on_step=on_step)
    state = trainer.run()
    if trainer.rank != 0:
        return None
    return Fitted(MVEPosterior(trainer.best_model()), _summary([state]))


def fit_ensemble(config, model_config, train_set, valid_set, on_step=None) -> Fitted | None:
    """M independent runs from seeds ``seed + k`` on one split; finished members are reused."""
    members, states = [], []
    for k in range(config.members):
        member_config = config.replace(seed=config.seed + k, output_dir=str(Path(config.output_dir) / f"member_{k:02d}"))
        trainer = Trainer(member_config, model_config, train_set, valid_set, on_step=on_step)
        log.info("ensemble member %d/%d (seed %d)", k + 1, config.members, member_config.seed)
        states.append(trainer.run())
        if trainer.rank == 0:
            members.append(trainer.best_model())
    if not members:
        return None
    return Fitted(EnsemblePosterior(members, aleatoric=config.loss != "mse"), _summary(states))




def fit_swag(config, model_config, train_set, valid_set, on_step=None) -> Fitted | None:
    """One run that collects SWAG moments from ``swag_start_epoch`` on."""
    trainer = Trainer(config, model_config, train_set, valid_set, on_step=on_step)
    state = trainer.run()
    if trainer.rank != 0:
        return None
    swag = trainer.swag
    if swag.count < 2:
        raise ConfigError(
            f"SWAG collected {swag.count} snapshot(s); it needs at least 2: lower swag_start_epoch "
            f"({config.swag_start_epoch}) or train longer (the run stopped at epoch {state.epoch})"
        )
    model = trainer.current_model()
    torch.nn.utils.vector_to_parameters(swag.mean.to(model.dtype), model.parameters())  # θ̄, the SWA mean
    posterior = SWAGPosterior(model, swag.sq_mean, torch.stack(swag.deviations), n_samples=config.test_samples or None, sample_seed=config.seed)
    return Fitted(posterior, {**_summary([state]), "swag_snapshots": swag.count})


def fit_ivon(config, model_config, train_set, valid_set, on_step=None) -> Fitted | None:
    """One run with the IVON optimiser; its mean and Hessian estimate become the posterior."""
    trainer = Trainer(config, model_config, train_set, valid_set, on_step=on_step)
    state = trainer.run()
    if trainer.rank != 0:
        return None
    group = trainer.optimizer.param_groups[0]
    posterior = IVONPosterior.from_optimizer_state(
        trainer.current_model(), group["hess"], group["ess"], group["weight_decay"],
        n_samples=config.test_samples or None, sample_seed=config.seed,
    )
    return Fitted(posterior, _summary([state]))


def fit_laplace(config, model_config, train_set, valid_set, on_step=None) -> Fitted | None:
    """Post hoc around ``base_model`` (or around an MVE network trained first)."""
    from ..modelfile import load_model
    from .laplace import fit_diag_laplace, fit_last_layer_laplace

    summary: dict[str, Any] = {}
    if config.base_model:
        base = load_model(config.base_model).posterior
        if not hasattr(base, "model"):
            raise ConfigError(f"{config.base_model}: Laplace needs a single-network model file, not {base.kind!r}")
        model = base.model
        if model.config.to_dict() != model_config.to_dict():
            log.info("using the base model's own config (species, E0s, scale) instead of the data's")
        summary["base_model"] = str(config.base_model)
    else:
        fitted = fit_mve(config, model_config, train_set, valid_set, on_step)
        if fitted is None:
            return None
        model, summary = fitted.posterior.model, dict(fitted.summary)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if (model.config.species, model.config.r_max, model.config.dtype) != (
        model_config.species, model_config.r_max, model_config.dtype
    ):  # a base model built differently from the data's config: its own graphs
        from .batches import GraphDataset

        train_set = GraphDataset(train_set.frames, model.config.species, model.config.r_max, model.dtype)
    if config.laplace_subset == "last_layer":
        posterior = fit_last_layer_laplace(model, train_set, config.laplace_prior_precision, device=device)
    else:
        posterior = fit_diag_laplace(
            model, train_set, config.laplace_prior_precision, n_samples=config.test_samples or None,
            sample_seed=config.seed, device=device, noise=config.laplace_noise,
        )
    return Fitted(posterior, {**summary, "laplace": posterior.hyper})


FITTERS = {"mve": fit_mve, "ensemble": fit_ensemble, "swag": fit_swag, "ivon": fit_ivon, "laplace": fit_laplace}
