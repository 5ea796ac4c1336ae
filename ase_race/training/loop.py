"""The training loop: AMSGrad, gradient clipping, EMA, plateau LR decay, best-on-validation,
and checkpoints that resume exactly.

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

from ..config import ModelConfig, TrainConfig
from ..errors import ConfigError, TrainingError
from ..modelfile import atomic_torch_save, atomic_write_text
from ..nn import RACE, build_model
from . import distributed as dist_utils
from .batches import GraphDataset, predictions_for_loss
from .losses import LossWeights, compute_loss
from .metrics import evaluate_dataset

log = logging.getLogger("ase_race.training")

CHECKPOINT_NAME = "checkpoint.pt"
#: Training-config keys that may change between a run and its resumption.
RESUMABLE_CHANGES = (
    "max_epochs", "max_time_s", "checkpoint_every", "test_file", "device", "output_dir", "model_name",
)


#: Keys that only affect one method (a member of an ensemble ignores the IVON settings).
METHOD_PREFIXES = {"swag": ("swag_",), "ivon": ("ivon_",), "laplace": ("laplace_", "base_model")}


def _relevant(config: dict) -> dict:
    """The training-config entries that must match for a checkpoint to be resumed."""
    method = config.get("method", "mve")
    ignored = tuple(p for m, prefixes in METHOD_PREFIXES.items() if m != method for p in prefixes)
    # used outside the training loop (the Laplace fit comes after it)
    ignored += ("members", "test_samples", "laplace_", "base_model")
    return {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES and not k.startswith(ignored)}


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


class Trainer:
    """Trains one RACE network (``method: mve``) on a :class:`GraphDataset`.

    Args:
        config: the training configuration.
        model_config: the network to train (species, E0s, scale, shift already filled in).
        train, valid: datasets built in ``model_config.dtype``.
        on_step: optional callback ``f(trainer)`` after every optimiser step (tests use it).
        initial_weights: a state_dict to start from instead of random weights (fine-tuning).
    """

    def __init__(
        self,
        config: TrainConfig,
        model_config: ModelConfig,
        train: GraphDataset,
        valid: GraphDataset,
        on_step: Callable[["Trainer"], None] | None = None,
        initial_weights: dict | None = None,
    ):
        self.config = config
        self.model_config = model_config
        self.train_set, self.valid_set = train, valid
        self.on_step = on_step
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
        self.ivon_step = 0
        self.skipped_samples = 0
        self.ivon_rng = torch.Generator().manual_seed(config.seed + 7919).get_state()
        if config.method == "ivon":
            import ivon

            # The default effective sample size is the number of atoms: the loss averages the
            # force NLL over atoms (one 3D term each), and that term dominates the likelihood,
            # so N_atoms × loss is (close to) the total negative log-likelihood.
            ess = config.ivon_ess or sum(len(f.atoms) for f in train.frames)
            self.optimizer = ivon.IVON(
                self.model.parameters(), lr=config.ivon_lr, ess=ess, hess_init=config.ivon_hess_init,
                beta2=config.ivon_beta2, weight_decay=config.ivon_weight_decay, mc_samples=config.ivon_train_samples,
                clip_radius=config.ivon_clip_radius,
            )
        else:
            self.optimizer = torch.optim.Adam(
                self.model.parameters(), lr=config.lr, amsgrad=config.amsgrad, weight_decay=config.weight_decay
            )
        self.swag = None
        if config.method == "swag":
            from .swag import SWAGCollector

            self.swag = SWAGCollector(sum(p.numel() for p in self.model.parameters()), config.swag_rank)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, factor=config.plateau_factor, patience=config.plateau_patience, min_lr=config.min_lr
        )
        self.ema = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.state = TrainState()
        self.weights = LossWeights(config.energy_weight, config.forces_weight, config.beta)
        self.net = dist_utils.wrap(self.model, self.device)
        self.checkpoint_path = self.out_dir / CHECKPOINT_NAME
        if self.checkpoint_path.exists():
            self.load_checkpoint()

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> dict:
        s = self.state
        return {
            "train_config": self.config.to_dict(),
            "model_config": self.model_config.to_dict(),
            "cwd": str(Path.cwd()),  # where the config's relative paths point from
            "model": self.model.state_dict(),
            "ema": self.ema,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
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
            "ivon_step": self.ivon_step,
            "ivon_rng": self.ivon_rng,
            "swag": self.swag.state_dict() if self.swag is not None else None,
        }

    def save_checkpoint(self) -> None:
        self._check_finite()  # a checkpoint never holds diverged weights
        if self.rank == 0:
            atomic_torch_save(self.checkpoint(), self.checkpoint_path)
        dist_utils.barrier()

    def load_checkpoint(self) -> None:
        # On the CPU first: the generator state must stay a CPU tensor.
        data = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        old, new = _relevant(data["train_config"]), _relevant(self.config.to_dict())
        defaults = TrainConfig().to_dict()
        # A key the checkpoint lacks was added by a later version: its default applies.
        changed = sorted(
            k for k in new if not _same_setting(k, old.get(k, defaults.get(k)), new[k], data.get("cwd"))
        )
        if changed or data["model_config"] != self.model_config.to_dict():
            raise ConfigError(
                f"{self.checkpoint_path} belongs to a run with different settings ({changed or 'model'}); "
                "use another output_dir or delete the checkpoint to start afresh"
            )
        self.model.load_state_dict(data["model"])
        self.ema = {k: v.to(self.device) for k, v in data["ema"].items()}
        self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        self.generator.set_state(data["generator"])
        s = self.state
        s.epoch, s.step_in_epoch, s.global_step = data["epoch"], data["step_in_epoch"], data["global_step"]
        s.permutation = data["permutation"]
        s.best_valid, s.best_epoch, s.best_weights = data["best_valid"], data["best_epoch"], data["best_weights"]
        s.history, s.elapsed_s, s.structures_seen = data["history"], data["elapsed_s"], data["structures_seen"]
        s.running_loss = data["running_loss"]
        self.ivon_step, self.ivon_rng = data.get("ivon_step", 0), data.get("ivon_rng", self.ivon_rng)
        if self.method_is("ivon"):
            self.optimizer.current_step = self.ivon_step
            for group in self.optimizer.param_groups:  # IVON keeps these in its param groups,
                for key in ("hess", "momentum"):  # which load_state_dict does not move
                    group[key] = group[key].to(self.device)
        if self.swag is not None:
            self.swag.load_state_dict(data["swag"])
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
        self.optimizer.zero_grad(set_to_none=True)
        if self.method_is("ivon"):
            loss, parts = self._ivon_step(batch, ref, warmup)
        else:
            out = self.net(batch.graph, compute_forces=True, create_graph=True)
            loss, parts = compute_loss(self.config.loss, predictions_for_loss(out), ref, self.weights, warmup=warmup)
            (loss * self.world).backward()  # DDP averages gradients over ranks; undo that
            if self.config.clip_grad:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad)
            self.optimizer.step()
        self._update_ema()
        # Each rank's loss is its share of the global-batch loss: their sum is the loss.
        return {"loss": float(dist_utils.all_reduce_sum(loss.detach())), **parts}

    def method_is(self, name: str) -> bool:
        return self.config.method == name

    def _ivon_step(self, batch, ref, warmup):
        """IVON: gradients at ``ivon_train_samples`` weight samples, then one update.

        IVON draws its weight noise from torch's global generator; it runs inside a forked RNG
        whose state lives in the checkpoint, so the caller's random stream is untouched and a
        resumed run draws the same noise.
        """
        losses = []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.ivon_rng)
            if devices:  # IVON samples on the parameters' device: seed it from our stream
                torch.cuda.manual_seed(int(torch.randint(2**62, (1,))))
            for _ in range(self.config.ivon_train_samples):
                with self.optimizer.sampled_params(train=True):
                    # IVON reads p.grad at the end of each sample: it must hold this sample's only.
                    self.optimizer.zero_grad(set_to_none=False)
                    out = self.net(batch.graph, compute_forces=True, create_graph=True)
                    loss, parts = compute_loss(self.config.loss, predictions_for_loss(out), ref, self.weights, warmup=warmup)
                    if torch.isfinite(loss):
                        (loss * self.world).backward()
                        if self.config.clip_grad:
                            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad)
                    else:
                        # A weight sample far in the tail can make the NLL overflow; it then
                        # contributes no gradient instead of turning IVON's state into NaN.
                        self.skipped_samples += 1
                        for p in self.model.parameters():
                            p.grad = torch.zeros_like(p)
                if torch.isfinite(loss):
                    losses.append(loss.detach())
            self.ivon_rng = torch.get_rng_state()
        self.optimizer.step()
        self.ivon_step = self.optimizer.current_step
        return (torch.stack(losses).mean() if losses else loss.detach()), parts

    def _check_finite(self) -> None:
        """Refuse to go on (and to checkpoint) with weights that diverged to NaN or infinity."""
        bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            self._diverged(f"{len(bad)} weight tensors are not finite (first: {bad[0]})")

    def _diverged(self, what: str, cause: Exception | None = None) -> None:
        lr = self.config.ivon_lr if self.method_is("ivon") else self.optimizer.param_groups[0]["lr"]
        raise TrainingError(
            f"training diverged in epoch {self.state.epoch}: {what}; method {self.config.method!r}, learning rate "
            f"{lr:g}. Lower the learning rate (ivon_lr for IVON) or the clipping; the last checkpoint "
            f"with finite weights is {self.checkpoint_path}"
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
            if cfg.max_time_s and s.step_in_epoch == 0 and s.elapsed_s > cfg.max_time_s:
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
            if cfg.max_time_s and s.elapsed_s > cfg.max_time_s:
                log.info("stopping: max_time_s=%s reached", cfg.max_time_s)
                break
        return s

    def _end_epoch(self, train_loss: float, elapsed: float) -> None:
        s = self.state
        self._check_finite()
        try:
            metrics = self.validate()
        except torch.linalg.LinAlgError as error:  # finite but huge weights: a covariance that is not one
            self._diverged(f"the validation predictions are not usable ({error})", error)
        if not math.isfinite(metrics["valid_loss"]):
            self._diverged(f"the validation loss is {metrics['valid_loss']}")
        swag_on = self.swag is not None and s.epoch + 1 >= self.config.swag_start_epoch
        if swag_on:
            if s.epoch >= self.config.swag_start_epoch and (s.epoch - self.config.swag_start_epoch) % self.config.swag_interval == 0:
                self.swag.collect(torch.cat([p.detach().reshape(-1) for p in self.model.parameters()]))
            if self.config.swag_lr:  # constant from the start epoch on (set before it trains)
                for group in self.optimizer.param_groups:
                    group["lr"] = self.config.swag_lr
        elif s.epoch >= self.config.warmup_epochs:
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
