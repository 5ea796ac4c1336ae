"""Training: end to end, exact resume after a kill, and data parallelism equal to one process."""

import csv
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ase_race import RACECalculator, load_model
from ase_race.training import TrainConfig
from ase_race.training import train

TINY = {"num_features": 4, "hidden_irreps": "4x0e+4x1o", "sh_lmax": 1, "radial_mlp": [8], "readout_hidden": 4, "dtype": "float64"}


def config(emt_file, out, **kw):
    base = dict(
        train_file=str(emt_file), e0s="fit", valid_fraction=4, preset="tiny", model=TINY, loss="nll_jef",
        warmup_epochs=1, batch_size=3, max_epochs=3, lr=0.01, output_dir=str(out), checkpoint_every=2, seed=3,
    )
    return TrainConfig(**{**base, **kw})


def test_train_end_to_end(emt_file, tmp_path):
    path = train(config(emt_file, tmp_path / "run", test_file=str(emt_file)))
    bundle = load_model(path)
    meta = bundle.metadata
    assert meta["training"]["n_train"] == 8 and meta["training"]["n_valid"] == 4
    assert set(meta["metrics"]) == {"valid", "test"}
    assert len(meta["training"]["train_fingerprint"]) == 64
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert {"energy_mae_meV", "forces_rmse_meV_A", "energy_nll", "forces_nll", "lr"} <= set(rows[0])
    # Learning happened: the validation loss of the last epoch beats the first NLL epoch's.
    assert float(rows[-1]["valid_loss"]) < float(rows[0]["valid_loss"])
    # The exported model is a working calculator with the fitted E0s inside.
    from ase.build import molecule

    atoms = molecule("H2O")
    atoms.calc = RACECalculator(path)
    assert abs(atoms.get_potential_energy() - sum(bundle.config.e0s[[1, 6, 8].index(z)] for z in atoms.numbers)) < 50


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from ase_race.training import TrainConfig
    from ase_race.training import train
    cfg = TrainConfig.from_yaml(sys.argv[1])
    kill_at = int(sys.argv[2])
    def on_step(trainer):
        if trainer.state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    train(cfg, on_step=on_step)
    """
)


def test_killed_run_resumes_exactly(emt_file, tmp_path):
    reference = train(config(emt_file, tmp_path / "straight"))
    resumed_cfg = config(emt_file, tmp_path / "killed")
    cfg_file = tmp_path / "killed.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump(resumed_cfg.to_dict()))
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    # 8 training frames in batches of 3: 3 steps an epoch; checkpoints every 2 steps.
    # Step 5 is mid-epoch 1 and one step after the last checkpoint: that step is lost and redone.
    proc = subprocess.run([sys.executable, str(script), str(cfg_file), "5"], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    state = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 1, 4)
    resumed = train(resumed_cfg)
    a = load_model(reference).posterior.model.state_dict()
    b = load_model(resumed).posterior.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = list(csv.DictReader(open(tmp_path / "killed" / "metrics.csv")))
    straight = list(csv.DictReader(open(tmp_path / "straight" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]  # nothing lost, nothing duplicated
    for key in ("train_loss", "valid_loss", "forces_mae_meV_A", "lr"):
        assert [r[key] for r in rows] == [r[key] for r in straight], key


def test_resume_refuses_changed_settings(emt_file, tmp_path):
    train(config(emt_file, tmp_path / "run", max_epochs=1))
    with pytest.raises(ValueError, match=r"different settings \(\['lr'\]\)"):
        train(config(emt_file, tmp_path / "run", max_epochs=2, lr=0.5))


def test_a_moved_and_renamed_run_resumes(emt_file, tmp_path):
    train(config(emt_file, tmp_path / "run", max_epochs=1))
    (tmp_path / "run").rename(tmp_path / "moved")
    path = train(config(emt_file, tmp_path / "moved", max_epochs=2, model_name="renamed"))
    assert Path(path).name == "renamed.pt"
    rows = list(csv.DictReader(open(tmp_path / "moved" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1]  # epoch 0 was not trained again


def test_resume_extends_a_run_from_an_older_version_with_paths_spelled_differently(emt_file, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(config(emt_file, run, max_epochs=1))
    # An older version logged fewer metrics per epoch and did not record its directory.
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    for row in checkpoint["history"]:
        del row["forces_rmse_meV_A"]
    del checkpoint["cwd"]
    torch.save(checkpoint, run / "checkpoint.pt")
    # The same data file named by a relative path.
    monkeypatch.chdir(emt_file.parent)
    train(config(emt_file.name, run, max_epochs=2))
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert rows[0]["forces_rmse_meV_A"] == "" and float(rows[1]["forces_rmse_meV_A"]) > 0
    # The checkpoint's relative path is relative to where that run was started, not to here.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    train(config(f"../{emt_file.name}", run, max_epochs=3))
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 3
    # A different file is still a different setting.
    other = tmp_path / "other.extxyz"
    other.write_bytes(emt_file.read_bytes())
    with pytest.raises(ValueError, match=r"different settings \(\['train_file'\]\)"):
        train(config(other, run, max_epochs=4))


DDP_WORKER = textwrap.dedent(
    """
    import os, sys, torch
    import torch.distributed as dist
    from ase_race.training import TrainConfig
    from ase_race.training.api import prepare
    from ase_race.training.batches import GraphDataset
    from ase_race.training.loop import Trainer
    cfg = TrainConfig.from_yaml(sys.argv[1])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    mc, train, valid = prepare(cfg)
    trainer = Trainer(cfg, mc, GraphDataset(train, mc.species, mc.r_max, torch.float64),
                      GraphDataset(valid, mc.species, mc.r_max, torch.float64))
    trainer.run(max_steps=4)
    if trainer.rank == 0:
        torch.save(trainer.model.state_dict(), sys.argv[2])
    if dist.is_initialized():
        dist.destroy_process_group()
    """
)


def test_two_process_ddp_matches_one_process(emt_file, tmp_path):
    import yaml

    cfg = config(emt_file, tmp_path / "ddp", batch_size=4, checkpoint_every=1000, ema_decay=0.0)
    cfg_file = tmp_path / "ddp.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    single = subprocess.run([sys.executable, str(script), str(cfg_file), str(tmp_path / "one.pt")],
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    (tmp_path / "ddp").mkdir(exist_ok=True)
    for p in (tmp_path / "ddp").glob("checkpoint.pt"):
        p.unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    double = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
         str(script), str(cfg_file), str(tmp_path / "two.pt")],
        capture_output=True, text=True, env=env,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-9, atol=1e-11, msg=key)
    # and the ranks really did train: weights moved from their initial values
    assert any(not torch.equal(one[k], v) for k, v in _initial(cfg).items())


def _initial(cfg):
    from ase_race.training.api import prepare
    from ase_race.nn import RACE

    mc, _, _ = prepare(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return RACE(mc).state_dict()


def test_cli_train_smoke(emt_file, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "ase_race.cli.main", "train", f"train_file={emt_file}", "e0s=fit",
         "valid_fraction=4", "preset=tiny", "max_epochs=1", f"output_dir={out}", "model.dtype=float64"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.pt").exists() and "model written to" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "ase_race.cli.main", "train", "train_file=missing.xyz"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.xyz: no such data file" in bad.stderr
