"""The training loop for one network: AMSGrad, gradient clipping, EMA, plateau LR decay,
best-on-validation, and checkpoints that resume exactly.

The loop knows no posterior method by name. A method that trains differently (IVON's
optimiser and sampled steps, SWAG's snapshots) passes :class:`TrainingHooks`: an optimiser
factory, the optimisation step, an end-of-epoch callback, and state that goes into the
checkpoint.

Exact resume: the checkpoint holds the weights, the optimiser, scheduler and EMA states, the
shuffling generator's state, the current epoch's permutation and the position inside it. A run
killed at any point and restarted from its last checkpoint replays the same batches in the same
order from the same state, so it ends with the same weights as a run that was never killed.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..config import ModelConfig
from ..data.readers import fingerprint
from ..errors import ConfigError, TrainingError
from .._atomic import atomic_torch_save, atomic_write_text
from ..nn import RACE, build_model
from . import distributed as dist_utils
from .batches import Batch, GraphDataset, predictions_for_loss
from .config import TrainConfig
from .losses import LossWeights, compute_loss
from .metrics import evaluate_dataset

log = logging.getLogger("ase_race.training")

CHECKPOINT_NAME = "checkpoint.pt"
#: Training-config keys that may change between a run and its resumption.
RESUMABLE_CHANGES = (
    "max_epochs", "max_time_s", "checkpoint_every", "test_file", "device", "output_dir", "model_name",
)


def _relevant(config: dict) -> dict:
    """The training-config entries that must match for a checkpoint to be resumed.

    ``config`` is a checkpoint's stored ``to_dict()`` (flat keys of earlier releases are read
    too). Method sections count only for the method that runs, and only the options that
    change the training run (``MethodOptions.training_keys``).
    """
    import warnings

    from .methods import method_class

    with warnings.catch_warnings():  # an old checkpoint's flat keys are not the user's doing
        warnings.simplefilter("ignore", FutureWarning)
        normalised = TrainConfig.from_dict(config)
    out = {k: v for k, v in normalised.to_dict().items() if k not in RESUMABLE_CHANGES and k not in normalised.options}
    method = method_class(normalised.method)
    out["method_options"] = method.training_settings(normalised.method_options)
    return out


#: Settings that name files: equal when they name the same file, however spelled.
PATH_SETTINGS = ("train_file", "valid_file", "e0s_file")


def _same_setting(key: str, old, new, old_cwd: str | None = None) -> bool:
    """``old`` is the checkpoint's value, relative to ``old_cwd`` (the current directory when
    the checkpoint does not record one); ``new`` is relative to the current directory."""
    if key in PATH_SETTINGS and old and new:
        return (Path(old_cwd or ".") / old).resolve() == Path(new).resolve()
    return old == new


@dataclass
class TrainState:
    """Everything that changes while training (and is saved in a checkpoint)."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    permutation: torch.Tensor | None = None
    best_valid: float = math.inf
    best_epoch: int = -1
    best_weights: dict | None = None
    history: list = field(default_factory=list)
    elapsed_s: float = 0.0
    structures_seen: int = 0
    running_loss: float = 0.0  # sum of this epoch's step losses so far


class TrainingHooks:
    """How a posterior method changes the one-network training loop (the default: none).

    Subclasses override what they need. Every hook gets the :class:`Trainer`, whose public
    attributes (``config``, ``model``, ``net``, ``optimizer``, ``device``, ``state``) they may
    read; they change the network's weights only through the optimiser.
    """

    def setup(self, trainer: "Trainer") -> None:
        """Called once the network is built, before the optimiser is made."""

    def make_optimizer(self, trainer: "Trainer") -> torch.optim.Optimizer | None:
        """The optimiser of the run; None for the default (Adam/AMSGrad with the config's settings)."""
        return None

    def step(self, trainer: "Trainer", batch: Batch, ref: dict, warmup: bool) -> tuple[torch.Tensor, dict]:
        """One optimisation step on this rank's share of a batch; returns (loss, parts)."""
        return trainer.gradient_step(batch, ref, warmup)

    def end_of_epoch(self, trainer: "Trainer") -> bool:
        """Called after validation at the end of every epoch (``trainer.state.epoch`` is the
        epoch that just ended). Return True when the hook sets the learning rate itself this
        epoch, so that the plateau decay must not step."""
        return False

    def learning_rate(self, trainer: "Trainer") -> float:
        return trainer.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        """What the hook must carry across a checkpoint."""
        return {}

    def load_state_dict(self, state: dict, trainer: "Trainer") -> None:
        """Inverse of :meth:`state_dict`; ``state`` is {} for a checkpoint without one."""


class Trainer:
    """Trains one RACE network on a :class:`GraphDataset`.

    Args:
        config: the training configuration.
        model_config: the network to train (species, E0s, scale, shift already filled in).
        train, valid: datasets built in ``model_config.dtype``.
        on_step: optional callback ``f(trainer)`` after every optimiser step (tests use it).
        initial_weights: a state_dict to start from instead of random weights (fine-tuning).
        hooks: the method's changes to the loop (see :class:`TrainingHooks`); default: those of
            ``config.method`` (none for most methods).
        in_memory: keep everything in memory: no checkpoint is read or written and no
            metrics.csv (a run that cannot be resumed, e.g. a short fine-tune).
    """

    def __init__(
        self,
        config: TrainConfig,
        model_config: ModelConfig,
        train: GraphDataset,
        valid: GraphDataset,
        on_step: Callable[["Trainer"], None] | None = None,
        initial_weights: dict | None = None,
        hooks: TrainingHooks | None = None,
        in_memory: bool = False,
    ):
        self.config = config
        self.model_config = model_config
        self.train_set, self.valid_set = train, valid
        self.on_step = on_step
        if hooks is None:
            from .methods import method_class  # the methods build on this module

            hooks = method_class(config.method).hooks(config)
        self.hooks = hooks or TrainingHooks()
        self.in_memory = in_memory
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.out_dir = Path(config.output_dir)
        dist_utils.init_from_environment(self.device)  # a no-op unless started by torchrun
        self.rank, self.world = dist_utils.rank_and_world()
        if self.world > 1:
            self.device = dist_utils.local_device(self.device)
            if config.batch_size < self.world:
                raise ConfigError(
                    f"batch_size={config.batch_size} is smaller than the {self.world} processes; "
                    "every process needs at least one structure per step"
                )
        self.generator = torch.Generator().manual_seed(config.seed)
        self.model = build_model(model_config, config.seed).to(self.device)
        if initial_weights is not None:  # fine-tuning: start from trained weights
            self.model.load_state_dict(initial_weights)
        self.eval_model = build_model(model_config).to(self.device)
        self.hooks.setup(self)
        self.optimizer = self.hooks.make_optimizer(self) or torch.optim.Adam(
            self.model.parameters(), lr=config.lr, amsgrad=config.amsgrad, weight_decay=config.weight_decay
        )
        self.scheduler = None
        if config.plateau_factor < 1:
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, factor=config.plateau_factor, patience=config.plateau_patience, min_lr=config.min_lr
            )
        self.ema = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.state = TrainState()
        self.weights = LossWeights(config.energy_weight, config.forces_weight, config.beta)
        self.net = dist_utils.wrap(self.model, self.device)
        self.checkpoint_path = None if in_memory else self.out_dir / CHECKPOINT_NAME
        #: identifies the data, which may come from memory rather than the config's files
        self.data_fingerprint = fingerprint(train.frames) + fingerprint(valid.frames)
        if self.checkpoint_path is not None and self.checkpoint_path.exists():
            self.load_checkpoint()

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> dict:
        s = self.state
        return {
            "train_config": self.config.to_dict(),
            "model_config": self.model_config.to_dict(),
            "cwd": str(Path.cwd()),  # where the config's relative paths point from
            "data_fingerprint": self.data_fingerprint,
            "model": self.model.state_dict(),
            "ema": self.ema,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "generator": self.generator.get_state(),
            "epoch": s.epoch,
            "step_in_epoch": s.step_in_epoch,
            "global_step": s.global_step,
            "permutation": s.permutation,
            "best_valid": s.best_valid,
            "best_epoch": s.best_epoch,
            "best_weights": s.best_weights,
            "history": s.history,
            "elapsed_s": s.elapsed_s,
            "structures_seen": s.structures_seen,
            "running_loss": s.running_loss,
            "method_state": self.hooks.state_dict(),
        }

    def save_checkpoint(self) -> None:
        self._check_finite()  # a checkpoint never holds diverged weights
        if self.checkpoint_path is None:
            return
        if self.rank == 0:
            atomic_torch_save(self.checkpoint(), self.checkpoint_path)
        dist_utils.barrier()

    def load_checkpoint(self) -> None:
        from ..modelfile import read_torch_file

        # On the CPU first: the generator state must stay a CPU tensor.
        data = read_torch_file(self.checkpoint_path, "a training checkpoint", TrainingError)
        if not isinstance(data, dict) or not {"train_config", "model_config", "model"} <= set(data):
            raise TrainingError(f"{self.checkpoint_path}: not a training checkpoint of ase-race; "
                                "delete it or use another output_dir")
        new = _relevant(self.config.to_dict())
        try:  # a key the checkpoint lacks was added by a later version: its default applies
            old = _relevant(data["train_config"])
        except ConfigError as err:
            raise ConfigError(f"{self.checkpoint_path} holds settings this version cannot read ({err})") from None
        changed = sorted(k for k in new if not _same_setting(k, old.get(k), new[k], data.get("cwd")))
        if data.get("data_fingerprint", self.data_fingerprint) != self.data_fingerprint:
            changed.append("the training or validation structures")  # older checkpoints lack it
        if changed or data["model_config"] != self.model_config.to_dict():
            raise ConfigError(
                f"{self.checkpoint_path} belongs to a run with different settings ({changed or 'model'}); "
                "use another output_dir or delete the checkpoint to start afresh"
            )
        try:
            self.model.load_state_dict(data["model"])
            self.ema = {k: v.to(self.device) for k, v in data["ema"].items()}
            self.optimizer.load_state_dict(data["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(data["scheduler"])
            self.generator.set_state(data["generator"])
            s = self.state
            s.epoch, s.step_in_epoch, s.global_step = data["epoch"], data["step_in_epoch"], data["global_step"]
            s.permutation = data["permutation"]
            s.best_valid, s.best_epoch, s.best_weights = data["best_valid"], data["best_epoch"], data["best_weights"]
            s.history, s.elapsed_s, s.structures_seen = data["history"], data["elapsed_s"], data["structures_seen"]
            s.running_loss = data["running_loss"]
            # Checkpoints of earlier releases kept the method's state under its own keys.
            legacy = {"step": data.get("ivon_step", 0), "rng": data.get("ivon_rng"), **(data.get("swag") or {})}
            self.hooks.load_state_dict(data.get("method_state", legacy), self)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:  # a damaged or foreign checkpoint
            raise TrainingError(f"{self.checkpoint_path}: damaged checkpoint ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''}); delete it to start afresh") from None
        log.info("resumed from %s at epoch %d, step %d", self.checkpoint_path, s.epoch, s.step_in_epoch)

    # ------------------------------------------------------------------ training
    def in_warmup(self, epoch: int) -> bool:
        return epoch < self.config.warmup_epochs

    def train_step(self, indices: torch.Tensor) -> dict[str, float]:
        """One optimiser step on the global batch ``indices`` (this rank takes its share)."""
        mine = indices[self.rank :: self.world].tolist()
        batch = self.train_set.batch(mine, self.device)
        ref = dict(batch.ref)
        # Normalise by the whole global batch, so that splitting it over ranks changes nothing.
        totals = torch.stack([ref["weight"].sum(), ref["atom_weight"].sum()]).double()
        totals = dist_utils.all_reduce_sum(totals)
        ref["weight_total"], ref["atom_weight_total"] = totals[0].to(ref["weight"].dtype), totals[1].to(ref["weight"].dtype)
        warmup = self.in_warmup(self.state.epoch)
        loss, parts = self.hooks.step(self, batch, ref, warmup)
        self._update_ema()
        # Each rank's loss is its share of the global-batch loss: their sum is the loss.
        return {"loss": float(dist_utils.all_reduce_sum(loss.detach())), **parts}

    def loss(self, batch: Batch, ref: dict, warmup: bool) -> tuple[torch.Tensor, dict]:
        """The configured loss of the network on ``batch`` (with the graph for backward)."""
        out = self.net(batch.graph, compute_forces=True, create_graph=True)
        return compute_loss(self.config.loss, predictions_for_loss(out), ref, self.weights, warmup=warmup)

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss`` (DDP's average over ranks undone), clipped as configured."""
        (loss * self.world).backward()
        if self.config.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad)

    def gradient_step(self, batch: Batch, ref: dict, warmup: bool) -> tuple[torch.Tensor, dict]:
        """The default optimisation step: loss, gradients, clipping, one optimiser step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, parts = self.loss(batch, ref, warmup)
        self.backward(loss)
        self.optimizer.step()
        return loss, parts

    def _check_finite(self) -> None:
        """Refuse to go on (and to checkpoint) with weights that diverged to NaN or infinity."""
        bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            self._diverged(f"{len(bad)} weight tensors are not finite (first: {bad[0]})")

    def _diverged(self, what: str, cause: Exception | None = None) -> None:
        lr = self.hooks.learning_rate(self)
        where = f"; the last checkpoint with finite weights is {self.checkpoint_path}" if self.checkpoint_path else ""
        raise TrainingError(
            f"training diverged in epoch {self.state.epoch}: {what}; method {self.config.method!r}, learning rate "
            f"{lr:g}. Lower the learning rate (the method's own, e.g. ivon.lr, where it has one) or the "
            f"clipping{where}"
        ) from cause

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.config.ema_decay
        for key, value in self.model.state_dict().items():
            if decay and value.is_floating_point():
                self.ema[key].mul_(decay).add_(value.detach(), alpha=1 - decay)
            else:
                self.ema[key].copy_(value)

    def validate(self) -> dict[str, float]:
        """Metrics of the EMA weights on the validation set, plus the loss they would have."""
        self.eval_model.load_state_dict(self.ema)

        def loss_fn(out, batch):
            return compute_loss(self.config.loss, predictions_for_loss(out), batch.ref, self.weights)[0]

        return evaluate_dataset(self.eval_model, self.valid_set, device=self.device, loss_fn=loss_fn)

    def run(self, max_steps: int | None = None) -> TrainState:
        """Train until ``max_epochs`` (or ``max_time_s``, or ``max_steps`` more steps)."""
        cfg, s = self.config, self.state
        n = len(self.train_set)
        n_batches = math.ceil(n / cfg.batch_size)
        if self.world > 1 and 0 < n % cfg.batch_size < self.world:
            n_batches -= 1  # every rank needs at least one structure of the last batch
        steps_left = max_steps
        start = time.perf_counter() - s.elapsed_s
        while s.epoch < cfg.max_epochs:
            if s.step_in_epoch == 0 and self._time_is_up():
                break  # a finished time-limited run that is resumed (e.g. an ensemble member)
            if s.step_in_epoch == 0:
                s.permutation = torch.randperm(n, generator=self.generator)
            bar = self._progress(n_batches, s.step_in_epoch)
            for b in range(s.step_in_epoch, n_batches):
                parts = self.train_step(s.permutation[b * cfg.batch_size : (b + 1) * cfg.batch_size])
                s.running_loss += parts["loss"]
                s.step_in_epoch, s.global_step = b + 1, s.global_step + 1
                s.structures_seen += min(cfg.batch_size, n - b * cfg.batch_size)
                s.elapsed_s = time.perf_counter() - start
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{parts['loss']:.4g}")
                if s.global_step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if self.on_step is not None:
                    self.on_step(self)
                if steps_left is not None:
                    steps_left -= 1
                    if steps_left == 0:
                        return s
            if bar is not None:
                bar.close()
            self._end_epoch(s.running_loss / max(n_batches, 1), time.perf_counter() - start)
            if self._time_is_up():
                log.info("stopping: max_time_s=%s reached", cfg.max_time_s)
                break
        return s

    def _time_is_up(self) -> bool:
        """Whether ``max_time_s`` has passed, on any rank: every rank's clock differs a little,
        and ranks that disagree about stopping would wait for each other forever."""
        limit = self.config.max_time_s
        if not limit:
            return False
        up = torch.tensor([float(self.state.elapsed_s > limit)], device=self.device)
        return bool(dist_utils.all_reduce_sum(up).item() > 0)

    def _end_epoch(self, train_loss: float, elapsed: float) -> None:
        s = self.state
        self._check_finite()
        try:
            metrics = self.validate()
        except torch.linalg.LinAlgError as error:  # finite but huge weights: a covariance that is not one
            self._diverged(f"the validation predictions are not usable ({error})", error)
        if not math.isfinite(metrics["valid_loss"]):
            self._diverged(f"the validation loss is {metrics['valid_loss']}")
        owns_lr = self.hooks.end_of_epoch(self)
        if not owns_lr and s.epoch >= self.config.warmup_epochs and self.scheduler is not None:
            # During the mean-only warm-up the variance heads are untrained, so the validation
            # NLL says nothing about progress; it must not decay the learning rate.
            self.scheduler.step(metrics["valid_loss"])
        row = {"epoch": s.epoch, "lr": self.optimizer.param_groups[0]["lr"], "train_loss": train_loss,
               **metrics, "elapsed_s": elapsed}
        s.history.append(row)
        if metrics["valid_loss"] < s.best_valid and s.epoch >= self.config.warmup_epochs:
            s.best_valid, s.best_epoch = metrics["valid_loss"], s.epoch
            s.best_weights = {k: v.clone() for k, v in self.ema.items()}
        s.epoch, s.step_in_epoch, s.elapsed_s, s.running_loss = s.epoch + 1, 0, elapsed, 0.0
        self.save_checkpoint()
        if self.rank == 0:
            if not self.in_memory:
                self._write_metrics_csv()
            log.info(
                "epoch %d  loss %.4g  valid %.4g  E MAE %.2f meV  F MAE %.2f meV/Å  lr %.2e  %.0f s",
                row["epoch"], train_loss, metrics["valid_loss"], metrics["energy_mae_meV"],
                metrics["forces_mae_meV_A"], row["lr"], elapsed,
            )

    def _write_metrics_csv(self) -> None:
        """Rewrite metrics.csv from the history (so a resumed run never duplicates rows)."""
        buffer = io.StringIO()
        # the union of columns: a run resumed under a newer version gains metrics mid-way
        fieldnames = list(dict.fromkeys(key for row in self.state.history for key in row))
        writer = csv.DictWriter(buffer, fieldnames=fieldnames, restval="")
        writer.writeheader()
        writer.writerows(self.state.history)
        atomic_write_text(self.out_dir / "metrics.csv", buffer.getvalue())

    def _progress(self, total: int, done: int):
        """A tqdm bar on a terminal; None in logs and on ranks other than 0."""
        if self.rank != 0 or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=done, desc=f"epoch {self.state.epoch}", leave=False)

    def current_model(self) -> RACE:
        """The network with the raw (not averaged) current weights."""
        model = build_model(self.model_config)
        model.load_state_dict(self.model.state_dict())
        return model.eval()

    def best_model(self) -> RACE:
        """The network with the best validation weights (EMA), or the current EMA weights."""
        model = build_model(self.model_config)
        model.load_state_dict(self.state.best_weights or self.ema)
        return model.eval()
