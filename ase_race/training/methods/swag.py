"""SWAG (Maddox et al. 2019): Gaussian moments of the weights collected while training.

After every snapshot θ_t (t = 1 … T), taken at the end of every ``interval``-th epoch from
``start_epoch`` on:

    θ̄   = (1/T) Σ_t θ_t            running mean
    θ²̄  = (1/T) Σ_t θ_t²           running second moment (element-wise)
    D    = [θ_t − θ̄_t] for the last K snapshots, θ̄_t being the mean after snapshot t

which :class:`~ase_race.posteriors.SWAGPosterior` samples from (docs/posteriors/swag.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import ConfigError
from ...posteriors import SWAGPosterior
from ..loop import Trainer, TrainingHooks
from .base import Fitted, Method, MethodOptions, summary


@dataclass(frozen=True)
class SWAGOptions(MethodOptions):
    """Options of ``method: swag``.

    Attributes:
        start_epoch: first epoch whose end weights are a snapshot.
        interval: epochs between snapshots.
        rank: deviation columns K kept (the last K snapshots), at least 2.
        lr: constant learning rate from the start epoch on (0 = keep the current one); the
            plateau decay stops there either way.
        test_samples: weight samples at prediction time (0 = 30).
    """

    start_epoch: int = 50
    interval: int = 1
    rank: int = 40
    lr: float = 0.0
    test_samples: int = 0

    training_keys = ("start_epoch", "interval", "rank", "lr")

    def __post_init__(self) -> None:
        if self.rank < 2 or self.interval < 1:
            raise ConfigError(f"swag.rank must be ≥ 2 and swag.interval ≥ 1, got {self.rank} and {self.interval}")


class SWAGCollector:
    """Running SWAG statistics of a flattened parameter vector (P,), kept in float64."""

    def __init__(self, n_params: int, rank: int):
        self.rank = rank
        self.count = 0
        self.mean = torch.zeros(n_params, dtype=torch.float64)
        self.sq_mean = torch.zeros(n_params, dtype=torch.float64)
        self.deviations: list[torch.Tensor] = []

    def collect(self, theta: torch.Tensor) -> None:
        theta = theta.detach().double().cpu()
        self.count += 1
        self.mean += (theta - self.mean) / self.count
        self.sq_mean += (theta**2 - self.sq_mean) / self.count
        self.deviations.append(theta - self.mean)
        self.deviations = self.deviations[-self.rank :]

    def state_dict(self) -> dict:
        return {
            "count": self.count,
            "mean": self.mean,
            "sq_mean": self.sq_mean,
            "deviations": torch.stack(self.deviations) if self.deviations else torch.zeros(0, self.mean.numel(), dtype=torch.float64),
        }

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.mean, self.sq_mean = state["mean"].double(), state["sq_mean"].double()
        self.deviations = list(state["deviations"].unbind(0))


class SWAGHooks(TrainingHooks):
    """Snapshots at epoch ends; from ``start_epoch`` on the learning rate is SWAG's."""

    def __init__(self, options: SWAGOptions):
        self.options = options
        self.collector: SWAGCollector | None = None

    def setup(self, trainer) -> None:
        self.collector = SWAGCollector(sum(p.numel() for p in trainer.model.parameters()), self.options.rank)

    def end_of_epoch(self, trainer) -> bool:
        epoch, o = trainer.state.epoch, self.options
        if epoch + 1 < o.start_epoch:
            return False
        if epoch >= o.start_epoch and (epoch - o.start_epoch) % o.interval == 0:
            self.collector.collect(torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()]))
        if o.lr:  # constant from the start epoch on (set before it trains)
            for group in trainer.optimizer.param_groups:
                group["lr"] = o.lr
        return True

    def state_dict(self) -> dict:
        return self.collector.state_dict()

    def load_state_dict(self, state: dict, trainer) -> None:
        if "count" in state:
            self.collector.load_state_dict(state)


class SWAG(Method):
    """One run that collects the moments; the SWA mean θ̄ becomes the network's weights."""

    kind = "swag"
    Options = SWAGOptions
    legacy = {"swag_start_epoch": "start_epoch", "swag_interval": "interval", "swag_rank": "rank", "swag_lr": "lr",
              "test_samples": "test_samples"}

    @classmethod
    def hooks(cls, config):
        return SWAGHooks(config.swag)

    def fit(self, config, model_config, train, valid, *, in_memory=False, on_step=None):
        options = config.swag
        hooks = self.hooks(config)
        trainer = Trainer(config, model_config, train, valid, on_step=on_step, hooks=hooks, in_memory=in_memory)
        state = trainer.run()
        if trainer.rank != 0:
            return None
        swag = hooks.collector
        if swag.count < 2:
            raise ConfigError(
                f"SWAG collected {swag.count} snapshot(s); it needs at least 2: lower swag.start_epoch "
                f"({options.start_epoch}) or train longer (the run stopped at epoch {state.epoch})"
            )
        model = trainer.current_model()
        torch.nn.utils.vector_to_parameters(swag.mean.to(model.dtype), model.parameters())  # θ̄, the SWA mean
        posterior = SWAGPosterior(model, swag.sq_mean, torch.stack(swag.deviations),
                                  n_samples=options.test_samples or None, sample_seed=config.seed)
        return Fitted(posterior, {**summary([state]), "swag_snapshots": swag.count})
