"""IVON (Shen et al. 2024): variational learning with a Newton-like optimiser.

IVON keeps a mean m and a diagonal Hessian estimate h per weight; each step draws weights
θ ~ N(m, 1/(λ(h + δ))), takes the loss gradient there, and updates m and h. At the end the
posterior is that Gaussian (:class:`~ase_race.posteriors.IVONPosterior`); docs/posteriors/ivon.md
has the settings and the measurements behind their defaults.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from ...errors import ConfigError
from ...posteriors import IVONPosterior
from ..loop import Trainer, TrainingHooks
from .base import Fitted, Method, MethodOptions, summary

log = logging.getLogger("ase_race.training")


@dataclass(frozen=True)
class IVONOptions(MethodOptions):
    """Options of ``method: ivon``.

    Attributes:
        lr: IVON's learning rate.
        ess: effective sample size λ; 0 = the number of atoms in the training set.
        hess_init: initial Hessian estimate h₀.
        beta2: Hessian averaging β₂.
        weight_decay: δ, the prior precision per datum.
        train_samples: weight samples per training step.
        clip_radius: bound on each weight's preconditioned step (the early gradients of
            force-field losses are large, and without it IVON's steps diverge).
        test_samples: weight samples at prediction time (0 = 16).
        warm_start: how many of the ``max_epochs`` train the network with the config's
            Adam/AMSGrad first (in ``output_dir/warm_start``): a count when ≥ 1, a fraction of
            ``max_epochs`` below 1 (rounded down, and at least one epoch is left to IVON);
            0 = IVON from the first step. IVON starts from the warm start's best weights;
            ``max_time_s`` bounds each phase, as it bounds each ensemble member. IVON from
            scratch trains forces to about twice AMSGrad's error in the same epochs (ivon.md).
    """

    lr: float = 0.05
    ess: float = 0.0
    hess_init: float = 1.0
    beta2: float = 0.999
    weight_decay: float = 1e-4
    train_samples: int = 1
    clip_radius: float = 1.0
    test_samples: int = 0
    warm_start: float = 0.75

    training_keys = ("lr", "ess", "hess_init", "beta2", "weight_decay", "train_samples", "clip_radius",
                     "warm_start")
    renamed = MappingProxyType({"warm_start_epochs": "warm_start"})  # a count then, which warm_start reads the same

    def __post_init__(self) -> None:
        if self.train_samples < 1:
            raise ConfigError(f"ivon.train_samples must be at least 1, got {self.train_samples}")
        if not (self.warm_start >= 0 and (self.warm_start < 1 or float(self.warm_start).is_integer())):
            raise ConfigError(f"ivon.warm_start must be a fraction in [0, 1) or a whole number of epochs, "
                              f"got {self.warm_start}")

    def warm_start_epochs(self, max_epochs: int) -> int:
        """The number of Adam/AMSGrad epochs before IVON takes over."""
        if self.warm_start >= 1:
            return int(self.warm_start)
        return min(int(self.warm_start * max_epochs), max(0, max_epochs - 1))


@contextmanager
def sampled_weights(optimizer, parameters):
    """IVON's ``sampled_params(train=True)`` that restores the mean weights on an exception too.

    IVON's own context manager puts the mean back (and records the sample's gradient) only
    when its block finishes; an exception inside it would leave the network on sampled weights.
    """
    parameters = list(parameters)
    mean = [p.detach().clone() for p in parameters]
    context = optimizer.sampled_params(train=True)
    context.__enter__()
    try:
        yield
    except BaseException:
        with torch.no_grad():
            for p, m in zip(parameters, mean):
                p.data = m
        raise
    context.__exit__(None, None, None)


class IVONHooks(TrainingHooks):
    """IVON as the optimiser; each step averages gradients over ``train_samples`` weight samples.

    IVON draws its weight noise from torch's global generator; each step runs inside a forked
    RNG whose state lives in the checkpoint, so the caller's random stream is untouched and a
    resumed run draws the same noise.
    """

    def __init__(self, options: IVONOptions, seed: int):
        self.options = options
        self.steps = 0
        self.skipped_samples = 0
        self.rng = torch.Generator().manual_seed(seed + 7919).get_state()

    def make_optimizer(self, trainer):
        import ivon

        o = self.options
        return ivon.IVON(
            trainer.model.parameters(), lr=o.lr, ess=_ess(o, trainer), hess_init=o.hess_init, beta2=o.beta2,
            weight_decay=o.weight_decay, mc_samples=o.train_samples, clip_radius=o.clip_radius,
        )

    def step(self, trainer, batch, ref, warmup):
        losses = []
        model, optimizer = trainer.model, trainer.optimizer
        devices = [trainer.device] if trainer.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.rng)
            if devices:  # IVON samples on the parameters' device: seed it from our stream
                torch.cuda.manual_seed(int(torch.randint(2**62, (1,))))
            try:
                for _ in range(self.options.train_samples):
                    with sampled_weights(optimizer, model.parameters()):
                        # IVON reads p.grad at the end of each sample: it must hold this sample's only.
                        optimizer.zero_grad(set_to_none=False)
                        loss, parts = trainer.loss(batch, ref, warmup)
                        if torch.isfinite(loss):
                            trainer.backward(loss)
                        else:
                            # A weight sample far in the tail can make the NLL overflow; it then
                            # contributes no gradient instead of turning IVON's state into NaN.
                            self.skipped_samples += 1
                            for p in model.parameters():
                                p.grad = torch.zeros_like(p)
                    if torch.isfinite(loss):
                        losses.append(loss.detach())
            except BaseException:
                # Forget the gradients of this step's earlier samples, as IVON's own step does
                # once it has used them, so that a caller who goes on starts a clean step.
                optimizer._reset_samples()
                raise
            self.rng = torch.get_rng_state()
        optimizer.step()
        self.steps = optimizer.current_step
        return (torch.stack(losses).mean() if losses else loss.detach()), parts

    def state_dict(self) -> dict:
        return {"step": self.steps, "rng": self.rng}

    def load_state_dict(self, state: dict, trainer) -> None:
        self.steps = int(state.get("step", 0))
        if state.get("rng") is not None:
            self.rng = state["rng"]
        trainer.optimizer.current_step = self.steps
        for group in trainer.optimizer.param_groups:  # IVON keeps these in its param groups,
            for key in ("hess", "momentum"):  # which load_state_dict does not move
                group[key] = group[key].to(trainer.device)


def _ess(options: IVONOptions, trainer) -> float:
    """λ: ``options.ess``, or by default the number of atoms in the training set. The loss
    averages the force NLL over atoms (one 3D term each), and that term dominates the
    likelihood, so N_atoms × loss is (close to) the total negative log-likelihood."""
    return options.ess or sum(len(f.atoms) for f in trainer.train_set.frames)


def optimiser_posterior(optimizer, model, **kwargs) -> IVONPosterior:
    """The posterior N(m, 1/(λ(h + δ))) of a trained IVON optimiser around ``model`` (= m).

    IVON keeps h, λ and δ in its (single) parameter group; this is the one place that reads them.
    """
    group = optimizer.param_groups[0]
    return IVONPosterior.from_optimizer_state(model, group["hess"], group["ess"], group["weight_decay"], **kwargs)


class IVON(Method):
    """One run with the IVON optimiser; its mean and Hessian estimate become the posterior."""

    kind = "ivon"
    Options = IVONOptions
    legacy = {f"ivon_{name}": name for name in ("lr", "ess", "hess_init", "beta2", "weight_decay", "train_samples",
                                                  "clip_radius")} | {"test_samples": "test_samples"}

    @classmethod
    def hooks(cls, config):
        return IVONHooks(config.ivon, config.seed)

    def fit(self, config, model_config, train, valid, *, in_memory=False, on_step=None):
        options = config.ivon
        warm = options.warm_start_epochs(config.max_epochs)
        if warm and warm >= config.max_epochs:
            raise ConfigError(f"ivon.warm_start ({warm} epochs) must be below max_epochs ({config.max_epochs}): "
                              "IVON needs epochs of its own")
        initial, states = None, []
        if warm:
            # An AMSGrad run like method mve's: its checkpoint does not depend on IVON's options, so
            # a sweep of them can share one warm start (copy output_dir/warm_start).
            first = config.replace(method="mve", max_epochs=warm, output_dir=str(Path(config.output_dir) / "warm_start"))
            start = Trainer(first, model_config, train, valid, on_step=on_step, in_memory=in_memory,
                            hooks=TrainingHooks())  # the config's Adam/AMSGrad
            log.info("ivon: %d warm-start epochs with %s", warm, "AMSGrad" if config.amsgrad else "Adam")
            states.append(start.run())
            best = start.best_model()
            initial = best.state_dict()
            if states[-1].epoch < warm:  # stopped by max_time_s (all ranks agree on that)
                if start.rank != 0:
                    return None
                log.warning("ivon: the warm start stopped at epoch %d of %d (max_time_s); the model file holds "
                            "IVON's initial posterior around it; rerun with a larger max_time_s (or none) to "
                            "continue", states[-1].epoch, warm)
                hess = torch.full((sum(p.numel() for p in start.model.parameters()),), options.hess_init)
                posterior = IVONPosterior.from_optimizer_state(
                    best, hess, _ess(options, start), options.weight_decay,
                    n_samples=options.test_samples or None, sample_seed=config.seed)
                return Fitted(posterior, summary(states))
            # the IVON phase: the remaining epochs and the rest of the mean-only warm-up, if any
            config = config.replace(max_epochs=config.max_epochs - warm,
                                    warmup_epochs=max(0, config.warmup_epochs - warm))
        trainer = Trainer(config, model_config, train, valid, on_step=on_step, in_memory=in_memory,
                          hooks=self.hooks(config), initial_weights=initial)
        states.append(trainer.run())
        if trainer.rank != 0:
            return None
        # The mean is the best validation EMA of IVON's mean weights, as for the other methods: the
        # raw iterate of IVON's noisy steps was measured twice as far off on forces (ivon.md).
        posterior = optimiser_posterior(trainer.optimizer, trainer.best_model(),
                                        n_samples=options.test_samples or None, sample_seed=config.seed)
        return Fitted(posterior, summary(states))
