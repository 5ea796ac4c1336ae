"""The active-learning loop: train, score the pool, label the best, repeat (docs/active_learning.md).

Round k trains a posterior (the config's ``method``; BALD and the energy std need an epistemic
one such as ``ensemble``) on the labelled set of size ``sizes[k]``, evaluates it on a test set
if one is given, and, unless it is the last round, scores the rest of the pool with the
acquisition function and labels the ``sizes[k+1] − sizes[k]`` best. The first labelled set is
drawn at random (seeded), so every strategy starts from the same models.

*Retrospective* learning takes the labels already in the pool (a benchmark of acquisition
functions); *prospective* learning hands each chosen structure to a reference calculator
(:class:`~ase.calculators.calculator.Calculator`) and labels it then.

On disk, under ``out_dir``::

    round_00/train.extxyz   labelled set of round 0 (REF_energy, REF_forces, pool_index)
    round_00/model.pt       the posterior trained on it (plus its checkpoints)
    state.json              labelled pool indices per round; per round, the seconds spent labelling
                            and training, and which model file and test set its curve row measured
                            (written atomically)
    learning_curve.csv      size, energy/force MAE and RMSE on the test set (meV, meV/Å), wall time

Each round trains from its labelled structures in memory; the files are its record. A killed
loop resumes: finished rounds are read back, an unfinished training run resumes from its
checkpoint, and labels already computed are not requested again. A round's curve row is reused
only while its model file (size and modification time) and the test set (SHA-256 of species,
positions, cell and labels) are the ones it was measured with; otherwise the round is evaluated
again, and its wall time is the recorded labelling and training time plus this evaluation.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from ase import Atoms
from ase.io import read

from ..data import Frame, KeyMap, write_structures
from ..errors import ConfigError
from ..evaluation import mae, rmse
from .._atomic import atomic_write_text
from ..training import TrainConfig
from .acquisition import STRATEGIES, acquisition_scores, rdf_descriptor, select

log = logging.getLogger("ase_race.active")

#: where labelled structures keep their labels (as :func:`label_with` and :func:`label_from_pool` write them)
LABEL_KEYS = KeyMap(energy="REF_energy", forces="REF_forces")
CURVE_FIELDS = ("round", "n_train", "energy_mae", "energy_rmse", "forces_mae", "forces_rmse", "wall_s")
#: the columns of learning_curve.csv: errors in meV and meV/Å, as the training metrics.csv and
#: every table and plot of the loop report them (a RoundResult holds eV and eV/Å)
CSV_COLUMNS = {"energy_mae": ("energy_mae_meV", 1e3), "energy_rmse": ("energy_rmse_meV", 1e3),
               "forces_mae": ("forces_mae_meV_A", 1e3), "forces_rmse": ("forces_rmse_meV_A", 1e3)}


@dataclass
class RoundResult:
    """One point of the learning curve. Errors in eV and eV/Å (nan without a test set)."""

    round: int
    n_train: int
    energy_mae: float
    energy_rmse: float
    forces_mae: float
    forces_rmse: float
    wall_s: float

    def row(self) -> dict:
        return {k: getattr(self, k) for k in CURVE_FIELDS}


def label_with(reference) -> Callable[[Atoms], Atoms]:
    """A labeller that calls ``reference`` (any ASE calculator) for energy and forces."""

    def label(atoms: Atoms) -> Atoms:
        work = atoms.copy()
        work.calc = reference
        energy = float(work.get_potential_energy())
        forces = np.array(work.get_forces(), dtype=np.float64)
        out = atoms.copy()
        out.calc = None
        out.info["REF_energy"] = energy
        out.arrays["REF_forces"] = forces
        return out

    return label


def label_from_pool(frames: Sequence[Frame]) -> Callable[[int], Atoms]:
    """Retrospective labelling: the pool's own labels, stored as REF_energy / REF_forces."""

    def label(index: int) -> Atoms:
        f = frames[index]
        out = f.atoms.copy()
        out.calc = None
        out.info["REF_energy"] = float(f.energy)
        out.arrays["REF_forces"] = np.asarray(f.forces, dtype=np.float64)
        return out

    return label


def epochs_for(n_train: int, structures_per_round: int, min_epochs: int) -> int:
    """Epochs that show the model about ``structures_per_round`` structures (at least ``min_epochs``)."""
    return max(min_epochs, math.ceil(structures_per_round / max(n_train, 1)))


def active_learn(
    pool: Sequence[Atoms],
    label: Callable[[int], Atoms],
    config: TrainConfig,
    sizes: Sequence[int],
    strategy: str,
    out_dir: str | Path,
    *,
    test: Sequence[Frame] | None = None,
    seed: int = 0,
    diversity: float = 0.0,
    structures_per_round: int = 0,
    min_epochs: int = 10,
    warm_start: bool = False,
    warm_start_lr: float = 5e-3,
    device: str | None = None,
) -> list[RoundResult]:
    """Run the loop; returns the learning curve (also written to ``learning_curve.csv``).

    Args:
        pool: candidate structures (N); only their positions, numbers, cell and pbc are used
            for scoring.
        label: index into ``pool`` → the labelled structure (REF_energy, REF_forces);
            :func:`label_from_pool` or ``lambda i: label_with(calc)(pool[i])``.
        config: training settings for every round; its ``train_file``, ``output_dir`` and
            ``model_name`` are set per round. Without ``valid_file`` each round's labelled set is
            split by ``valid_fraction``.
        sizes: labelled-set sizes, increasing, e.g. (10, 20, 50, 100, 200).
        strategy: one of :data:`~ase_race.active.acquisition.STRATEGIES`.
        test: labelled frames for the learning curve (optional).
        seed: draws the initial set (and the scores of ``random``).
        structures_per_round: > 0 sets ``max_epochs`` per round with :func:`epochs_for`, so
            small sets get more epochs; 0 keeps the config's ``max_epochs``.
        warm_start: rounds after the first fine-tune the previous round's posterior on the
            new labelled set (:func:`~ase_race.training.finetune.fine_tune`, learning rate
            ``warm_start_lr``, the same number of epochs) instead of training from scratch:
            much cheaper, and the usual practice when labels are expensive. The model's
            normalisation (E0s, scale, shift) then stays that of round 0.
        device: where the acquisition scores are computed (None: a GPU when present, as
            :class:`~ase_race.calculator.RACECalculator` chooses); training follows
            ``config.device``.
    """
    from ..calculator import RACECalculator
    from ..modelfile import load_model, save_model
    from ..training import as_frames, fit
    from ..training.assess import gather

    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
    sizes = [int(s) for s in sizes]
    if not sizes or sizes[0] < 1 or any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise ConfigError(f"sizes must be positive and increasing, got {sizes}")
    if sizes[-1] > len(pool):
        raise ConfigError(f"the largest size ({sizes[-1]}) exceeds the pool ({len(pool)} structures)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state and (state.get("strategy"), state.get("seed"), state.get("pool_size")) != (strategy, seed, len(pool)):
        raise ConfigError(f"{out} holds a run with strategy {state.get('strategy')!r}, seed {state.get('seed')}, "
                          f"pool of {state.get('pool_size')}; use another output folder")
    state.update(strategy=strategy, seed=seed, pool_size=len(pool), sizes=sizes)
    rounds: list[list[int]] = state.setdefault("labelled", [])
    if not rounds:
        rounds.append(sorted(np.random.default_rng(seed).permutation(len(pool))[: sizes[0]].tolist()))
        atomic_write_text(state_path, json.dumps(state, indent=1))
    digest = _test_digest(test) if test else None
    curve_path = out / "learning_curve.csv"
    recorded = {r.round: r for r in read_curve(curve_path)} if curve_path.exists() else {}
    # round → {"train_s": labelling and training seconds, "model": stamp, "test_digest": ...}
    records: dict[str, dict] = state.setdefault("rounds", {})
    state.pop("test_digest", None)  # one digest for the whole curve, as written before per-round records
    descriptors = np.stack([rdf_descriptor(a) for a in pool]) if diversity > 0 else None

    curve: list[RoundResult] = []
    bundle = None  # the previous round's model
    known: dict[int, Atoms] = {}  # pool index → labelled structure, from the rounds so far
    for k, size in enumerate(sizes):
        start = time.perf_counter()
        labelled = rounds[k]
        round_dir = out / f"round_{k:02d}"
        round_dir.mkdir(exist_ok=True)
        train_file = round_dir / "train.extxyz"
        if not train_file.exists():  # label only what no earlier round labelled
            new_labels = [known[i] if i in known else label(i) for i in labelled]
            for i, atoms in zip(labelled, new_labels):
                atoms.info["pool_index"] = int(i)
            write_structures(train_file, new_labels)
        # Train on the structures as recorded (extxyz keeps positions to 1e-8 Å), so that a
        # resumed loop trains on exactly the data an uninterrupted one did.
        known.update({int(a.info["pool_index"]): a for a in read(train_file, ":")})
        frames = as_frames([known[i] for i in labelled], LABEL_KEYS, "labelled structure")
        model_path = round_dir / "model.pt"
        trained = not model_path.exists()
        if not trained:
            bundle = load_model(model_path)
        elif warm_start and k > 0:
            bundle = _fine_tune_round(bundle, str(out / f"round_{k - 1:02d}" / "model.pt"), frames, config,
                                      epochs_for(size, structures_per_round, min_epochs) if structures_per_round else config.max_epochs,
                                      warm_start_lr)
            save_model(model_path, bundle.posterior, calibration=bundle.calibration, metadata=bundle.metadata)
        else:
            round_config = config.replace(train_file=str(train_file), output_dir=str(round_dir), model_name="model",
                                          energy_key=LABEL_KEYS.energy, forces_key=LABEL_KEYS.forces, test_file="")
            if structures_per_round:
                round_config = round_config.replace(max_epochs=epochs_for(size, structures_per_round, min_epochs))
            bundle = fit(round_config, train=frames)
            save_model(model_path, bundle.posterior, metadata=bundle.metadata)
        record = records.get(str(k), {})
        if trained:
            record = records[str(k)] = {"train_s": time.perf_counter() - start}
            atomic_write_text(state_path, json.dumps(state, indent=1))
        stamp = _file_stamp(model_path)
        done = recorded.get(k)
        if (done is not None and done.n_train == size and digest is not None and record.get("model") == stamp
                and record.get("test_digest") == digest and (k + 1 == len(sizes) or len(rounds) > k + 1)):
            curve.append(done)  # measured on this model and this test set: its errors and wall time
            continue
        # A loaded model's labelling and training time is the recorded one (0 for runs that predate it).
        spent = 0.0 if trained else record.get("train_s", 0.0)
        result = RoundResult(k, size, *(_test_errors(gather(bundle, list(test))) if test else (math.nan,) * 4),
                             wall_s=math.nan)
        if k + 1 < len(sizes) and len(rounds) == k + 1:
            rest = np.setdiff1d(np.arange(len(pool)), labelled)
            calc = None if strategy == "random" else RACECalculator(bundle, device=device)
            scores = acquisition_scores(calc, [pool[i] for i in rest], strategy, seed=seed * 1000 + k)
            chosen = select(scores, sizes[k + 1] - size, diversity, descriptors[rest] if descriptors is not None else None)
            rounds.append(sorted(labelled + [int(rest[j]) for j in chosen]))
            atomic_write_text(state_path, json.dumps(state, indent=1))
        result.wall_s = spent + time.perf_counter() - start
        curve.append(result)
        write_curve(curve, curve_path)
        record.update(model=stamp, test_digest=digest)  # after the row: a kill in between re-evaluates
        records[str(k)] = record
        atomic_write_text(state_path, json.dumps(state, indent=1))
        log.info("round %d: %d labelled, E MAE %.4g meV, F MAE %.4g meV/Å", k, size, 1e3 * result.energy_mae,
                 1e3 * result.forces_mae)
    return curve


def _fine_tune_round(previous, previous_path: str, frames: list[Frame], config: TrainConfig, epochs: int, lr: float):
    """The previous round's posterior fine-tuned on this round's labelled ``frames``."""
    from ..modelfile import ModelBundle
    from ..training.finetune import fine_tune

    tuned = fine_tune(previous.posterior, frames, epochs=epochs, lr=lr, loss=config.loss,
                      batch_size=config.batch_size, seed=config.seed)
    metadata = {**previous.metadata, "active_learning": {"fine_tuned_from": previous_path, "epochs": epochs, "lr": lr,
                                                         "n_train": len(frames)}}
    return ModelBundle(tuned, previous.calibration, metadata)


def _file_stamp(path: Path) -> list[int]:
    """[size, modification time in ns] of a file: model files are replaced atomically, so a new one differs."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _test_digest(test: Sequence[Frame]) -> str:
    """SHA-256 of the test set's species, positions, cells, periodicity and labels (in order)."""
    h = hashlib.sha256()
    for f in test:
        h.update(np.int64(len(f.atoms)).tobytes())
        h.update(np.asarray(f.atoms.numbers, dtype=np.int64).tobytes())
        h.update(np.asarray(f.atoms.positions, dtype=np.float64).tobytes())
        h.update(np.asarray(f.atoms.cell.array, dtype=np.float64).tobytes())
        h.update(np.asarray(f.atoms.pbc, dtype=np.uint8).tobytes())
        h.update(b"F" if f.forces is not None else b"-")
        h.update(np.float64(math.nan if f.energy is None else f.energy).tobytes())
        if f.forces is not None:
            h.update(np.asarray(f.forces, dtype=np.float64).tobytes())
    return h.hexdigest()


def _test_errors(g) -> tuple[float, float, float, float]:
    """(energy MAE, energy RMSE, force MAE, force RMSE) of a :class:`~ase_race.training.assess.Gathered`."""
    e, f = g.energy_ref - g.energy_pred, g.forces_ref - g.forces_pred
    return mae(e), rmse(e), mae(f), rmse(f)


def write_curve(curve: Sequence[RoundResult], path: str | Path) -> None:
    """The learning curve as CSV (:data:`CSV_COLUMNS`: errors in meV and meV/Å)."""
    columns = [CSV_COLUMNS.get(k, (k, 1)) for k in CURVE_FIELDS]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow([name for name, _ in columns])
    for r in curve:
        writer.writerow([getattr(r, k) * factor for k, (_, factor) in zip(CURVE_FIELDS, columns)])
    atomic_write_text(Path(path), buffer.getvalue())


def read_curve(path: str | Path) -> list[RoundResult]:
    """A curve written by :func:`write_curve` (or an earlier one with columns in eV)."""

    def value(row, key):
        column, factor = CSV_COLUMNS.get(key, (key, 1))
        return float(row[column]) / factor if column in row else float(row[key])

    with open(path) as fh:
        return [RoundResult(int(r["round"]), int(r["n_train"]), *(value(r, k) for k in CURVE_FIELDS[2:]))
                for r in csv.DictReader(fh)]


def plot_curves(curves: dict[str, Sequence[RoundResult]], path: str | Path, title: str = "") -> Path:
    """Energy and force MAE against labelled-set size (log–log), one line per label."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 400, not 4×10²; log axes would crowd the minors
    sizes = sorted({r.n_train for curve in curves.values() for r in curve})
    fig = Figure(figsize=(9, 3.6))
    axes = fig.subplots(1, 2)
    for name, curve in curves.items():
        n = [r.n_train for r in curve]
        axes[0].plot(n, [1e3 * r.energy_mae for r in curve], "o-", label=name)
        axes[1].plot(n, [1e3 * r.forces_mae for r in curve], "o-", label=name)
    for ax, what in zip(axes, ("energy MAE (meV)", "force MAE (meV/Å)")):
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlabel("labelled structures"), ax.set_ylabel(what)
        ax.set_xticks(sizes), ax.xaxis.set_major_formatter(plain), ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(plain), ax.yaxis.set_minor_formatter(plain)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
